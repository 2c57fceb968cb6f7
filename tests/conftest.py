"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real data sets live outside the repository (never committed); see shared/data/SOURCES.md.
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA = Path(os.environ.get("CROSSTOWER_DATA_DIR", DEFAULT_DATA))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real data sets; tests that need it skip (with the reason) where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (set CROSSTOWER_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory) -> Path:
    """One finished run (tiny synthetic data, P2, one epoch) per way of serving, trained once for
    the session: a two-tower (``dssm``, and ``dssm_no_user_fields``), a SparCode whose index keeps
    every score of every code (``sparcode``), late interaction (``colbert``) and the exhaustively
    scored cross encoder (``cross``)."""
    import copy

    from crosstower.config import parse_config
    from crosstower.run import run_experiment
    from tests.test_distill import MODELS, config

    sparcode = {"name": "sparcode", "dim": 8, "user_tokens": 2, "item_tokens": 2, "tokenizer_hidden": [16],
                "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 4,
                "index": {"keep": 150, "codes": "all"}}
    models = {"dssm": MODELS["dssm"], "sparcode": sparcode, "colbert": MODELS["colbert"], "cross": MODELS["cross"],
              "dssm_no_user_fields": {**MODELS["dssm"], "user_fields": []}}
    root = tmp_path_factory.mktemp("finished_runs")
    for name, model in models.items():
        raw = config("dssm", epochs=1)
        raw["model"] = copy.deepcopy(model)
        run_experiment(parse_config(raw), root / name)
    return root
