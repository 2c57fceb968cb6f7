"""What trains a student: the student, its teacher and the method's weighted loss terms.

A :class:`Distiller` is the model the trainer sees while a student learns: its loss is the
method's terms, weighted as ``distill.terms`` says; everything else (validation, scoring,
serving) is the student's, so the student is selected, evaluated and indexed exactly like an
undistilled model. The teacher is held outside the module tree (never trained, saved or put in
training mode); what the method trains besides the student (PFD's joint teacher, ERNIE-Search's
late-interaction head, a projection) are submodules, kept in the training checkpoint so a run
resumes, and dropped when the run saves its model: the run folder holds the student alone and
loads without the teacher.

Under protocol P4 (pre-ranking) the student trains pointwise on labelled rows; a method with a
pointwise form (:attr:`~crosstower.config.DistillConfig.POINTWISE`) computes its terms on each
row's (user, item) pair in :meth:`Distiller.pointwise_terms`, the supervised one being the
student's own binary cross-entropy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crosstower.config import DistillConfig, RunConfig
from crosstower.data.batching import PointwiseBatch, TrainBatch, TrainExamples, UserInput
from crosstower.data.dataset import Dataset
from crosstower.data.splits import Split
from crosstower.losses import CandidateLogits, PairLogits, binary_cross_entropy, listwise_softmax
from crosstower.models.base import EmbeddingRecommender, ItemRangeScorer, Recommender, UserBlock
from crosstower.distill.teacher import Teacher, load_teacher


@dataclass(frozen=True)
class DistillContext:
    """What a method is built from besides the student and the teacher."""

    dataset: Dataset
    split: Split
    run: RunConfig
    workdir: Path  # the run's partial folder: what a method computes once is cached there
    out_dir: Path  # where the run goes: a teacher named by its config is trained beside it
    data_dir: Path | None = None


class Distiller(Recommender):
    """Base of every method: ``loss`` is ``sum_t weight_t * term_t``, the rest is the student's."""

    def __init__(self, student: EmbeddingRecommender, config: DistillConfig, teacher: Teacher | None):
        super().__init__(student.num_items)
        self.student = student
        self.config = config
        # Not a submodule: frozen, never in the checkpoint, never switched to training mode.
        self.__dict__["teacher"] = teacher

    teacher: Teacher | None
    setup_seconds: float = 0.0

    # ---- the objective ---------------------------------------------------------------------
    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The value of every term that is on (:meth:`DistillConfig.uses`)."""
        raise NotImplementedError

    def weight(self, term: str) -> float:
        """The weight of ``term`` now (a method may schedule it, as PFD's warm-up does)."""
        return self.config.terms[term]

    def pointwise_terms(self, batch: PointwiseBatch) -> dict[str, torch.Tensor]:
        """The terms on labelled rows (protocol P4), for a method with a pointwise form."""
        raise NotImplementedError(f"{self.config.method} has no pointwise form")

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self._weighted(self.terms(batch))

    def pointwise_loss(self, batch: PointwiseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self._weighted(self.pointwise_terms(batch))

    def _weighted(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = 0.0, {}
        for name, value in terms.items():
            weight = self.weight(name)
            total = total + weight * value
            parts[name], parts[f"{name}_weight"] = float(value.detach()), weight
        return total, parts

    def supervised(self, batch: TrainBatch, logits: CandidateLogits) -> torch.Tensor:
        """The student's own objective on ``logits``: the listwise softmax plus the student's
        extra terms (what the undistilled student minimises)."""
        total = listwise_softmax(logits)
        for value, weight in self.student.extra_losses(batch, logits).values():
            total = total + weight * value
        return total

    def supervised_pointwise(self, batch: PointwiseBatch, logits: PairLogits) -> torch.Tensor:
        """The student's own pointwise objective on ``logits``: binary cross-entropy against the
        labels plus the student's extra terms (what the undistilled student minimises under P4)."""
        total = binary_cross_entropy(logits.logits, batch.labels)
        for value, weight in self.student.extra_losses(batch, logits).values():
            total = total + weight * value
        return total

    # ---- the student's, for everything but the loss -------------------------------------------
    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self.student.score(user, items)

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self.student.score_pairs(user, items)

    def pair_logits(self, batch: PointwiseBatch, with_states: bool = False) -> PairLogits:
        return self.student.pair_logits(batch, with_states)

    def item_scorer(self) -> ItemRangeScorer:
        return self.student.item_scorer()

    def ranking_scorer(self, user_input: UserBlock, num_users: int) -> Any:
        return self.student.ranking_scorer(user_input, num_users)

    def build_index(self, training_users: UserInput) -> Any:
        return self.student.build_index(training_users)

    def index_query(self, user: UserInput) -> Any:
        return self.student.index_query(user)

    @property
    def warmup_epochs(self) -> int:  # type: ignore[override]
        return self.student.warmup_epochs

    def begin_epoch(self, epoch: int, examples: TrainExamples) -> None:
        self.student.begin_epoch(epoch, examples)

    def averaged_buffers(self) -> list[str]:
        return [f"student.{name}" for name in self.student.averaged_buffers()]

    def training_stats(self) -> dict[str, float]:
        return self.student.training_stats()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Distiller:
        """Moving the distiller (``.to(device)``) moves the teacher with it."""
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher.model._apply(fn, *args, **kwargs)
        return self


def build_distiller(config: RunConfig, student: Recommender, dataset: Dataset, split: Split, out_dir: Path,
                    workdir: Path, data_dir: Path | None) -> Distiller:
    """The distiller of ``config.distill`` around ``student``, its teacher loaded (or trained
    beside ``out_dir``); ``workdir`` is where the run is being written."""
    settings = config.distill
    settings.check_student(student, config.model.name)
    teacher = None
    if settings.teacher is not None and any(settings.uses(term) for term in settings.TEACHER_TERMS):
        # an ablation that switches every teacher term off neither trains nor loads the teacher
        teacher = load_teacher(settings.teacher, config, dataset, split, out_dir, data_dir)
    started = time.perf_counter()
    distiller = settings.build(student, teacher, DistillContext(dataset, split, config, workdir, out_dir, data_dir))
    distiller.setup_seconds = time.perf_counter() - started  # what the method computes once (a score cache)
    return distiller
