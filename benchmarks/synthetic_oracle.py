"""How far a perfect model could go on the synthetic default: ranking by the generator's own
probabilities, P2 test users, the same evaluator and exclusions as every run.

    python benchmarks/synthetic_oracle.py [--out benchmarks/out/synthetic_oracle.json]

Two rankers, both knowing the true taste table ``L[g, c, s]`` and popularity:

* **latent oracle**: also knows each user's true interest clusters, so it ranks by the exact
  ``P(i | u) = p * mean_{c in I_u} mean_{s liked by (g, c)} pop_i / pop(c, s) + (1 - p) pop_i / pop``;
* **history oracle**: estimates the interests from the clusters of the user's input history
  (clusters seen at least twice, weighted by count; all seen clusters if none repeats).

No model can beat the first; the second is what the planted structure allows once the interests
are read from the history as a model must. The gap between them and a trained model is what is
left to learn (mostly the 12,800-entry taste table, from about 130k training interactions).

A third ranker asks how sparse that structure is for SparCode: the **code-index oracle** is a
:class:`~crosstower.index.SparseCodeIndex` whose codes are (segment, cluster) pairs, each posting
list the generator's ``p * P(i | segment, cluster)`` (non-zero only on the cluster's items in a
liked style), with ``(1 - p) * pop_i / pop`` as the item prior; a user's tokens are the history
items of the history oracle's clusters, each coded (segment, its cluster), and the index serves
them as it serves a trained model (``search``, the same exclusions). It differs from the history
oracle only in that the prior is not rescaled by the number of tokens (and in the float16
rounding of the stored scores). It reports the share of the (code x item) table kept.
``--history-length 20`` lets both history rankers read only what the models read (the last 20
input items).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstower.data import synthetic  # noqa: E402
from crosstower.data.splits import EvalUsers, make_split  # noqa: E402
from crosstower.evaluate.ranking import evaluate_ranking, evaluate_retrieved  # noqa: E402
from crosstower.files import write_json  # noqa: E402
from crosstower.index import SparseCodeIndex  # noqa: E402


def interest_probabilities(weights: np.ndarray, segment: np.ndarray, taste: np.ndarray, bucket_share: np.ndarray,
                           cluster: np.ndarray, style: np.ndarray) -> np.ndarray:
    """``[U, N]``: P(item | interest mode) given per-user interest weights ``[U, K]`` over clusters.

    Within an interest cluster c the generator draws a liked style of the user's segment
    uniformly, then an item of that (c, s) bucket by popularity (``bucket_share``).
    """
    liked = taste[segment]  # [U, K, S]
    per_style = liked / np.maximum(liked.sum(-1, keepdims=True), 1)  # uniform over liked styles
    return weights[:, cluster] * per_style[:, cluster, style] * bucket_share[None, :]


def code_index(segments: int, taste: np.ndarray, cluster: np.ndarray, style: np.ndarray,
               bucket_share: np.ndarray, overall: np.ndarray, p: float) -> SparseCodeIndex:
    """The planted structure as a SparCode index: code (g, c) -> ``p * P(i | g, c)`` for the items
    of cluster c in a style that segment g likes; the popularity mode is the item prior."""
    clusters = taste.shape[1]
    codes = np.stack(np.meshgrid(np.arange(segments), np.arange(clusters), indexing="ij"), -1).reshape(-1, 2)

    def score_codes(chunk: torch.Tensor) -> torch.Tensor:
        g, c = chunk[:, 0].numpy(), chunk[:, 1].numpy()
        weights = np.zeros((len(chunk), clusters))
        weights[np.arange(len(chunk)), c] = 1.0
        return torch.from_numpy(p * interest_probabilities(weights, g, taste, bucket_share, cluster, style)).float()

    return SparseCodeIndex.build(score_codes, codes, codes.astype(np.float32), len(cluster), max(segments, clusters),
                                 item_prior=(1 - p) * overall, progress=False)


def history_codes(segment: np.ndarray, histories: list[np.ndarray], repeated: np.ndarray) -> torch.Tensor:
    """``[U, T, 2]`` code tuples: one token (segment, cluster) per history item whose cluster has
    weight in ``repeated`` [U, C] (the history oracle's clusters); -1 rows pad."""
    kept = [h[repeated[u, h] > 0] for u, h in enumerate(histories)]
    codes = -np.ones((len(kept), max(len(k) for k in kept), 2), dtype=np.int64)
    for u, clusters in enumerate(kept):
        codes[u, : len(clusters)] = np.stack([np.full(len(clusters), segment[u]), clusters], -1)
    return torch.from_numpy(codes)


def served(index: SparseCodeIndex, queries: torch.Tensor, block: EvalUsers, num_items: int) -> dict[str, float]:
    """The metrics of the index's top-50 answers (the evaluator's targets and exclusions), with the
    index's size and the mean number of tokens a user reads."""
    metrics = evaluate_retrieved(lambda rows: index.search(queries[rows], 50, block.exclude.take(rows))[1],
                                 len(block), num_items, block.exclude, block.targets, (20, 50))
    tokens = float((queries[..., 0] >= 0).sum(1).float().mean())
    return {**{k: round(v, 4) for k, v in metrics.items()}, "codes": index.num_codes,
            "kept_fraction": round(index.kept_fraction, 5), "index_bytes": index.nbytes(), "mean_tokens": round(tokens, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/synthetic_oracle.json"))
    parser.add_argument("--history-length", type=int, default=None,
                        help="read only each user's last N input items, as the models do (train.history_length 20); "
                             "default: the whole input history")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = synthetic.SyntheticConfig()
    dataset = synthetic.generate(cfg)
    tables = synthetic._static_tables(cfg)
    truth = dataset.metadata[synthetic.NAME]
    raw = np.asarray(dataset.item_ids).astype(np.int64)  # item index -> raw item id
    items = tables.items.set_index("item_id").loc[raw]
    cluster, style = items["cluster"].to_numpy(), items["style"].to_numpy()
    popularity = tables.popularity[raw]
    bucket = cluster * cfg.num_styles + style
    all_buckets = tables.items["cluster"].to_numpy() * cfg.num_styles + tables.items["style"].to_numpy()
    bucket_mass = np.bincount(all_buckets, weights=tables.popularity, minlength=cfg.num_clusters * cfg.num_styles)
    bucket_share = popularity / bucket_mass[bucket]
    overall = popularity / tables.popularity.sum()

    block = make_split(dataset, "p2").test
    segment = truth["segment"][block.users]
    interests = truth["interests"][block.users]
    latent = np.zeros((len(block), cfg.num_clusters))
    rows, slots = np.nonzero(interests >= 0)
    latent[rows, interests[rows, slots]] = 1.0
    recent = slice(-args.history_length, None) if args.history_length else slice(None)
    histories = [cluster[block.history.row(r)[recent]] for r in range(len(block))]  # the input items' clusters
    seen = np.stack([np.bincount(h, minlength=cfg.num_clusters) for h in histories])
    repeated = np.where((seen >= 2).any(1, keepdims=True), np.where(seen >= 2, seen, 0), seen).astype(np.float64)

    p = cfg.interest_mode_probability
    results = {}
    for name, weights in (("latent oracle", latent), ("history oracle", repeated)):
        weights = weights / np.maximum(weights.sum(1, keepdims=True), 1e-12)
        scores = torch.from_numpy(
            p * interest_probabilities(weights, segment, tables.taste, bucket_share, cluster, style)
            + (1 - p) * overall[None, :]
        )
        metrics = evaluate_ranking(lambda r, lo, hi: scores[torch.from_numpy(r), lo:hi], len(block),
                                   dataset.num_items, block.exclude, block.targets, (20, 50))
        results[name] = {k: round(v, 4) for k, v in metrics.items()}
        print(f"{name}: Recall@50 {metrics['recall@50']:.4f}  NDCG@50 {metrics['ndcg@50']:.4f}  "
              f"Precision@50 {metrics['precision@50']:.4f}")

    index = code_index(cfg.num_segments, tables.taste, cluster, style, bucket_share, overall, p)
    queries = history_codes(segment, histories, repeated)
    results["code-index oracle"] = served(index, queries, block, dataset.num_items)
    print(f"code-index oracle: Recall@50 {results['code-index oracle']['recall@50']:.4f}  {index.num_codes} codes, "
          f"{index.kept_fraction:.2%} of the table kept, {index.nbytes() / 1e6:.2f} MB")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
