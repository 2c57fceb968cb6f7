"""Pointwise metrics for pre-ranking (protocol P4): AUC, GAUC and log loss.

AUC is computed from ranks (Mann-Whitney U) rather than by sorting thresholds, so tied scores
count one half, exactly like the pairwise definition P(score+ > score-) + 0.5 P(score+ = score-).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import rankdata


def _labels(labels: ArrayLike) -> np.ndarray:
    """Binary labels as float64 0/1; anything else is a caller error worth a clear message."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("labels are empty")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    return y.astype(np.float64)


def _scores(scores: ArrayLike, n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like the labels, got {s.shape}")
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN")
    return s


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; ties between a positive and a negative count one half."""
    y = _labels(labels)
    s = _scores(scores, len(y))
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels; got only one class")
    rank_sum = rankdata(s, method="average")[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(user_ids: ArrayLike, labels: ArrayLike, scores: ArrayLike) -> float:
    """Group AUC: per-user AUC averaged with weights = the user's number of rows.

    Users with a single class have no AUC and are left out (weights included), as in the
    DIN/IntTower papers. Ranks are taken within each user in one grouped pass, no loop over users.
    """
    y = _labels(labels)
    s = _scores(scores, len(y))
    u = np.asarray(user_ids)
    if u.shape != y.shape:
        raise ValueError(f"user_ids must have shape {y.shape} like the labels, got {u.shape}")
    frame = pd.DataFrame({"user": u, "y": y, "s": s})
    frame["rank_pos"] = frame.groupby("user", sort=False)["s"].rank(method="average") * frame["y"]
    per_user = frame.groupby("user", sort=False).agg(
        n=("y", "size"), pos=("y", "sum"), rank_pos=("rank_pos", "sum")
    )
    n, pos = per_user["n"].to_numpy(np.float64), per_user["pos"].to_numpy(np.float64)
    neg = n - pos
    keep = (pos > 0) & (neg > 0)
    if not keep.any():
        raise ValueError("GAUC needs at least one user with both positive and negative labels")
    rank_pos = per_user["rank_pos"].to_numpy(np.float64)[keep]
    pos, neg, n = pos[keep], neg[keep], n[keep]
    user_auc = (rank_pos - pos * (pos + 1) / 2) / (pos * neg)
    return float((user_auc * n).sum() / n.sum())


def log_loss(labels: ArrayLike, probabilities: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1-eps] so a confident
    mistake costs a large but finite amount instead of infinity."""
    y = _labels(labels)
    p = _scores(probabilities, len(y), "probabilities")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
