"""Training losses as pure functions of logits, shared by every model (and by distillers).

A model says what it scores, :meth:`~crosstower.models.base.Recommender.candidate_logits` (a
:class:`CandidateLogits`) or :meth:`~crosstower.models.base.Recommender.pair_logits` (a
:class:`PairLogits`); the functions here turn those into losses. Keeping the two apart is what
lets a distiller put a teacher's and a student's logits on the same candidates into one loss
without reaching into either model's ``loss()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class CandidateLogits:
    """One batch's logits on its candidates, with what a listwise loss needs to correct them.

    Row ``b`` has its positive, its ``K`` sampled negatives and, with in-batch negatives, every
    row's positive (``in_batch[b, j]`` scores row ``b``'s user against row ``j``'s positive; the
    diagonal and other accidental hits are masked). Masks are True where a candidate is dropped;
    a log-Q term is subtracted from its logit (the sampled-softmax correction). ``states`` holds
    what the model computed on the way (hidden states, attention, token scores) for the model's
    own extra loss terms and, on request, for distillation.
    """

    positive: torch.Tensor  # [B]
    sampled: torch.Tensor  # [B, K], K may be 0
    sampled_mask: torch.Tensor  # bool [B, K]
    in_batch: torch.Tensor | None = None  # [B, B]
    in_batch_mask: torch.Tensor | None = None  # bool [B, B]
    positive_log_q: torch.Tensor | None = None  # [B]
    sampled_log_q: torch.Tensor | None = None  # [B, K]
    states: dict[str, Any] = field(default_factory=dict)

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every negative logit ``[B, K (+ B)]`` with its mask and log-Q (in-batch column ``j``
        takes row ``j``'s positive log-Q: that is the candidate it is)."""
        logits, mask, log_q = self.sampled, self.sampled_mask, self.sampled_log_q
        if self.in_batch is not None and self.in_batch_mask is not None:
            logits = torch.cat([logits, self.in_batch], dim=1)
            mask = torch.cat([mask, self.in_batch_mask], dim=1)
            if log_q is not None:
                log_q = torch.cat([log_q, self.positive_log_q[None, :].expand(len(self.positive), -1)], dim=1)
        return logits, mask, log_q


@dataclass
class PairLogits:
    """Logits ``[B]`` of labelled (user, item) rows (protocol P4), and what the model computed on
    the way (``states``), as in :class:`CandidateLogits`."""

    logits: torch.Tensor
    states: dict[str, Any] = field(default_factory=dict)


def sampled_softmax(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
    positive_log_q: torch.Tensor | None = None,
    negative_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of ``-log softmax`` of the positive among ``[positive, negatives]``.

    ``positive_logits`` is ``[B]``, ``negative_logits`` ``[B, K]``. ``negative_mask`` (True =
    drop) removes accidental hits. When log-Q terms are given they are subtracted from the
    logits (the sampled-softmax correction, see :mod:`crosstower.data.sampling`).
    """
    if positive_log_q is not None:
        positive_logits = positive_logits - positive_log_q
    if negative_log_q is not None:
        negative_logits = negative_logits - negative_log_q
    if negative_mask is not None:
        negative_logits = negative_logits.masked_fill(negative_mask, float("-inf"))
    logits = torch.cat([positive_logits[:, None], negative_logits], dim=1)
    return -(positive_logits - torch.logsumexp(logits, dim=1)).mean()


def listwise_softmax(logits: CandidateLogits) -> torch.Tensor:
    """:func:`sampled_softmax` of a batch's :class:`CandidateLogits`: the positive against every
    sampled and in-batch negative, accidental hits dropped, log-Q corrected."""
    negative_logits, mask, log_q = logits.negatives()
    return sampled_softmax(logits.positive, negative_logits, mask, logits.positive_log_q, log_q)


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of logits against 0/1 labels (the pointwise loss of P4)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def info_nce(z_users: torch.Tensor, z_items: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows ``r`` of ``-log softmax_j(cos(z_u^r, z_i^j) / tau)[r]`` (IntTower's CIR).

    ``z_users``, ``z_items`` are ``[P, d]`` (normalised here) for ``P`` positive pairs; ``items``
    ``[P]`` are their item ids, and a column ``j != r`` with row ``r``'s item is dropped (the
    same item is not a negative of itself). Zero when ``P < 2``.
    """
    if len(items) < 2:
        return z_users.sum() * 0.0  # keeps the graph (and the device) of the inputs
    logits = F.normalize(z_users, dim=-1) @ F.normalize(z_items, dim=-1).T / temperature
    same = items[:, None] == items[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(items), device=logits.device))
