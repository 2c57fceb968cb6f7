"""Time exact full-ranking evaluation: 1,000 users x 100,000 items, 64-d dot-product scorer.

Each user has 10 targets and 20 excluded items; metrics at K in (20, 50). Prints the median of
several runs for the default batching and for other user batches (the cost of batching), and
writes them to benchmarks/out/evaluate.json.

    python benchmarks/bench_evaluate.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.environment import describe_environment, source_revision
from crosstower.evaluate import evaluate_ranking
from crosstower.evaluate.ranking import DEFAULT_ITEM_CHUNK, DEFAULT_USER_BATCH
from crosstower.files import write_json

NUM_USERS, NUM_ITEMS, DIM = 1_000, 100_000, 64
NUM_TARGETS, NUM_EXCLUDED = 10, 20
KS = (20, 50)


def make_data(seed: int = 0):
    """Random embeddings and per-user target / exclusion rows (fixed length, fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    user_emb = torch.randn(NUM_USERS, DIM, generator=gen)
    item_emb = torch.randn(NUM_ITEMS, DIM, generator=gen)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, NUM_ITEMS, size=(NUM_USERS, NUM_TARGETS + NUM_EXCLUDED))

    def rows(values: np.ndarray) -> Ragged:
        indptr = np.arange(0, values.size + 1, values.shape[1], dtype=np.int64)
        return Ragged(indptr, values.reshape(-1).astype(np.int64))

    return user_emb, item_emb, rows(picks[:, NUM_EXCLUDED:]), rows(picks[:, :NUM_EXCLUDED])


def time_run(user_emb, item_emb, targets, exclude, user_batch, item_chunk, repeats):
    """Median wall time of ``repeats`` evaluations, plus the metrics of the last one."""

    def scorer(rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        return user_emb[torch.from_numpy(rows)] @ item_emb[start:stop].T

    times, metrics = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics = evaluate_ranking(
            scorer, NUM_USERS, NUM_ITEMS, exclude, targets, KS,
            user_batch=user_batch, item_chunk=item_chunk,
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "evaluate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = make_data()
    configs = [
        ("default", DEFAULT_USER_BATCH, DEFAULT_ITEM_CHUNK),
        ("user_batch=64", 64, DEFAULT_ITEM_CHUNK),
        ("user_batch=1000", 1000, DEFAULT_ITEM_CHUNK),
    ]
    runs = []
    reference = None
    for name, user_batch, item_chunk in configs:
        median, times, metrics = time_run(*data, user_batch, item_chunk, args.repeats)
        reference = reference or metrics
        assert metrics == reference, "metrics depend on the batching"
        runs.append({"name": name, "user_batch": user_batch, "item_chunk": item_chunk,
                     "median_s": round(median, 4), "times_s": [round(t, 4) for t in times]})
        print(f"{name:>16}: user_batch={user_batch:<5} item_chunk={item_chunk:<6} "
              f"median {median:.3f} s  ({', '.join(f'{t:.3f}' for t in times)})")

    result = {
        "benchmark": "evaluate_ranking full ranking",
        "num_users": NUM_USERS, "num_items": NUM_ITEMS, "dim": DIM,
        "targets_per_user": NUM_TARGETS, "excluded_per_user": NUM_EXCLUDED, "ks": list(KS),
        "threads": args.threads, "repeats": args.repeats,
        "machine": {**describe_environment(), **source_revision()},
        "load_average_1min": round(os.getloadavg()[0], 2),  # the machine is shared
        "runs": runs, "metrics": reference,
    }
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
