"""What each trained model costs to score: multiply-adds per (user, item) pair, bytes stored per
item, and the exhaustive-evaluation throughput its run measured.

    python benchmarks/scoring_cost.py runs/issue4/* [--data-dir ../shared/data] \
        [--out benchmarks/out/scoring_cost.json]

* **Multiply-adds per pair** are counted, not derived by hand: torch's ``FlopCounterMode`` counts
  the matrix products of the model's own full-ranking scorer (``item_scorer()``, which caches
  whatever the item side allows), for a batch of users against the whole catalogue and against
  half of it; the difference divided by the extra pairs is the marginal cost of one more pair, so
  work done once per user (encoding the user) drops out. Element-wise work (ReLU, softmax, max)
  is not counted: the figure is a lower bound for the interaction models, exact for a dot product.
* **Bytes per item** are what serving stores per catalogue item: the float32 item vector of an
  inner-product model, the float16 token vectors (+ bias) of late interaction, the item heads of
  IntTower, the index bytes per item of SparCode, and, for the cross encoder, which can
  precompute nothing beyond the item's input tokens, those tokens.
* **Throughput** is (test users x items) / seconds of the run's own exhaustive test evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstower.data.batching import eval_user_input  # noqa: E402
from crosstower.files import write_json  # noqa: E402
from crosstower.models.base import EmbeddingRecommender  # noqa: E402
from crosstower.run_dir import open_run  # noqa: E402

USERS = 8


def counted_macs(model, user, num_items: int) -> float:
    """Marginal multiply-adds of one more (user, item) pair in the model's full-ranking scorer."""
    scorer = model.item_scorer()
    half = num_items // 2
    counts = []
    for stop in (half, num_items):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            scorer(user, 0, stop)
        counts.append(counter.get_total_flops() / 2)
    return (counts[1] - counts[0]) / (len(user) * (num_items - half))


def stored_bytes_per_item(model, saved: dict) -> float:
    """What serving keeps per catalogue item (see the module docstring)."""
    name = saved["model"]
    if name in ("sparcode",) and "nbytes" in saved["index"]:
        return saved["index"]["nbytes"] / model.num_items
    if isinstance(model, EmbeddingRecommender):
        return model.item_vectors(chunk=1024)[:1].shape[1] * 4
    if name == "colbert":
        tokens = model.encode_item_tokens(torch.arange(1))
        return int(tokens.mask.sum()) * tokens.tokens.shape[-1] * 2 + 4
    if name == "inttower":
        return model.config.heads_item * model.config.head_dim * 4
    if name == "cross":
        return model.substrate.item_length * model.config.dim * 4
    if name == "alltoall":
        return model.item_tokenizer(torch.arange(1)).numel() * 4  # K_i token vectors of float32
    raise ValueError(f"no storage rule for model '{name}'")


def measure(run_dir: Path, data_dir: Path | None) -> dict:
    run = open_run(run_dir, data_dir)
    config, saved, dataset, split, model = run.config, run.metrics, run.dataset, run.split, run.model
    user = eval_user_input(split.test, np.arange(min(USERS, len(split.test))), config.train.history_length)
    test = saved["metrics"]["test"]
    seconds = saved["timing"]["test_eval_seconds"]
    return {
        "run": run_dir.name,
        "model": saved["model"],
        "dataset": saved["dataset"],
        "protocol": saved["protocol"],
        "macs_per_pair": round(counted_macs(model, user, dataset.num_items), 1),
        "bytes_per_item": round(float(stored_bytes_per_item(model, saved)), 1),
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
        print(f"| {r['run']} | {r['macs_per_pair']:,.0f} | {r['bytes_per_item']:,.0f} | "
              f"{r['exhaustive_pairs_per_second']:,} | {r['recall@50']:.4f} |")


if __name__ == "__main__":
    main()
