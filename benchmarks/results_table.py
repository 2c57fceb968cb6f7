"""Print the markdown rows of docs/results.md from finished run folders.

    python benchmarks/results_table.py runs/reference/*
    python benchmarks/results_table.py --served runs/reference/synthetic-*-p2   # + index columns

Pre-ranking (P4) runs get their own table (AUC, GAUC, log loss) after the ranking table.
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


def p4_row(run_dir: Path) -> str:
    r = json.loads((run_dir / "metrics.json").read_text())
    val, test, timing = r["metrics"]["val"], r["metrics"]["test"], r["timing"]
    cells = [r["dataset"], _model_label(r), f"{val['auc']:.4f}", *(f"{test[c]:.4f}" for c in ("auc", "gauc", "logloss"))]
    cells += [str(test["rows"]), f"{timing['train_seconds']:.0f}", f"{timing.get('epochs', 0)}"]
    cells.append(f"`crosstower run configs/{run_dir.name}.yaml`")
    return "| " + " | ".join(cells) + " |"


def _model_label(r: dict) -> str:
    """The model name, with the tokenizer for the tokenizer-based models (issue 3)."""
    tokenizer = r["config"]["model"].get("tokenizer")
    return f"{r['model']} ({tokenizer})" if tokenizer else r["model"]


def main(paths: list[str]) -> None:
    served = "--served" in paths
    paths = [p for p in paths if p != "--served"]
    runs = [Path(p) for p in paths if (Path(p) / "metrics.json").exists()]
    p4 = [r for r in runs if json.loads((r / "metrics.json").read_text())["protocol"] == "p4"]
    ranking = [r for r in runs if r not in p4]
    if ranking:
        head = ["dataset", "protocol", "model", "Recall@20", "Recall@50", "NDCG@50", "Precision@50"]
        if served:
            head += ["served Recall@50", "served NDCG@50", "served Precision@50", "kept share"]
        head += ["test users", "train s", "epochs", "test eval s", "command"]
        _table(head, [row(r, served) for r in ranking])
    if p4:
        head = ["dataset", "model", "val AUC", "test AUC", "test GAUC", "test log loss", "test rows", "train s",
                "epochs", "command"]
        _table(head, [p4_row(r) for r in p4])


def _table(head: list[str], rows: list[str]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for line in rows:
        print(line)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
