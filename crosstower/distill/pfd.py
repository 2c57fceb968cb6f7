"""PFD: privileged features distillation (Xu et al., KDD 2020; methods.md §2).

The teacher is a single-tower network trained jointly with the student from scratch: it reads
what the student's towers read (the same embedding tables, shared) plus privileged user x item
features (:mod:`crosstower.distill.privileged`) that a two-tower model cannot use, and scores
the student's candidates. The objective, with lambda = 0 during a warm-up while the teacher is
still inaccurate:

    listwise:  (1 - lambda) L_sup(S) + lambda tau^2 KL(sg(p_T) || p_S) + L_sup(T)
    pointwise: (1 - lambda) BCE(y, s_S) + lambda BCE(sigma(s_S), sg(sigma(s_T))) + BCE(y, s_T)

over each row's positive and sampled negatives (and in-batch ones, listwise). The terms are
``supervised`` (1 - lambda), ``kd`` (lambda) and ``teacher``; during the warm-up epochs ``kd``
weighs 0 and ``supervised`` takes its weight. The distillation term trains the student only
(``detach_teacher``, methods.md's likely reading); the teacher learns from its own loss and,
through the shared embeddings, shapes the student's inputs. Only the student is served.

The teacher is an MLP on the concatenation [user inputs; item inputs; privileged features],
its first layer split by part (``W [u; i; p] = W_u u + W_i i + W_p p``) so that the user part is
computed once per row and the item part once per distinct item.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from crosstower.config import DistillConfig
from crosstower.data.batching import TrainBatch
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import candidate_matrix, listwise_kd, pointwise_kd
from crosstower.distill.privileged import PrivilegedFeatures, category_field
from crosstower.errors import ConfigError
from crosstower.losses import CandidateLogits, binary_cross_entropy, listwise_softmax
from crosstower.models.base import EmbeddingRecommender
from crosstower.nn.fields import MLP


class PFDConfig(DistillConfig):
    """PFD: a jointly trained teacher with privileged user x item features."""

    method: Literal["pfd"] = "pfd"  # selects PFD: a jointly trained teacher that reads privileged features
    TERMS = {"supervised": 0.5, "kd": 0.5, "teacher": 1.0}  # 1 - lambda, lambda, the teacher's own loss
    # listwise: softmax losses and KL over each row's candidates; pointwise: BCE per candidate (positive 1,
    # sampled negatives 0) and BCE of the student's probabilities against the teacher's.
    variant: Literal["listwise", "pointwise"] = "listwise"
    warmup_epochs: int = Field(1, ge=0)  # epochs with lambda = 0 (kd off, supervised at supervised + kd)
    detach_teacher: bool = True  # the kd term does not train the teacher
    temperature: float = Field(1.0, gt=0)  # tau of the listwise kd term
    category_field: str | None = None  # the item field privileged features count; None: the first categorical one
    hidden: list[int] = Field(default_factory=lambda: [128, 64])  # the teacher MLP's hidden widths
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate in the teacher MLP

    @model_validator(mode="after")
    def _joint_teacher(self):
        if self.teacher is not None:
            raise ValueError("teacher: pfd trains its teacher jointly with the student; remove distill.teacher")
        if not self.hidden:
            raise ValueError("hidden: the teacher needs at least one hidden layer")
        return self

    def build(self, student: EmbeddingRecommender, teacher: None, context: DistillContext) -> PFD:
        if not hasattr(student, "user_inputs"):
            raise ConfigError(f"model: pfd shares the student's embedding tables with its teacher; "
                              f"{context.run.model.name} does not expose them (use dssm or youtubednn)")
        return PFD(student, self, context)


class PrivilegedTeacher(nn.Module):
    """The PFD teacher: an MLP on [user inputs; item inputs; privileged features]."""

    def __init__(self, user_dim: int, item_dim: int, privileged_dim: int, hidden: list[int], dropout: float):
        super().__init__()
        self.user_part = nn.Linear(user_dim, hidden[0])
        self.item_part = nn.Linear(item_dim, hidden[0], bias=False)
        self.privileged_part = nn.Linear(privileged_dim, hidden[0], bias=False)
        self.rest = nn.Sequential(nn.ReLU(), MLP([*hidden, 1], dropout))

    def forward(self, user: torch.Tensor, items: torch.Tensor, candidates: torch.Tensor,
                privileged: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` from ``user [B, Du]``, the inputs ``items [U, Di]`` of the distinct
        candidates, each row's candidates as positions in them ``candidates [B, C]``, and
        ``privileged [B, C, F]``. The item part is computed once per distinct item."""
        item_part = F.embedding(candidates, self.item_part(items))
        first = self.user_part(user)[:, None] + item_part + self.privileged_part(privileged)
        return self.rest(first).squeeze(-1)


