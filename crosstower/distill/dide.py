"""Distilled Dual-Encoder, DiDE (Wang et al. 2021; methods.md §6).

A frozen cross encoder teaches a transformer dual encoder two things at once, from one teacher
pass over each row's candidates (positive and sampled):

- ``kd``: its scores, ``tau^2 KL(sg(p_T) || p_S)`` over the row's candidates (soft labels);
- ``attention``: its last layer's cross attention. For every candidate pair, each user token's
  distribution over the item tokens and each item token's over the user tokens, both models'
  logits re-normalised over the other side's real keys only, ``KL(teacher || student)`` summed
  over keys and averaged over (pair, head, query token); the student's logits are its virtual
  ones, ``Q_user K_item^T / sqrt(d_h)`` from the two towers' last layers.

DiDE's own fine-tuning zeroes the ground-truth loss (``supervised: 0``, the default here); for
retrieval a weight beta > 0 on the student's own listwise loss is allowed and usually safer.
The student is served by its inner product like any two-tower model (DiDE's fusion MLP, a
pre-ranking option, is not built).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from crosstower.config import DistillConfig
from crosstower.data.batching import TrainBatch
from crosstower.distill.attention import CROSS_BLOCKS, check_aligned, student_pairs, teacher_pairs
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import attention_kl, candidate_matrix, listwise_kd
from crosstower.distill.teacher import Teacher
from crosstower.models.base import EmbeddingRecommender


class DiDEConfig(DistillConfig):
    """DiDE: score and last-layer cross-attention distillation from a cross encoder."""

    method: Literal["dide"] = "dide"  # selects DiDE: soft labels and last-layer cross attention from a cross encoder
    TERMS = {"supervised": 0.0, "kd": 1.0, "attention": 1.0}
    TEACHER_TERMS = ("kd", "attention")
    temperature: float = Field(1.0, gt=0)  # tau of the score term

    def build(self, student: EmbeddingRecommender, teacher: Teacher | None, context: DistillContext) -> DiDE:
        if teacher is not None and self.uses("attention"):
            check_aligned(student, teacher, "dide")
        return DiDE(student, self, teacher)


class DiDE(Distiller):
    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        attention = cfg.uses("attention")
        logits = self.student.candidate_logits(batch, with_states=attention)
        terms = {"supervised": self.supervised(batch, logits)} if cfg.uses("supervised") else {}
        if not (cfg.uses("kd") or attention):
            return terms
        teacher = self.teacher.candidate_logits(batch, with_states=attention)
        if cfg.uses("kd"):
            student_matrix, mask = candidate_matrix(logits)
            teacher_matrix, _ = candidate_matrix(teacher)
            terms["kd"] = listwise_kd(teacher_matrix, student_matrix, mask, cfg.temperature)
        if attention:
            student = student_pairs(logits, -1, -1, "candidates")
            target, _ = teacher_pairs(teacher.states["cross"], -1)
            terms["attention"] = sum(attention_kl(target.logits(block), student.logits(block), *student.masks(block))
                                     for block in CROSS_BLOCKS)
        return terms
