"""SparCode's accuracy against the share of code-item scores its index keeps.

    python benchmarks/sparcode_tradeoff.py runs/reference/synthetic-sparcode-sa-p2 \
        --fractions 1 0.1 0.01 0.001 --out benchmarks/out/tradeoff-synthetic.json \
        --plot docs/sparcode_tradeoff.png

Reads a finished SparCode run (its config, split, model and the ``nonzero`` index it saved),
prunes that index (:meth:`SparseCodeIndex.pruned`, no encoder call) to each fraction by three
rules, the top ``L = fraction * num_items`` scores of every code (``top_l``), the largest scores
of the whole table whatever their code (``threshold``), and the same budget shared among the
codes by use (``usage``: :class:`UsageBudget` with ``--usage-exponent``; an index saved without
its codes' usage gets it from the model and the training users, as the run would have recorded
it), and evaluates the served test metrics at each level with the same evaluator as the run.
Fraction 1 keeps every positive score, i.e. the index the run served. The run's exhaustive test
metrics (the model scored on every item) are written beside them: they are what an index that
kept everything would reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from crosstower.evaluate.model_eval import evaluate_served
from crosstower.files import write_json
from crosstower.index import SparseCodeIndex
from crosstower.index.keep_rules import UsageBudget
from crosstower.run_dir import open_run, training_users

METRICS = ("recall@50", "ndcg@50", "precision@50")


def tradeoff(run_dir: Path, fractions: list[float], data_dir: Path | None, usage_exponent: float,
             part: str = "test") -> dict:
    run = open_run(run_dir, data_dir)
    config, saved, dataset, split, model = run.config, run.metrics, run.dataset, run.split, run.model
    full = run.index()
    if "code_usage" not in full.arrays():
        full = full.with_code_usage(*model.code_usage(training_users(dataset, split, config)))
    rows = []
    for fraction in sorted(fractions, reverse=True):
        rules = (
            ("top_l", max(1, round(fraction * dataset.num_items))),
            ("threshold", _threshold(full, fraction)),
            ("usage", None if fraction >= 1 else UsageBudget(fraction, usage_exponent)),
        )
        for rule, keep in rules:
            index = full if keep is None or (rule == "top_l" and keep >= dataset.num_items) else full.pruned(keep)
            if index is full and rule != "top_l" and rows and rows[-1]["keep"] == full.keep:
                continue  # the rules keep the whole index at this fraction: one row is enough
            metrics, seconds = evaluate_served(model, index, getattr(split, part), dataset.num_items, config)
            rows.append({
                "fraction_asked": fraction, "rule": rule, "keep": index.keep, "kept_fraction": index.kept_fraction,
                "nnz": index.nnz, "index_bytes": index.nbytes(), "eval_seconds": seconds,
                **{m: metrics[m] for m in METRICS},
            })
            print(f"{rule} keep {index.keep}: kept {index.kept_fraction:.5f}, {index.nbytes() / 2**20:.1f} MiB, "
                  + ", ".join(f"{m} {metrics[m]:.4f}" for m in METRICS), flush=True)
    return {
        "run": str(run_dir), "dataset": saved["dataset"], "protocol": saved["protocol"], "model": saved["model"],
        "codes_indexed": full.num_codes, "num_items": dataset.num_items,
        "part": part, f"exhaustive_{part}": {m: saved["metrics"][part][m] for m in METRICS}, "levels": rows,
    }


def _threshold(index: SparseCodeIndex, fraction: float) -> float | None:
    """The score threshold that keeps about ``fraction`` of the code x item table (the largest
    stored scores, whatever their code); None when the index keeps no more than that already."""
    target = int(fraction * index.num_codes * index.num_items)
    if target >= index.nnz:
        return None
    scores = np.asarray(index.arrays()["scores"], dtype=np.float32)
    position = len(scores) - max(target, 1)  # the target-th largest score
    return float(np.partition(scores, position)[position])


def plot(results: list[dict], path: Path) -> None:
    """Recall@50 against the kept share (log scale), one line per run, exhaustive as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [f"{r['dataset']} {r['protocol'].upper()}" for r in results]
    for r, name in zip(results, names):
        label = f"{name} ({Path(r['run']).name})" if names.count(name) > 1 else name
        line = None
        for rule, style in (("top_l", "o-"), ("threshold", "s:"), ("usage", "^-.")):
            levels = [x for x in r["levels"] if x["rule"] == rule]
            line, = ax.plot([x["kept_fraction"] for x in levels], [x["recall@50"] for x in levels], style,
                            color=line.get_color() if line else None, label=f"{label}: served, {rule}")
        ax.axhline(r[f"exhaustive_{r['part']}"]["recall@50"], color=line.get_color(), ls="--", lw=1, label=f"{label}: exhaustive")
    ax.set_xscale("log")
    ax.set_xlabel("share of code-item scores kept in the index")
    ax.set_ylabel(f"{results[0]['part']} Recall@50")
    ax.set_title("SparCode: accuracy against index sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished SparCode run folders")
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1, 0.01, 0.001])
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/sparcode_tradeoff.json"))
    parser.add_argument("--plot", type=Path, help="PNG to write")
    parser.add_argument("--part", choices=("test", "val"), default="test",
                        help="the users to evaluate; choose the exponent on val, report test")
    parser.add_argument("--usage-exponent", type=float, default=0.5,
                        help="the usage rule's exponent: code c keeps a share of the budget in proportion to usage_c**e")
    args = parser.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    results = [tradeoff(run, args.fractions, args.data_dir, args.usage_exponent, args.part) for run in args.runs]
    write_json(args.out, results)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
