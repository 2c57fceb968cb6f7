"""Glue between a model and the full-ranking evaluator: one call per split part."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from crosstower.config import RunConfig
from crosstower.data.batching import eval_user_input
from crosstower.data.splits import EvalUsers
from crosstower.evaluate.ranking import evaluate_ranking, evaluate_retrieved
from crosstower.models.base import ENCODE_BLOCK, Recommender


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
    scorer = model.ranking_scorer(lambda rows: eval_user_input(block, rows, history_length), len(block))
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
    model: Recommender, index: Any, block: EvalUsers, num_items: int, config: RunConfig
) -> tuple[dict[str, float], float]:
    """Metrics of the top-k lists that ``index`` returns for ``model``'s queries, ranked against
    the same targets as exhaustive scoring.

    Any index serves through the one protocol: the model encodes a block of users into the
    index's query (:meth:`~crosstower.models.base.Recommender.index_query`), the index searches.
    Users are encoded in the fixed blocks that exhaustive evaluation encodes them in, so an exact
    index sees the very vectors exhaustive scoring ranked; items an approximate index never
    scored cannot be hits.
    """
    model.eval()
    start = time.perf_counter()
    length, cfg = config.train.history_length, config.evaluate
    k = max(cfg.ks)
    top = torch.full((len(block), k), -1, dtype=torch.int64)
    for lo in range(0, len(block), ENCODE_BLOCK):
        rows = np.arange(lo, min(lo + ENCODE_BLOCK, len(block)))
        query = model.index_query(eval_user_input(block, rows, length).to(model.device))
        top[lo : lo + len(rows)] = index.search(query, k, block.exclude.take(rows))[1]
    metrics = evaluate_retrieved(lambda rows: top[torch.from_numpy(rows)], len(block), num_items, block.exclude,
                                 block.targets, cfg.ks, cfg.user_batch)
    return metrics, time.perf_counter() - start
