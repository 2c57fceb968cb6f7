"""Training losses as pure functions of logits, shared by every model."""

from __future__ import annotations

import torch


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
