"""Cross attention of a teacher and virtual cross attention of a two-tower student (VIRT, DiDE).

A cross encoder over ``[user tokens ; item tokens]`` has four attention blocks; its user->item
(``ui``) and item->user (``iu``) blocks are where user and item meet. A two-tower student has no
such blocks, but each tower's layer computes queries and keys over its own tokens, so the
student's *virtual* cross attention of a pair is ``softmax(Q_user K_item^T / sqrt(d_h))`` (and
the other way round) from the two towers' queries and keys at that layer. This module reads
both sides' queries and keys for the same (user, item) pairs, one layer at a time, so that a
method only chooses the layers and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from crosstower.distill.teacher import Teacher
from crosstower.errors import ConfigError
from crosstower.losses import CandidateLogits
from crosstower.models.base import EmbeddingRecommender

Pairs = Literal["positives", "candidates"]
CROSS_BLOCKS = ("ui", "iu")  # user queries x item keys, item queries x user keys


@dataclass
class PairQK:
    """One layer's queries and keys ``[P, H, L, d_h]`` of the user and the item tokens of ``P``
    pairs, with the token masks ``[P, L]`` (True = a real token)."""

    user_queries: torch.Tensor
    user_keys: torch.Tensor
    item_queries: torch.Tensor
    item_keys: torch.Tensor
    user_mask: torch.Tensor
    item_mask: torch.Tensor

    def logits(self, block: str) -> torch.Tensor:
        """The pre-softmax cross-attention logits of ``block`` (``"ui"`` or ``"iu"``),
        ``Q K^T / sqrt(d_h)``: ``[P, H, L_u, L_i]`` for ui, ``[P, H, L_i, L_u]`` for iu."""
        queries, keys = (self.user_queries, self.item_keys) if block == "ui" else (self.item_queries, self.user_keys)
        return queries @ keys.transpose(-1, -2) / queries.shape[-1] ** 0.5

    def masks(self, block: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query mask, key mask)`` of ``block``."""
        return (self.user_mask, self.item_mask) if block == "ui" else (self.item_mask, self.user_mask)


def student_pairs(logits: CandidateLogits, user_layer: int, item_layer: int, pairs: Pairs) -> PairQK:
    """The student's queries and keys for each row's positive pair (``positives``: ``P = B``) or
    every candidate pair (``candidates``: ``P = B (1 + K)``, row-major, the positive first), from
    ``candidate_logits(batch, with_states=True)`` of the dual encoder."""
    states = logits.states
    user, item = states["user_traces"][user_layer], states["item_traces"][item_layer]
    rows = states["item_rows"]
    user_mask, item_mask = states["user_states"].mask, states["item_mask"]
    if pairs == "positives":
        rows, item_mask = rows[:, 0], item_mask[:, 0]
        repeat = 1
    else:
        rows, item_mask = rows.reshape(-1), item_mask.reshape(-1, item_mask.shape[-1])
        repeat = states["item_rows"].shape[1]
    return PairQK(user.queries.repeat_interleave(repeat, dim=0), user.keys.repeat_interleave(repeat, dim=0),
                  item.queries[rows], item.keys[rows], user_mask.repeat_interleave(repeat, dim=0), item_mask)


def teacher_pairs(out, layer: int) -> tuple[PairQK, dict[str, torch.Tensor]]:
    """The teacher's queries and keys at ``layer`` of the pairs of a :class:`CrossOutput` ``out``,
    split into the user and the item positions, and its post-softmax ``ui`` / ``iu`` blocks (the
    literal slice of its attention, whose rows need not sum to 1 over the other side)."""
    trace, u = out.traces[layer], out.user_length
    qk = PairQK(trace.queries[:, :, :u], trace.keys[:, :, :u], trace.queries[:, :, u:], trace.keys[:, :, u:],
                out.mask[:, :u], out.mask[:, u:])
    return qk, {block: out.block(trace.attention, block) for block in CROSS_BLOCKS}


def check_aligned(student: EmbeddingRecommender, teacher: Teacher, method: str, same_heads: bool = True,
                  remedy: str = "") -> None:
    """Attention terms pair the teacher's token positions (and, with ``same_heads``, its heads)
    one to one with the student's: the teacher must be a cross encoder over the same token
    sequences, with both cross blocks on. ``remedy`` ends each error (how to do without)."""
    model, remedy = teacher.model, f" ({remedy})" if remedy else ""
    if not hasattr(model, "cross_attention") or getattr(model, "substrate", None) is None:
        raise ConfigError(f"distill.teacher: {method} reads a cross encoder's attention; {teacher.name} "
                          f"({teacher.source}) has none{remedy}")
    if not hasattr(student, "user_states"):
        raise ConfigError(f"model: {method} reads the student's token states; use the transformer dual encoder "
                          f"(model.name: dual){remedy}")
    mine = (student.substrate.user_length, student.substrate.item_length)
    theirs = (model.substrate.user_length, model.substrate.item_length)
    if mine != theirs:
        raise ConfigError(f"distill.teacher: {method} needs the teacher's token sequences (user {theirs[0]}, item "
                          f"{theirs[1]} tokens) to match the student's (user {mine[0]}, item {mine[1]}): give both "
                          f"the same fields and train.history_length{remedy}")
    if same_heads and model.config.heads != student.config.heads:
        raise ConfigError(f"distill.teacher: {method} pairs attention heads one to one; the teacher has "
                          f"{model.config.heads}, the student model.heads {student.config.heads}{remedy}")
    blocks = getattr(model.config, "blocks", None)
    if blocks is not None and not (blocks.ui and blocks.iu):
        raise ConfigError(f"distill.teacher: {method} distils the user->item and item->user blocks; "
                          f"{teacher.name} was trained with one of them off{remedy}")
