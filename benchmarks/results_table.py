"""Print the markdown rows of docs/results.md from finished run folders.

    python benchmarks/results_table.py runs/reference/*
    python benchmarks/results_table.py --served runs/reference/synthetic-*-p2   # + index columns
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("recall@20", "recall@50", "ndcg@50", "precision@50")
SERVED = ("recall@50", "ndcg@50", "precision@50")


def row(run_dir: Path, served: bool) -> str:
    r = json.loads((run_dir / "metrics.json").read_text())
    test, timing = r["metrics"]["test"], r["timing"]
    cells = [r["dataset"], r["protocol"].upper(), _model_label(r), *(f"{test[c]:.4f}" for c in COLUMNS)]
    if served:
        test_served = r["metrics"].get("test_served")
        cells += [f"{test_served[c]:.4f}" if test_served else "" for c in SERVED]
        kept = r["index"].get("kept_fraction")
        cells.append(f"{kept:.3f}" if kept is not None else "")
    cells.append(str(test["num_users"]))
    cells += [f"{timing['train_seconds']:.0f}", f"{timing.get('epochs', 0)}", f"{timing['test_eval_seconds']:.2f}"]
    cells.append(f"`crosstower run configs/{run_dir.name}.yaml`")
    return "| " + " | ".join(cells) + " |"


def _model_label(r: dict) -> str:
    """The model name, with the tokenizer for the tokenizer-based models (issue 3)."""
    tokenizer = r["config"]["model"].get("tokenizer")
    return f"{r['model']} ({tokenizer})" if tokenizer else r["model"]


def main(paths: list[str]) -> None:
    served = "--served" in paths
    paths = [p for p in paths if p != "--served"]
    head = ["dataset", "protocol", "model", "Recall@20", "Recall@50", "NDCG@50", "Precision@50"]
    if served:
        head += ["served Recall@50", "served NDCG@50", "served Precision@50", "kept share"]
    head += ["test users", "train s", "epochs", "test eval s", "command"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in paths:
        if (Path(path) / "metrics.json").exists():
            print(row(Path(path), served))


if __name__ == "__main__":
    main(sys.argv[1:])
