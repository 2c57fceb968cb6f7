"""Print the markdown rows of docs/results.md from finished run folders.

    python benchmarks/results_table.py runs/reference/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("recall@20", "recall@50", "ndcg@50", "precision@50")


def row(run_dir: Path) -> str:
    r = json.loads((run_dir / "metrics.json").read_text())
    test, timing = r["metrics"]["test"], r["timing"]
    cells = [r["dataset"], r["protocol"].upper(), r["model"], *(f"{test[c]:.4f}" for c in COLUMNS)]
    cells.append(str(test["num_users"]))
    cells += [f"{timing['train_seconds']:.0f}", f"{timing.get('epochs', 0)}", f"{timing['test_eval_seconds']:.2f}"]
    cells.append(f"`crosstower run configs/{run_dir.name}.yaml`")
    return "| " + " | ".join(cells) + " |"


def main(paths: list[str]) -> None:
    print("| dataset | protocol | model | Recall@20 | Recall@50 | NDCG@50 | Precision@50 | test users | train s | epochs | test eval s | command |")
    print("|" + "---|" * 12)
    for path in paths:
        if (Path(path) / "metrics.json").exists():
            print(row(Path(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
