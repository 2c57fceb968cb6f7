"""Which (code, item) scores a SparCode posting list keeps.

The encoder's scores pass through ReLU, so most are exactly 0 and need not be stored; keeping
only the positive (or the top-L, or the scores above a threshold) is what makes the table small.
A :class:`UsageBudget` shares a size budget among the codes by how many indexing tokens took
each. Kept scores are stored as float16.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np
import torch


@dataclass(frozen=True)
class UsageBudget:
    """Keep about ``share`` of the (code x item) table, shared among the codes by their use.

    Code ``c`` keeps its top ``L_c = floor(share * C * N * w_c / sum(w))`` positive scores, with
    ``w_c = usage_c ** exponent`` (``usage_c``: how many indexing tokens took code ``c``). Why:
    a uniform top-L gives a code that one token took as long a posting list as a code that
    thousands took, while the served accuracy is an average over users. Measured on the synthetic
    default (docs/results.md), at 1% kept, exponent 0.5 served a clearly higher Recall@50 than
    the uniform top-L. Exponent 0 is the uniform top-L (``L = floor(share * N)``); the kept share
    never exceeds ``share`` (the floors and the cap at ``N`` may leave it a little under).
    """

    share: float
    exponent: float = 0.5

    def as_dict(self) -> dict[str, float]:
        return {"share": self.share, "usage_exponent": self.exponent}


Keep = Union[str, int, float, UsageBudget, Mapping[str, float]]
"""``"nonzero"`` (scores > 0), an int L (top-L positive scores per code), a float t >= 0
(scores > t), or a :class:`UsageBudget` (also as its ``as_dict()`` mapping, as saved)."""


class KeepRule(NamedTuple):
    """A parsed keep rule: ``mode`` is "threshold" (``value`` t), "top" (``value`` L) or
    "budget" (``value`` the share, ``exponent`` the usage exponent)."""

    mode: str
    value: float
    exponent: float = 0.0


FLOAT16_MAX = float(np.finfo(np.float16).max)


def parse_keep(keep: Keep) -> KeepRule:
    """The rule ``keep`` names; ``"nonzero"`` is the threshold 0."""
    what = "keep must be 'nonzero', an int L, a float threshold or a usage budget"
    if isinstance(keep, Mapping):
        if set(keep) != {"share", "usage_exponent"}:
            raise ValueError(f"{what}: a budget mapping needs exactly 'share' and 'usage_exponent', got {sorted(keep)}")
        keep = UsageBudget(float(keep["share"]), float(keep["usage_exponent"]))
    if isinstance(keep, UsageBudget):
        if not 0 < keep.share <= 1 or not 0 <= keep.exponent < math.inf:
            raise ValueError(f"a usage budget needs 0 < share <= 1 and a finite exponent >= 0, got {keep}")
        return KeepRule("budget", float(keep.share), float(keep.exponent))
    if isinstance(keep, str):
        if keep != "nonzero":
            raise ValueError(f"{what}, got '{keep}'")
        return KeepRule("threshold", 0.0)
    if isinstance(keep, bool):
        raise ValueError(f"{what}, got a bool")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep=L needs L >= 1, got {keep}")
        return KeepRule("top", int(keep))
    if isinstance(keep, numbers.Real):
        # A negative threshold would store negative scores, which would then rank below the
        # implicit 0 of the items that are not stored: the index would contradict itself.
        if not math.isfinite(keep) or keep < 0:
            raise ValueError(f"keep threshold must be finite and >= 0, got {keep}")
        return KeepRule("threshold", float(keep))
    raise ValueError(f"{what}, got {type(keep).__name__}")


def canonical_keep(keep: Keep) -> Keep:
    """``keep`` in a JSON-friendly form (no numpy scalars; a budget as a mapping), as
    ``meta()["keep"]`` holds it."""
    rule = parse_keep(keep)
    if isinstance(keep, str):
        return keep
    if rule.mode == "budget":
        return UsageBudget(rule.value, rule.exponent).as_dict()
    return int(rule.value) if rule.mode == "top" else rule.value


def usage_allocation(usage: np.ndarray, share: float, exponent: float, num_items: int) -> np.ndarray:
    """Entries per code under a :class:`UsageBudget`: ``floor(share * C * N * w_c / sum(w))`` with
    ``w = usage ** exponent``, at most ``N`` (int64 ``[C]``)."""
    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 1 or len(usage) == 0 or (usage < 0).any():
        raise ValueError(f"code usage must be a non-empty vector of counts >= 0, got shape {usage.shape}")
    weights = usage**exponent
    if weights.sum() <= 0:
        raise ValueError("a usage budget needs some code with usage > 0")
    budget = share * len(usage) * num_items
    # The small tolerance keeps an exact product (e.g. 0.01 * 3000 = 30) from flooring to 29.
    return np.minimum(np.floor(budget * weights / weights.sum() + 1e-9), num_items).astype(np.int64)


def _top_l(scores: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest entries per row, ties at the boundary going to the lower item index.

    ``torch.topk`` picks arbitrarily among ties; taking one extra value shows which rows have a
    tie at the boundary that matters (a positive one), and only those pay for a stable sort.
    """
    width = scores.shape[1]
    if top >= width:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    vals, cols = torch.topk(scores, top + 1, dim=1, sorted=True)
    tied = ((vals[:, top] == vals[:, top - 1]) & (vals[:, top - 1] > 0)).nonzero().flatten()
    vals, cols = vals[:, :top].clone(), cols[:, :top].clone()
    if len(tied):
        tvals, tcols = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        vals[tied], cols[tied] = tvals[:, :top], tcols[:, :top]
    return vals, cols


