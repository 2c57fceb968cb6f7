"""ERNIE-Search (Lu et al. 2022; methods.md §7): one tower pair read two ways, and a cascade.

The student's towers (the ``dual`` model) are encoded once per step; their pooled [CLS] vectors
are the dual encoder (DE), their token states, projected by one ``W_c`` and L2-normalised, are a
late-interaction scorer (CB, MaxSim) over the same pass. Both train at once, and the stronger
CB teaches the DE on the fly (self on-the-fly distillation). A frozen cross encoder (CE) run can
teach both: the cascade CE -> CB -> DE, and a token-level term in which each user token's
softmax over the item tokens under CB, ``softmax_b(<q_a, d_b> / tau_a)``, follows the CE's
last-layer, head-averaged user->item attention renormalised over the item tokens.

Terms (all weight 1 by default, each switchable): ``supervised`` (DE), ``colbert`` (CB's own
listwise loss), ``colbert_to_dual`` (KL(sg p_CB || p_DE)), ``cross_to_colbert``,
``cross_to_dual`` and ``attention``. The CE terms need ``distill.teacher`` (a ``cross`` run over
the same token sequences: the attention term pairs positions one to one). Only the DE is
served; the CB head is dropped with the distiller.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.config import DistillConfig
from crosstower.data.batching import TrainBatch
from crosstower.distill.attention import check_aligned
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import candidate_matrix, listwise_kd, token_attention_kd
from crosstower.distill.teacher import Teacher
from crosstower.errors import ConfigError
from crosstower.losses import CandidateLogits, listwise_softmax
from crosstower.models.base import EmbeddingRecommender
from crosstower.nn.maxsim import maxsim, maxsim_pairs
from crosstower.nn.tokens import TokenSequence


class ERNIESearchConfig(DistillConfig):
    """ERNIE-Search: shared towers read as dual encoder and late interaction, plus the CE cascade."""

    method: Literal["ernie"] = "ernie"  # selects ERNIE-Search: dual encoder + late-interaction head, cross cascade
    TERMS = {"supervised": 1.0, "colbert": 1.0, "colbert_to_dual": 1.0, "cross_to_colbert": 1.0,
             "cross_to_dual": 1.0, "attention": 1.0}
    TEACHER_TERMS = ("cross_to_colbert", "cross_to_dual", "attention")
    projection_dim: int = Field(32, ge=1)  # m, the late-interaction head's token width
    colbert_temperature: float = Field(0.1, gt=0)  # MaxSim / tau: the late-interaction logits
    temperature: float = Field(1.0, gt=0)  # tau of every score-distillation term
    attention_temperature: float = Field(0.1, gt=0)  # tau_a of the token-level term
    detach_colbert: bool = True  # the SOD term does not train the towers through the CB side

    def build(self, student: EmbeddingRecommender, teacher: Teacher | None, context: DistillContext) -> ERNIESearch:
        if not hasattr(student, "user_states"):
            raise ConfigError(f"model: ernie reads the student's token states; {context.run.model.name} has none "
                              f"(use the transformer dual encoder, model.name: dual)")
        if teacher is not None and self.uses("attention"):
            check_aligned(student, teacher, "ernie's attention term", same_heads=False,
                          remedy="or set distill.terms.attention: 0")
        return ERNIESearch(student, self, teacher)


class ERNIESearch(Distiller):
    def __init__(self, student: EmbeddingRecommender, config: ERNIESearchConfig, teacher: Teacher | None):
        super().__init__(student, config, teacher)
        self.colbert_head = nn.Linear(student.config.dim, config.projection_dim, bias=False)

    def _tokens(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.colbert_head(states), dim=-1)

    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        dual = self.student.candidate_logits(batch, with_states=True)
        states = dual.states
        users = TokenSequence(self._tokens(states["user_states"].tokens), states["user_states"].mask)
        items = TokenSequence(self._tokens(states["item_states"]), states["item_mask"])
        colbert = self._colbert_logits(batch, users, items)
        terms = {}
        if cfg.uses("supervised"):
            terms["supervised"] = self.supervised(batch, dual)
        if cfg.uses("colbert"):
            terms["colbert"] = listwise_softmax(colbert)
        dual_matrix, mask = candidate_matrix(dual)
        colbert_matrix, _ = candidate_matrix(colbert)
        if cfg.uses("colbert_to_dual"):
            terms["colbert_to_dual"] = listwise_kd(colbert_matrix, dual_matrix, mask, cfg.temperature,
                                                   detach=cfg.detach_colbert)
        if cfg.uses("cross_to_colbert") or cfg.uses("cross_to_dual"):
            cross_matrix, _ = candidate_matrix(self.teacher.candidate_logits(batch))
            if cfg.uses("cross_to_colbert"):
                terms["cross_to_colbert"] = listwise_kd(cross_matrix, colbert_matrix, mask, cfg.temperature)
            if cfg.uses("cross_to_dual"):
                terms["cross_to_dual"] = listwise_kd(cross_matrix, dual_matrix, mask, cfg.temperature)
        if cfg.uses("attention"):
            attention = self.teacher.cross_attention(batch.user, batch.positives)
            terms["attention"] = token_attention_kd(attention, users.tokens, items.tokens[:, 0], users.mask,
                                                    items.mask[:, 0], cfg.attention_temperature)
        return terms

    def _colbert_logits(self, batch: TrainBatch, users: TokenSequence, items: TokenSequence) -> CandidateLogits:
        """MaxSim of the projected token states over each row's candidates (and in-batch ones)."""
        tau = self.config.colbert_temperature
        logits = maxsim_pairs(users, items) / tau
        in_batch = None
        if batch.in_batch_mask is not None:
            in_batch = maxsim(users, TokenSequence(items.tokens[:, 0], items.mask[:, 0])) / tau
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch)
