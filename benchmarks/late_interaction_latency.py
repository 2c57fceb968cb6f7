"""Batch-1 latency of the late-interaction index against exhaustive MaxSim, at catalogue sizes a
trained model of this project cannot reach on a CPU (issue 4, the index at 100k-1M items).

    python benchmarks/late_interaction_latency.py --sizes 10000 100000 1000000 --threads 1

Writes ``benchmarks/out/late_interaction_latency.json`` (``--out``) and prints a table.

What is measured, per catalogue size N (synthetic and seeded; nothing is trained): item tokens
shaped like the synthetic late-interaction model's (5 unit vectors of 32 dimensions an item, the
shape of ``runs/interaction/synthetic-colbert-p2``) drawn around one topic direction per 20 items, so that token
neighbourhoods exist as they do in a trained model (uniformly random tokens have none); users of
25 tokens, noisy copies of the tokens of 5 liked items, plus a small random item bias. ``exhaustive``
scores every item with :func:`crosstower.nn.maxsim.maxsim` in slices and takes the top 50;
``index`` is :class:`LateInteractionIndex` (IVF with 4 sqrt(n) lists, float16 tokens) searched
with the model's defaults (16 lists probed, 128 item tokens per user token, 300 candidates
re-scored exactly) and, as ``index_wide``, with 1024 tokens per user token, 32 lists probed and
1000 candidates. Each query is one user; the methods alternate query by query so that drift of the
machine hits all alike.

Only cost is measured here. Recall against exhaustive MaxSim is not: on synthetic tokens the
exhaustive top 50 beyond the few liked items is decided by the sum of ~20 small, random
similarities of the user tokens that match nothing, which no candidate stage can (or should)
reproduce; a trained model's tokens do not look like that. The index's recall is measured on
trained models (`benchmarks/late_interaction_index.py`; 99.4% on the synthetic default).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from crosstower.environment import describe_environment, source_revision
from crosstower.files import write_json
from crosstower.index import LateInteractionIndex
from crosstower.nn.maxsim import maxsim
from crosstower.nn.tokens import TokenSequence

ITEM_TOKENS, USER_TOKENS, DIM, ITEMS_PER_TOPIC, K = 5, 25, 32, 20, 50
# The index's search settings: the late-interaction model's defaults, and a wider search.
SETTINGS = {
    "index": {"tokens_per_query": 128, "nprobe": 16, "max_candidates": 300},
    "index_wide": {"tokens_per_query": 1024, "nprobe": 32, "max_candidates": 1000},
}
SLICE = 65536  # items scored per MaxSim call: the [1, L_u, slice, L_i] similarities stay small


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def catalogue(n: int, rng: np.random.Generator) -> tuple[TokenSequence, torch.Tensor]:
    """``n`` items of ``ITEM_TOKENS`` unit tokens, each near one of ``n / ITEMS_PER_TOPIC`` topic
    directions (items share topics as trained item tokens share genres), and their bias."""
    topics = unit(rng.standard_normal((max(1, n // ITEMS_PER_TOPIC), DIM)).astype(np.float32))
    picks = rng.integers(len(topics), size=(n, ITEM_TOKENS))
    tokens = unit(topics[picks] + 0.25 * rng.standard_normal((n, ITEM_TOKENS, DIM)).astype(np.float32))
    bias = 0.1 * rng.standard_normal(n).astype(np.float32)
    return TokenSequence(torch.from_numpy(tokens), torch.ones(n, ITEM_TOKENS, dtype=torch.bool)), torch.from_numpy(bias)


def user(items: TokenSequence, rng: np.random.Generator) -> TokenSequence:
    """One user of ``USER_TOKENS`` tokens: noisy copies of the tokens of a few liked items, as a
    trained user tower's history tokens resemble the items in the history."""
    n = items.tokens.shape[0]
    liked = rng.integers(n, size=USER_TOKENS // ITEM_TOKENS)
    near = items.tokens[liked].reshape(-1, DIM).numpy()
    tokens = unit(near + 0.25 * rng.standard_normal((len(near), DIM)).astype(np.float32))
    return TokenSequence(torch.from_numpy(tokens)[None], torch.ones(1, USER_TOKENS, dtype=torch.bool))


@torch.no_grad()
def exhaustive_top(query: TokenSequence, items: TokenSequence, bias: torch.Tensor) -> torch.Tensor:
    n = items.tokens.shape[0]
    scores = torch.cat([
        maxsim(query, TokenSequence(items.tokens[lo : lo + SLICE], items.mask[lo : lo + SLICE]))
        for lo in range(0, n, SLICE)
    ], dim=1) + bias
    return torch.topk(scores, K, dim=1).indices[0]


def measure(n: int, queries: int, warmup: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    items, bias = catalogue(n, rng)
    index = LateInteractionIndex.build(items, bias)
    times = {name: [] for name in ("exhaustive", *SETTINGS)}
    scored = {name: [] for name in SETTINGS}
    for q in range(warmup + queries):
        query = user(items, rng)
        start = time.perf_counter()
        exhaustive_top(query, items, bias)
        elapsed = {"exhaustive": time.perf_counter() - start}
        for name, settings in SETTINGS.items():
            for key, value in settings.items():
                setattr(index, key, value)
            start = time.perf_counter()
            index.search(query, K)
            elapsed[name] = time.perf_counter() - start
            scored[name].append(index.last_scored_fraction)
        if q >= warmup:
            for name, seconds in elapsed.items():
                times[name].append(seconds)
    row = {"items": n, "queries": queries, "build_seconds": round(index.build_seconds, 2),
           "index_mb": round(index.nbytes() / 2**20, 1)}
    for name, values in times.items():
        ms = np.array(values) * 1000
        row[f"{name}_p50_ms"] = round(float(np.percentile(ms, 50)), 3)
        row[f"{name}_p99_ms"] = round(float(np.percentile(ms, 99)), 3)
    for name in SETTINGS:
        row[f"{name}_scored_fraction"] = round(statistics.mean(scored[name][warmup:]), 5)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/late_interaction_latency.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    report = {"command": "python benchmarks/late_interaction_latency.py " + " ".join(argv or []),
              "machine": {**describe_environment(), "threads": args.threads, "faiss": faiss.__version__,
                          **source_revision()},
              "results": []}
    print("| items | exhaustive p50 / p99 ms | index p50 / p99 ms | items scored | "
          "wide index p50 / p99 ms | items scored | index MB | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        r = measure(n, args.queries, args.warmup, args.seed)
        report["results"].append(r)
        write_json(args.out, report)  # after every size: a long run keeps its parts
        cells = [f"{n:,}", f"{r['exhaustive_p50_ms']:.1f} / {r['exhaustive_p99_ms']:.1f}"]
        for name in SETTINGS:
            cells += [f"{r[f'{name}_p50_ms']:.2f} / {r[f'{name}_p99_ms']:.2f}", f"{r[f'{name}_scored_fraction']:.4f}"]
        print("| " + " | ".join([*cells, str(r["index_mb"]), str(r["build_seconds"])]) + " |", flush=True)
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