def keep_entries(scores: torch.Tensor, rule: KeepRule, limits: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Kept entries of a chunk of code rows as (counts per row, items, scores) in CSR order.

    Under "top" and "budget" row ``r`` keeps its ``limits[r]`` best positive scores
    (:func:`row_limits`); a threshold needs no limits."""
    if rule.mode == "threshold":
        rows, cols = (scores > rule.value).nonzero(as_tuple=True)  # row-major: rows, then items, ascending
        vals = scores[rows, cols]
    else:
        width = scores.shape[1]
        per_row = torch.from_numpy(limits)
        top = int(per_row.max()) if len(per_row) else 0
        if top == 0:
            vals, cols = scores[:, :0], torch.zeros(scores.shape[0], 0, dtype=torch.int64)
        else:
            vals, cols = _top_l(scores, top)
        kept = (vals > 0) & (torch.arange(vals.shape[1]) < per_row.unsqueeze(1))
        cols = torch.where(kept, cols, width)  # dropped entries sort last, then are cut
        cols, order = torch.sort(cols, dim=1)
        vals = vals.gather(1, order)
        rows, pos = (cols < width).nonzero(as_tuple=True)
        cols, vals = cols[rows, pos], vals[rows, pos]
    counts = torch.bincount(rows, minlength=scores.shape[0])
    if len(vals) and float(vals.max()) > FLOAT16_MAX:
        raise ValueError(f"a kept score {float(vals.max()):.4g} exceeds the float16 range ({FLOAT16_MAX}); "
                         "rescale the scores")
    return counts.numpy().astype(np.int64), cols.numpy().astype(np.int32), vals.numpy().astype(np.float16)


def row_limits(rule: KeepRule, usage: np.ndarray | None, num_items: int, num_codes: int) -> np.ndarray | None:
    """Entries each code row may keep under a "top" or "budget" rule (None for a threshold)."""
    if rule.mode == "threshold":
        return None
    if rule.mode == "top":
        return np.full(num_codes, int(rule.value), dtype=np.int64)
    if usage is None:
        raise ValueError("a usage budget needs the codes' usage (code_usage), and this index has none")
    return usage_allocation(usage, rule.value, rule.exponent, num_items)
