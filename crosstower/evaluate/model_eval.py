"""Glue between a model and the full-ranking evaluator: one call per split part."""

from __future__ import annotations

import time

import numpy as np
import torch

from crosstower.data.batching import eval_user_input
from crosstower.data.splits import EvalUsers
from crosstower.evaluate.ranking import evaluate_ranking
from crosstower.models.base import Recommender


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
    item_scorer = model.item_scorer()

    def scorer(rows: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        return item_scorer(eval_user_input(block, rows, history_length), lo, hi)

    metrics = evaluate_ranking(
        scorer, len(block), num_items, block.exclude, block.targets, tuple(ks), user_batch, item_chunk, progress
    )
    model.train(was_training)
    return metrics, time.perf_counter() - start
