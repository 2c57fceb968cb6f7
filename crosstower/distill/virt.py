"""VIRT: virtual interaction (Li et al. 2021; methods.md §5).

A cross encoder's user->item and item->user attention blocks are what a two-tower student
lacks. VIRT gives the student *virtual* ones at training time only: at a distilled layer, each
pair's ``softmax(Q_user K_item^T / sqrt(d_h))`` from the user tower's queries and the item
tower's keys (and the other way round), pulled by a squared error towards the frozen teacher's
blocks of the same pair, per head, padded keys left out of both softmax and loss:

    L = supervised + virt * sum_layers mean (A~_ui - A_ui)^2 + (A~_iu - A_iu)^2

The teacher's block is either re-softmaxed over the other side's keys from its pre-softmax
logits (``normalisation: resoftmax``, the default, as DiDE's code does) or the literal slice of
its post-softmax attention (``slice``, whose rows need not sum to 1). Nothing of it is needed to
serve: the student is scored by its inner product and indexed like DSSM.

``layers`` lists the distilled layers by index, counted in each of the three stacks (user
tower, item tower, teacher), so ``-1`` pairs the last layers whatever the depths; the faithful
setting (every layer, ``layers: null``) needs towers as deep as the teacher. The teacher reads
each row's positive pair (``pairs: positives``, one teacher pass per row) or every candidate
pair (``candidates``: ``1 + K`` passes per row).

Under protocol P4 (labelled rows) the distilled pairs are the rows' own (user, item) pairs,
beside the student's binary cross-entropy; a student with ``model.adapted_interaction`` (the
paper's adapted interaction, see :mod:`crosstower.models.dual_encoder`) then scores each pair
through the very last-layer virtual attention VIRT distils, a pre-ranking scorer that no index
serves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from crosstower.config import DistillConfig
from crosstower.data.batching import PointwiseBatch, TrainBatch
from crosstower.distill.attention import CROSS_BLOCKS, Pairs, check_aligned, student_pairs, teacher_pairs
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import attention_mse, masked_softmax
from crosstower.distill.teacher import Teacher
from crosstower.errors import ConfigError
from crosstower.models.base import EmbeddingRecommender


class VIRTConfig(DistillConfig):
    """VIRT: the student's virtual cross attention distilled from a cross encoder's, layer by layer."""

    method: Literal["virt"] = "virt"  # selects VIRT: virtual cross attention distilled from a cross encoder
    TERMS = {"supervised": 1.0, "virt": 1.0}
    TEACHER_TERMS = ("virt",)
    POINTWISE = True
    normalisation: Literal["resoftmax", "slice"] = "resoftmax"  # the teacher's block: re-softmaxed over the other side, or sliced
    layers: list[int] | None = None  # distilled layers, indexed in every stack (-1: the last); null: all (equal depths)
    pairs: Literal["positives", "candidates"] = "positives"  # the pairs whose attention is distilled

    def build(self, student: EmbeddingRecommender, teacher: Teacher | None, context: DistillContext) -> VIRT:
        layers = [0]
        if teacher is not None:
            check_aligned(student, teacher, "virt")
            layers = distilled_layers(self.layers, student, teacher)
        return VIRT(student, self, teacher, layers)


def distilled_layers(layers: list[int] | None, student: EmbeddingRecommender,
                     teacher: Teacher) -> list[tuple[int, int, int]]:
    """``(user tower layer, item tower layer, teacher layer)`` for each distilled layer."""
    depths = {"the user tower (model.user_layers)": student.config.user_layers,
              "the item tower (model.item_layers)": student.config.item_layers,
              f"the teacher {teacher.name}": teacher.model.config.layers}
    if layers is None:
        if len(set(depths.values())) > 1:
            raise ConfigError("distill.layers: null distils every layer, which needs as many layers in "
                              + ", ".join(f"{name} ({n})" for name, n in depths.items())
                              + "; list the layers instead (e.g. [-1], the last of each)")
        layers = list(range(student.config.user_layers))
    resolved = []
    for layer in layers:
        for name, depth in depths.items():
            if not -depth <= layer < depth:
                raise ConfigError(f"distill.layers: layer {layer} is not in {name}, which has {depth}")
        resolved.append(tuple(layer % depth for depth in depths.values()))
    return resolved


class VIRT(Distiller):
    def __init__(self, student: EmbeddingRecommender, config: VIRTConfig, teacher: Teacher | None,
                 layers: list[tuple[int, int, int]]):
        super().__init__(student, config, teacher)
        self.layers = layers

    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = self.student.candidate_logits(batch, with_states=cfg.uses("virt"))
        terms = {"supervised": self.supervised(batch, logits)} if cfg.uses("supervised") else {}
        if cfg.uses("virt"):
            if cfg.pairs == "positives":
                out = self.teacher.joint_pass(batch.user, batch.positives)
            else:
                out = self.teacher.candidate_logits(batch, with_states=True).states["cross"]
            terms["virt"] = self._virt(logits, out, cfg.pairs)
        return terms

    def pointwise_terms(self, batch: PointwiseBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = self.student.pair_logits(batch, with_states=cfg.uses("virt"))
        terms = {"supervised": self.supervised_pointwise(batch, logits)} if cfg.uses("supervised") else {}
        if cfg.uses("virt"):
            with self.teacher.rows(batch):
                out = self.teacher.joint_pass(batch.user, batch.items)
            terms["virt"] = self._virt(logits, out, "positives")  # each row's own pair
        return terms

    def _virt(self, logits, out, pairs: Pairs) -> torch.Tensor:
        """The squared error of every distilled layer's virtual blocks to the teacher's (``out``,
        its pass over the same pairs)."""
        total = 0.0
        for user_layer, item_layer, teacher_layer in self.layers:
            student = student_pairs(logits, user_layer, item_layer, pairs)
            teacher, sliced = teacher_pairs(out, teacher_layer)
            for block in CROSS_BLOCKS:
                queries, keys = student.masks(block)
                if self.config.normalisation == "resoftmax":
                    target = masked_softmax(teacher.logits(block), keys)
                else:
                    target = sliced[block]
                total = total + attention_mse(target, student.logits(block), queries, keys)
        return total
