# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, so the project's `torch>=2.1` installs nothing more. On these machines pip's own
# configuration serves torch==2.13.0 as a CPU wheel from disk; elsewhere choose the build, e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" (or .../whl/cu121 for CUDA).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
WARM_IMPORTS := import crosstower.cli, crosstower.run, crosstower.recommend, crosstower.serve, crosstower.compare, pytest, hypothesis

.PHONY: run test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	# Bytecode only for the modules crosstower imports (pip would compile all of torch: a minute
	# more); allowed even where PYTHONDONTWRITEBYTECODE is set, so later commands start fast.
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "$(WARM_IMPORTS)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/crosstower run --out runs/synthetic-default

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs
