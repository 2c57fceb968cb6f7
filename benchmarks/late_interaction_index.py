"""How much of exhaustive MaxSim the late-interaction index recovers, and how much it scores.

    python benchmarks/late_interaction_index.py runs/interaction/synthetic-colbert-p2 [--data-dir DIR] \
        [--out benchmarks/out/late_interaction_index.json]

For each trained late-interaction run: the exhaustive test Recall@50 of the model (every item
scored by MaxSim), then the same test users served by :class:`LateInteractionIndex` under a grid
of candidate settings (item tokens retrieved per user token, IVF lists probed, candidates kept),
with the share of the catalogue each query scored exactly, the index bytes and the build time;
then the default setting with the tokens stored as ColBERTv2 residuals of 8, 4 and 2 bits.
The issue's bar reads off the table: served Recall@50 >= 95% of exhaustive while scoring <= 10%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstower.evaluate.model_eval import evaluate_served, evaluate_split  # noqa: E402
from crosstower.files import write_json  # noqa: E402
from crosstower.run_dir import open_run  # noqa: E402

# (tokens per user token, IVF lists probed, candidates re-scored exactly per user)
GRID = [(16, 8, 150), (32, 8, 300), (64, 16, 300), (128, 16, 250), (128, 16, 300), (256, 32, 300)]
BEST = 4  # the grid point the compressed stores are measured at (the config defaults)
STORES = [("float16", 16), ("residual", 8), ("residual", 4), ("residual", 2)]


def sweep(run_dir: Path, data_dir: Path | None, spec: str, stores: list[tuple[str, int]]) -> list[dict]:
    run = open_run(run_dir, data_dir)
    config, dataset, split, model = run.config, run.dataset, run.split, run.model
    exhaustive, _ = evaluate_split(model, split.test, dataset.num_items, config)
    rows = [{"run": run_dir.name, "setting": "exhaustive", "recall@50": exhaustive["recall@50"],
             "ndcg@50": exhaustive["ndcg@50"], "scored_fraction": 1.0}]
    settings = [(store, nbits, *grid) for grid in GRID for store, nbits in stores[:1]]
    settings += [(store, nbits, *GRID[BEST]) for store, nbits in stores[1:]]
    for store, nbits, tokens_per_query, nprobe, max_candidates in settings:
        index = model.build_token_index(spec, tokens_per_query, min(max_candidates, dataset.num_items), nprobe, store, nbits)
        served, seconds = evaluate_served(model, index, split.test, dataset.num_items, config)
        stored = "float16" if store == "float16" else f"residual {nbits} bits"
        rows.append({
            "run": run_dir.name, "setting": f"{spec}, {tokens_per_query} tokens/query, nprobe {nprobe}, "
                                           f"{max_candidates} candidates, {stored}",
            "recall@50": served["recall@50"], "ndcg@50": served["ndcg@50"],
            "recall_ratio": served["recall@50"] / exhaustive["recall@50"],
            "scored_fraction": index.mean_scored_fraction, "index_bytes": index.nbytes(),
            "token_bytes_per_item": _token_bytes(index) / dataset.num_items,
            "build_seconds": round(index.build_seconds, 2), "serve_seconds": round(seconds, 2),
        })
    return rows


def _token_bytes(index) -> int:
    """Bytes of the stored item tokens (the store's arrays; the faiss candidate index excluded)."""
    return sum(a.nbytes for a in index.store.arrays().values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--spec", default="IVF{auto},Flat", help="faiss index_factory string of the candidates")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/late_interaction_index.json"))
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in sweep(run, args.data_dir, args.spec, STORES)]
    write_json(args.out, rows)
    print("| run | setting | Recall@50 | share of exhaustive | NDCG@50 | items scored | token bytes / item | index MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['recall_ratio']:.3f}" if "recall_ratio" in r else "1"
        size = f"{r['index_bytes'] / 2**20:.1f}" if "index_bytes" in r else "-"
        per_item = f"{r['token_bytes_per_item']:.0f}" if "token_bytes_per_item" in r else "-"
        print(f"| {r['run']} | {r['setting']} | {r['recall@50']:.4f} | {ratio} | {r['ndcg@50']:.4f} | "
              f"{r['scored_fraction']:.3f} | {per_item} | {size} |")


if __name__ == "__main__":
    main()
