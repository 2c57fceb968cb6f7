"""What each trained model costs to score: multiply-adds per (user, item) pair, bytes stored per
item (both as crosstower.cost counts them: see that module), and the exhaustive-evaluation
throughput its run measured.

    python benchmarks/scoring_cost.py runs/interaction/* [--data-dir ../shared/data] \
        [--out benchmarks/out/scoring_cost.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstower.cost import serving_cost  # noqa: E402
from crosstower.files import write_json  # noqa: E402
from crosstower.run_dir import open_run  # noqa: E402


def measure(run_dir: Path, data_dir: Path | None) -> dict:
    run = open_run(run_dir, data_dir)
    config, saved, dataset, split, model = run.config, run.metrics, run.dataset, run.split, run.model
    cost = serving_cost(model, saved["model"], saved["index"], split.test, config.train.history_length)
    test = saved["metrics"]["test"]
    seconds = saved["timing"]["test_eval_seconds"]
    return {
        "run": run_dir.name,
        "model": saved["model"],
        "dataset": saved["dataset"],
        "protocol": saved["protocol"],
        **cost,
        "exhaustive_pairs_per_second": round(test["num_users"] * dataset.num_items / seconds),
        "test_eval_seconds": round(seconds, 2),
        "recall@50": test["recall@50"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/scoring_cost.json"))
    args = parser.parse_args(argv)
    rows = [measure(run, args.data_dir) for run in args.runs]
    write_json(args.out, rows)
    print("| run | MACs / pair | bytes / item | exhaustive pairs / s | test Recall@50 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['macs_per_pair']:,.0f} | {r['bytes_per_item'] or 0:,.0f} | "
              f"{r['exhaustive_pairs_per_second']:,} | {r['recall@50']:.4f} |")


if __name__ == "__main__":
    main()