class PFD(Distiller):
    def __init__(self, student: EmbeddingRecommender, config: PFDConfig, context: DistillContext):
        super().__init__(student, config, None)
        field = category_field(context.dataset, config.category_field)
        self.privileged = PrivilegedFeatures(context.dataset, context.split.train, context.run.train.history_length, field)
        self.joint_teacher = PrivilegedTeacher(student.user_input_dim, student.item_input_dim,
                                               self.privileged.num_features, config.hidden, config.dropout)
        self.epoch = 0

    def begin_epoch(self, epoch: int, examples) -> None:
        self.epoch = epoch
        super().begin_epoch(epoch, examples)

    def weight(self, term: str) -> float:
        """lambda = 0 during the warm-up: ``kd`` off, its weight moved to ``supervised``."""
        if self.epoch >= self.config.warmup_epochs or term not in ("supervised", "kd"):
            return super().weight(term)
        return 0.0 if term == "kd" else self.config.terms["supervised"] + self.config.terms["kd"]

    def teacher_logits(self, batch: TrainBatch) -> CandidateLogits:
        """The teacher's logits on the student's candidates (in-batch ones too)."""
        user = self.student.user_inputs(batch.user)
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        scores = self._score(batch, user, candidates)
        in_batch = None
        if batch.in_batch_mask is not None:
            in_batch = self._score(batch, user, batch.positives[None, :].expand(len(batch.positives), -1))
        return batch.logits(scores[:, 0], scores[:, 1:], in_batch)

    def _score(self, batch: TrainBatch, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(candidates, return_inverse=True)
        privileged = self.privileged(batch.user, batch.examples, candidates)
        return self.joint_teacher(user, self.student.item_inputs(unique), inverse, privileged)

    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        if batch.examples is None:
            raise ConfigError("pfd: the batch does not say which training examples it holds")
        student, teacher = self.student.candidate_logits(batch), self.teacher_logits(batch)
        terms = {}
        if self.config.variant == "pointwise":
            # the positive (label 1) and the sampled negatives (label 0); accidental hits dropped
            labels, mask = _sampled_labels(student)
            student_logits = torch.cat([student.positive[:, None], student.sampled], dim=1)
            teacher_logits = torch.cat([teacher.positive[:, None], teacher.sampled], dim=1)
            terms["supervised"] = binary_cross_entropy(student_logits[~mask], labels[~mask])
            terms["teacher"] = binary_cross_entropy(teacher_logits[~mask], labels[~mask])
            terms["kd"] = pointwise_kd(teacher_logits, student_logits, mask, detach=self.config.detach_teacher)
        else:
            terms["supervised"] = self.supervised(batch, student)
            terms["teacher"] = listwise_softmax(teacher)
            teacher_matrix, _ = candidate_matrix(teacher)
            student_matrix, mask = candidate_matrix(student)
            terms["kd"] = listwise_kd(teacher_matrix, student_matrix, mask, self.config.temperature,
                                      detach=self.config.detach_teacher)
        return {name: value for name, value in terms.items() if self.config.uses(name)}


def _sampled_labels(logits: CandidateLogits) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[B, 1 + K]`` (1 for the positive, 0 for the sampled negatives) and the mask of
    the dropped ones (accidental hits)."""
    b, k = logits.sampled.shape
    labels = torch.zeros(b, 1 + k, device=logits.positive.device)
    labels[:, 0] = 1.0
    return labels, torch.cat([logits.sampled_mask.new_zeros(b, 1), logits.sampled_mask], dim=1)
