"""Distillation losses as pure functions (methods.md §0.3, §2, §3, §7).

Every function takes the teacher's side as it is and detaches it: a distillation term trains
the student only (``sg`` in methods.md). Where a method wants the teacher trained too (PFD's
joint teacher) it adds the teacher's own supervised loss as a separate term.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from crosstower.losses import CandidateLogits

Kernel = Literal["softmax", "pkt"]


def candidate_matrix(logits: CandidateLogits) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate's raw logit ``[B, C]`` (positive first, then sampled, then in-batch) and
    the mask of the dropped ones (True = drop: accidental hits, the in-batch diagonal). No log-Q
    correction: a distillation target is the teacher's distribution over the very candidates,
    not an estimate of a full softmax."""
    negatives, mask, _ = logits.negatives()
    matrix = torch.cat([logits.positive[:, None], negatives], dim=1)
    return matrix, torch.cat([mask.new_zeros(len(mask), 1), mask], dim=1)


def listwise_kd(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None,
                temperature: float = 1.0, detach: bool = True) -> torch.Tensor:
    """``tau^2 KL(sg(p_T) || p_S)`` averaged over rows, both softmaxes over a row's candidates
    at temperature ``tau`` (methods.md §0.3 KD_list). ``teacher``, ``student`` are ``[B, C]``;
    ``mask`` (True = drop) removes the same candidates from both distributions. ``detach``
    False lets the term's gradient reach the teacher too (PFD's flag)."""
    teacher = (teacher.detach() if detach else teacher) / temperature
    student = student / temperature
    if mask is not None:
        teacher = teacher.masked_fill(mask, float("-inf"))
        student = student.masked_fill(mask, float("-inf"))
    log_p_teacher = torch.log_softmax(teacher.float(), dim=-1)
    log_p_student = torch.log_softmax(student.float(), dim=-1)
    return temperature**2 * _kl_rows(log_p_teacher, log_p_student, mask).mean()


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """``sum_j p_j (log p_j - log q_j)`` per row; a dropped entry (both log-probabilities -inf,
    ``p = 0``) adds 0, and no NaN reaches the forward or backward pass."""
    difference = log_p - log_q
    if drop is not None:
        difference = difference.masked_fill(drop, 0.0)
    return (log_p.exp() * difference).sum(-1)


def pointwise_kd(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None,
                 detach: bool = True) -> torch.Tensor:
    """``BCE(sigma(s_S), sg(sigma(s_T)))``: the student's logits against the teacher's
    probabilities as soft labels (methods.md §0.3 KD_pt, PFD's loss), averaged over the kept
    candidates (``mask`` True = drop); ``detach`` as in :func:`listwise_kd`."""
    target = torch.sigmoid((teacher.detach() if detach else teacher).float())
    loss = F.binary_cross_entropy_with_logits(student.float(), target, reduction="none")
    if mask is None:
        return loss.mean()
    keep = ~mask
    return (loss * keep).sum() / keep.sum().clamp_min(1)


