"""Glue between a model and the pointwise metrics of protocol P4 (pre-ranking).

A part's labelled rows are scored with ``model.score_pairs`` (one logit per row, the number the
model trains on) in fixed blocks, so the metrics never depend on a batch size. AUC and GAUC rank
the logits; log loss reads the probabilities ``sigmoid(logit)``, computed in float64 so that a
confident row is not rounded to exactly 0 or 1.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.special import expit

from crosstower.config import POINTWISE_METRICS, RunConfig
from crosstower.data.batching import PointwiseRows
from crosstower.data.dataset import Dataset
from crosstower.data.features import part_row_statistics
from crosstower.data.splits import Split
from crosstower.errors import TrainingError
from crosstower.evaluate.pointwise import auc, gauc, log_loss
from crosstower.models.base import Recommender
from crosstower.nn.fields import row_values

__all__ = ["POINTWISE_METRICS", "ROW_BLOCK", "evaluate_labelled", "evaluate_rows", "higher_is_better", "part_rows"]

ROW_BLOCK = 4096  # rows scored per call, whatever the training batch size


def higher_is_better(metric: str) -> bool:
    """The direction of an early-stopping metric: log loss is the one that falls."""
    return metric != "logloss"


@torch.no_grad()
def row_logits(model: Recommender, rows: PointwiseRows) -> np.ndarray:
    """``score_pairs`` of every row, float64 ``[len(rows)]`` (the model is put in eval mode)."""
    was_training = model.training
    model.eval()
    device = model.device
    parts = []
    for index in np.array_split(np.arange(len(rows)), max(1, -(-len(rows) // ROW_BLOCK))):
        batch = rows.batch(index).to(device)
        with row_values(model, batch.row_values()):  # the rows' own statistics, if they have any
            parts.append(model.score_pairs(batch.user, batch.items).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros(0)


def evaluate_rows(model: Recommender, rows: PointwiseRows) -> tuple[dict[str, float], float]:
    """AUC, GAUC, log loss and the row count of ``model`` on ``rows``, and the seconds it took."""
    start = time.perf_counter()
    logits = row_logits(model, rows)
    if not np.isfinite(logits).all():
        raise TrainingError("score_pairs returned non-finite logits: the model diverged; lower train.lr")
    probabilities = expit(logits)
    metrics = {
        "auc": auc(rows.labels, logits),
        "gauc": gauc(rows.users, rows.labels, logits),
        "logloss": log_loss(rows.labels, probabilities),
        "rows": int(len(rows)),
    }
    return metrics, time.perf_counter() - start


def part_rows(
    split: Split, part: str, num_users: int, history_length: int,
    row_statistics: dict[str, dict[str, np.ndarray]] | None = None,
) -> PointwiseRows:
    """The labelled rows of ``part`` ("train", "val" or "test") with their model input;
    ``row_statistics`` (side -> field -> one value per row, from
    :func:`~crosstower.data.features.ordered_row_statistics`) replace the tables' statistics."""
    if split.labelled is None:
        raise ValueError(f"split {split.protocol} has no labelled rows (protocol p4 only)")
    stats = row_statistics or {}
    return PointwiseRows(
        split.labelled[part], split.train, history_length, num_users, training=part == "train",
        user_values=stats.get("user"), item_values=stats.get("item"),
    )


def evaluate_labelled(
    model: Recommender, dataset: Dataset, split: Split, part: str, config: RunConfig
) -> tuple[dict[str, float], float]:
    """:func:`evaluate_rows` on ``split``'s labelled ``part`` under the run config's history length
    and statistics."""
    stats = part_row_statistics(dataset, split, part, config.split.statistics)
    return evaluate_rows(model, part_rows(split, part, dataset.num_users, config.train.history_length, stats))
