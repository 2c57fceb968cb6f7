"""Glue between a model and the full-ranking evaluator: one call per split part."""

from __future__ import annotations

import time

import numpy as np
import torch

from crosstower.config import RunConfig
from crosstower.data.batching import eval_user_input
from crosstower.data.splits import EvalUsers
from crosstower.evaluate.ranking import Scorer, evaluate_ranking, evaluate_retrieved
from crosstower.models.base import EmbeddingRecommender, Recommender

# Users are encoded in fixed blocks of this many, whatever the evaluation batch size, so that a
# user's vector (and hence the metrics) never depends on ``user_batch``.
ENCODE_BLOCK = 1024


@torch.no_grad()
def evaluate_model(
    model: Recommender,
    block: EvalUsers,
    num_items: int,
    history_length: int,
    ks: list[int],
    user_batch: int = 256,
    item_chunk: int = 65536,
    progress: bool = False,
) -> tuple[dict[str, float], float]:
    """Exhaustive full-ranking metrics of ``model`` on ``block`` and the seconds it took."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    scorer = _scorer(model, block, history_length)
    metrics = evaluate_ranking(
        scorer, len(block), num_items, block.exclude, block.targets, tuple(ks), user_batch, item_chunk, progress
    )
    model.train(was_training)
    return metrics, time.perf_counter() - start


def evaluate_split(
    model: Recommender, block: EvalUsers, num_items: int, config: RunConfig, progress: bool = False
) -> tuple[dict[str, float], float]:
    """:func:`evaluate_model` with the run config's history length and evaluation settings."""
    cfg = config.evaluate
    return evaluate_model(
        model, block, num_items, config.train.history_length, cfg.ks, cfg.user_batch, cfg.item_chunk, progress
    )


@torch.no_grad()
def evaluate_served(
    model, index, block: EvalUsers, num_items: int, config: RunConfig
) -> tuple[dict[str, float], float]:
    """Metrics of the index's answers, ranked against the same targets as exhaustive scoring.

    A sparse code index gives every user's summed posting lists as dense scores
    (:meth:`SparseCodeIndex.dense_scores`), ranked by the same evaluator as exhaustive scoring, so
    the two differ only by what the index did not keep. A late-interaction index returns its own
    top-k from its candidates; items it never scored cannot be hits.
    """
    from crosstower.index import LateInteractionIndex

    model.eval()
    start = time.perf_counter()
    length, cfg = config.train.history_length, config.evaluate
    if isinstance(index, LateInteractionIndex):

        def retrieve(rows: np.ndarray) -> torch.Tensor:
            users = model.encode_user_tokens(eval_user_input(block, rows, length))
            return index.search(users, max(cfg.ks), block.exclude.take(rows))[1]

        metrics = evaluate_retrieved(retrieve, len(block), num_items, block.exclude, block.targets, cfg.ks, cfg.user_batch)
        return metrics, time.perf_counter() - start

    def scorer(rows: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        queries = model.code_queries(eval_user_input(block, rows, length))
        return index.dense_scores(queries.codes, queries.vectors)[:, lo:hi]

    metrics = evaluate_ranking(
        scorer, len(block), num_items, block.exclude, block.targets, tuple(cfg.ks), cfg.user_batch, num_items
    )
    return metrics, time.perf_counter() - start


def _scorer(model: Recommender, block: EvalUsers, history_length: int) -> Scorer:
    device = model.device
    if isinstance(model, EmbeddingRecommender):
        # Encode every evaluated user once (not once per item chunk), in fixed blocks.
        user_vectors = torch.cat([
            model.encode_users(
                eval_user_input(block, np.arange(lo, min(lo + ENCODE_BLOCK, len(block))), history_length).to(device)
            )
            for lo in range(0, len(block), ENCODE_BLOCK)
        ])
        item_vectors = model.item_vectors()
        return lambda rows, lo, hi: user_vectors[torch.from_numpy(rows).to(device)] @ item_vectors[lo:hi].T
    item_scorer = model.item_scorer()
    return lambda rows, lo, hi: item_scorer(eval_user_input(block, rows, history_length).to(device), lo, hi)
