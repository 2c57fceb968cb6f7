"""ENDX: the Geometry Alignment Mechanism (Wang et al. 2021; methods.md §3).

A frozen cross encoder reads each (user, positive item) pair of the batch jointly; its
cross-embeddings are the mean of its final states over the user positions and over the item
positions. GAM does not match those embeddings to the student's one to one (the two models'
spaces differ); it matches the batch's relational geometry: for each anchor, the distribution
over the batch's targets built from cosine similarities, in four directions,

    u->i, i->u (targets on the other side), u->u, i->i (same side, the anchor itself excluded),

each a term ``mean_b KL(p^teacher(. | x_b) || p^student(. | x_b))`` with its own weight. Each
model's similarities are computed in its own space, so the teacher's width may differ from the
student's with no map between them (a learned map would only learn to agree with the student).
A user or item that appears twice in a batch makes a target ambiguous: its later copies are
dropped as targets. Kernels: ``softmax`` of cos / tau (default, tau = 0.1) or ``pkt``, the
kernel (cos + 1) / 2 normalised by its row sum.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from crosstower.config import DistillConfig
from crosstower.data.batching import TrainBatch
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import duplicate_targets, relation_kl
from crosstower.distill.teacher import Teacher
from crosstower.errors import ConfigError
from crosstower.models.base import EmbeddingRecommender

# term -> (anchor side, target side); "u" users, "i" items
DIRECTIONS = {"u2i": ("u", "i"), "i2u": ("i", "u"), "u2u": ("u", "u"), "i2i": ("i", "i")}


class ENDXConfig(DistillConfig):
    """ENDX: in-batch relational geometry of a frozen cross encoder's cross-embeddings."""

    method: Literal["endx"] = "endx"  # selects ENDX: the in-batch geometry of a frozen cross encoder's embeddings
    TERMS = {"supervised": 1.0, "u2i": 1.0, "i2u": 1.0, "u2u": 1.0, "i2i": 1.0}
    TEACHER_TERMS = tuple(DIRECTIONS)
    kernel: Literal["softmax", "pkt"] = "softmax"  # softmax: of cos / temperature; pkt: (cos + 1) / 2 over its row sum
    temperature: float = Field(0.1, gt=0)  # tau of the softmax kernel

    def build(self, student: EmbeddingRecommender, teacher: Teacher | None, context: DistillContext) -> ENDX:
        if teacher is not None and not hasattr(teacher.model, "cross_embeddings"):
            raise ConfigError(f"distill.teacher: endx reads a cross encoder's joint states; {teacher.name} "
                              f"({teacher.source}) encodes users and items apart")
        return ENDX(student, self, teacher)


class ENDX(Distiller):
    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        geometry = [t for t in DIRECTIONS if cfg.uses(t)]
        logits = self.student.candidate_logits(batch, with_states=bool(geometry))
        terms = {"supervised": self.supervised(batch, logits)} if cfg.uses("supervised") else {}
        if geometry:
            student = {"u": logits.states["user_vectors"], "i": logits.states["item_vectors"][:, 0]}
            teacher = dict(zip("ui", self.teacher.cross_embeddings(batch.user, batch.positives)))
            ids = {"u": batch.user.users, "i": batch.positives}
            for term in geometry:
                anchor, target = DIRECTIONS[term]
                drop = duplicate_targets(ids[target], same_side=anchor == target)
                terms[term] = relation_kl((teacher[anchor], teacher[target]), (student[anchor], student[target]),
                                          drop, cfg.kernel, cfg.temperature)
        return terms