def similarity_log_probs(anchors: torch.Tensor, targets: torch.Tensor, drop: torch.Tensor, kernel: Kernel,
                         temperature: float) -> torch.Tensor:
    """``log p(target j | anchor b)`` ``[B, B']`` from cosine similarities (ENDX's GAM, methods.md §3).

    ``softmax``: softmax of cos / tau over the kept targets. ``pkt``: the kernel (cos + 1) / 2
    normalised by its row sum (no temperature). ``drop`` (True) removes a target from a row: the
    anchor itself on same-side terms, and duplicates.
    """
    cosine = F.normalize(anchors.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T
    if kernel == "softmax":
        return torch.log_softmax((cosine / temperature).masked_fill(drop, float("-inf")), dim=-1)
    weights = ((cosine + 1) / 2).clamp_min(1e-8).masked_fill(drop, 0.0)
    probabilities = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.log(probabilities.clamp_min(1e-30)).masked_fill(drop, float("-inf"))


def relation_kl(teacher: tuple[torch.Tensor, torch.Tensor], student: tuple[torch.Tensor, torch.Tensor],
                drop: torch.Tensor, kernel: Kernel = "softmax", temperature: float = 0.1) -> torch.Tensor:
    """One GAM direction: ``mean_b KL(p^T(. | x_b) || p^S(. | x_b))`` where each model's
    distribution comes from its own (anchor, target) embeddings, so teacher and student may have
    different widths. Rows whose every target is dropped do not count."""
    log_t = similarity_log_probs(teacher[0].detach(), teacher[1].detach(), drop, kernel, temperature)
    log_s = similarity_log_probs(student[0], student[1], drop, kernel, temperature)
    kl = _kl_rows(log_t, log_s, drop)
    rows = ~drop.all(-1)
    return kl[rows].mean() if rows.any() else kl.sum() * 0.0


def duplicate_targets(ids: torch.Tensor, same_side: bool) -> torch.Tensor:
    """``[B, B]`` True where target ``j`` is dropped for anchor ``b``: a target whose id repeats an
    earlier column (the same item or user twice makes the target ambiguous, methods.md §3), and
    on same-side terms the anchor itself and any other copy of it."""
    earlier = torch.triu(ids[None, :] == ids[:, None], diagonal=1).any(0)  # column j repeats some i < j
    drop = earlier[None, :].expand(len(ids), -1).clone()
    if same_side:
        drop |= ids[:, None] == ids[None, :]
    return drop


def token_attention_kd(teacher_attention: torch.Tensor, user_tokens: torch.Tensor, item_tokens: torch.Tensor,
                       user_mask: torch.Tensor, item_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ERNIE-Search's token-level term (methods.md §7, term 4), cross encoder -> late interaction:
    ``sum_a KL(sg(A_a) || softmax_b(<h_a, h_b> / tau))`` per pair, averaged over pairs.

    ``teacher_attention [P, L_u, L_i]`` is the cross encoder's last-layer user->item block,
    head-averaged; it is renormalised over the real item tokens here. ``user_tokens [P, L_u, m]``
    and ``item_tokens [P, L_i, m]`` are the student's token vectors of the same positions. Padded
    user tokens add nothing; padded item tokens get no probability.
    """
    teacher = teacher_attention.detach().float().masked_fill(~item_mask[:, None, :], 0.0)
    teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-12)
    logits = (user_tokens.float() @ item_tokens.float().transpose(-1, -2)) / temperature
    log_student = torch.log_softmax(logits.masked_fill(~item_mask[:, None, :], float("-inf")), dim=-1)
    log_teacher = torch.log(teacher.clamp_min(1e-30))
    kl = _kl_rows(log_teacher, log_student, ~item_mask[:, None, :].expand_as(logits))
    return (kl * user_mask).sum(-1).mean()


def masked_softmax(logits: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """``softmax`` of ``logits [P, H, L_q, L_k]`` over the real keys only (``key_mask [P, L_k]``,
    True = real): a padded key gets probability 0, and a row with no real key is all zeros."""
    drop = _dropped_keys(key_mask)
    return torch.softmax(logits.float().masked_fill(drop, float("-inf")), dim=-1) * key_mask[:, None, None, :]


def _dropped_keys(key_mask: torch.Tensor) -> torch.Tensor:
    """``[P, 1, 1, L_k]`` the keys to leave out of a softmax: the padded ones, except in a pair
    with no real key at all, whose rows stay finite (every loss then leaves them out)."""
    return (~key_mask & key_mask.any(-1, keepdim=True))[:, None, None, :]


def _attention_rows(query_mask: torch.Tensor, key_mask: torch.Tensor, heads: int) -> torch.Tensor:
    """``[P, H, L_q]`` True for the rows an attention loss counts: a real query with a real key."""
    rows = query_mask & key_mask.any(-1, keepdim=True)
    return rows[:, None, :].expand(-1, heads, -1)


def attention_mse(teacher: torch.Tensor, student_logits: torch.Tensor, query_mask: torch.Tensor,
                  key_mask: torch.Tensor) -> torch.Tensor:
    """VIRT's term for one layer (methods.md §5): the squared difference between the teacher's
    attention block ``teacher [P, H, L_q, L_k]`` (probabilities, detached here) and the student's
    virtual attention ``softmax(student_logits)`` over the real keys, averaged over the counted
    elements: real query x real key, every head (padded queries and keys add nothing)."""
    student = masked_softmax(student_logits, key_mask)
    keep = _attention_rows(query_mask, key_mask, student.shape[1])[..., None] & key_mask[:, None, None, :]
    squared = (student - teacher.detach().float()).pow(2) * keep
    return squared.sum() / keep.sum().clamp_min(1)


def attention_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, query_mask: torch.Tensor,
                 key_mask: torch.Tensor) -> torch.Tensor:
    """DiDE's term for one block (methods.md §6): ``KL(softmax(sg(T)) || softmax(S))`` of each
    query token's distribution over the other side's real keys, both logits ``[P, H, L_q, L_k]``
    re-normalised over those keys only, summed over keys and averaged over (pair, head, real
    query token); rows without a real key do not count."""
    drop = _dropped_keys(key_mask).expand_as(student_logits)
    log_t = torch.log_softmax(teacher_logits.detach().float().masked_fill(drop, float("-inf")), dim=-1)
    log_s = torch.log_softmax(student_logits.float().masked_fill(drop, float("-inf")), dim=-1)
    rows = _attention_rows(query_mask, key_mask, student_logits.shape[1])
    kl = _kl_rows(log_t, log_s, drop)
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def one_minus_p_positive(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TRMD's faithful ranking loss (methods.md §4): ``1 - softmax([s+, s-])_0`` for the positive
    (column 0 of ``logits [B, C]``) against each other kept candidate (``mask`` True = drop),
    averaged over those pairs. It is ``sigmoid(s- - s+)``: bounded, unlike ``-log P``."""
    loss = torch.sigmoid(logits[:, 1:].float() - logits[:, :1].float())
    if mask is None:
        return loss.mean()
    keep = ~mask[:, 1:]
    return (loss * keep).sum() / keep.sum().clamp_min(1)


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of token vectors ``[..., L, m]`` over the real tokens (``mask
    [..., L]``) and their dimensions; the teacher's side is detached (TRMD's representation term)."""
    squared = (student.float() - teacher.detach().float()).pow(2).sum(-1) * mask
    return squared.sum() / (mask.sum() * student.shape[-1]).clamp_min(1)
