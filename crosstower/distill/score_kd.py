"""Plain score distillation: listwise KL from any teacher run on the student's candidates.

``L = w_sup * L_sup(student) + w_kd * tau^2 KL(sg(p_T) || p_S)`` (methods.md §0.3), both
distributions over each row's candidates (positive, sampled, in-batch), so the teacher scores
exactly what the student scores. It is the baseline every other method is compared with.

A teacher too slow to run every step (the cross encoder: one transformer pass per pair) can be
scored once instead: with ``cache_candidates: M``, each training user gets ``M`` candidates
drawn uniformly at the start, the teacher scores them once from the user's whole training
history (``U x M`` teacher passes, with a progress bar), the scores are kept in the run folder
(``teacher_scores.pt``, reused on ``--resume``), and the KD term is the KL over that user's
cached candidates, the student reading the row's own history. What the cache gives up: the
candidates no longer change from step to step, and the teacher's label for an early example
reads the user's later training interactions too (never a validation or test one).

Under protocol P4 (labelled rows) the term is pointwise: ``tau^2 BCE(sigma(s_S / tau),
sg(sigma(s_T / tau)))`` on each row's pair, beside the student's own binary cross-entropy.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm import tqdm

from crosstower.config import DistillConfig
from crosstower.data.batching import PointwiseBatch, TrainBatch, UserInput
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import candidate_matrix, listwise_kd, pointwise_kd
from crosstower.distill.teacher import Teacher
from crosstower.models.base import EmbeddingRecommender
from crosstower.run_dir import training_users

log = logging.getLogger("crosstower.distill")

CACHE_FILE = "teacher_scores.pt"
PAIRS_PER_CALL = 4096  # teacher (user, item) pairs scored per call while filling the cache


class ScoreKDConfig(DistillConfig):
    """Listwise score distillation from a teacher run."""

    method: Literal["kd"] = "kd"  # selects plain listwise score distillation from a teacher run
    TERMS = {"supervised": 1.0, "kd": 1.0}
    TEACHER_TERMS = ("kd",)
    POINTWISE = True
    temperature: float = Field(1.0, gt=0)  # tau_kd, on the teacher's and the student's logits
    cache_candidates: int = Field(0, ge=0)  # 0: the teacher scores every step's candidates

    def check_run(self, run) -> None:
        if self.cache_candidates and run.split.protocol == "p4":
            raise ValueError("distill.cache_candidates: under protocol p4 the teacher scores each labelled row; "
                             "set it to 0")

    def build(self, student: EmbeddingRecommender, teacher: Teacher | None, context: DistillContext) -> ScoreKD:
        return ScoreKD(student, self, teacher, context)


class ScoreKD(Distiller):
    def __init__(self, student: EmbeddingRecommender, config: ScoreKDConfig, teacher: Teacher | None,
                 context: DistillContext):
        super().__init__(student, config, teacher)
        self.cache = None
        if config.cache_candidates and config.uses("kd"):
            self.cache = TeacherScoreCache.load_or_build(teacher, context, config.cache_candidates)

    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = self.student.candidate_logits(batch, with_states=self.cache is not None)
        terms = {}
        if cfg.uses("supervised"):
            terms["supervised"] = self.supervised(batch, logits)
        if cfg.uses("kd"):
            if self.cache is None:
                student, mask = candidate_matrix(logits)
                teacher, _ = candidate_matrix(self.teacher.candidate_logits(batch))
                terms["kd"] = listwise_kd(teacher, student, mask, cfg.temperature)
            else:
                items, teacher = self.cache.lookup(batch.user.users)
                student = cached_candidate_scores(self.student, logits.states["user_vectors"], items)
                terms["kd"] = listwise_kd(teacher, student, None, cfg.temperature)
        return terms

    def pointwise_terms(self, batch: PointwiseBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = self.student.pair_logits(batch)
        terms = {"supervised": self.supervised_pointwise(batch, logits)} if cfg.uses("supervised") else {}
        if cfg.uses("kd"):
            tau = cfg.temperature
            terms["kd"] = tau**2 * pointwise_kd(self.teacher.pair_logits(batch) / tau, logits.logits / tau)
        return terms


def cached_candidate_scores(student: EmbeddingRecommender, user_vectors: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[B, M]``: each user vector against its own candidates ``items [B, M]``, each distinct
    item encoded once."""
    unique, inverse = torch.unique(items, return_inverse=True)
    vectors = F.embedding(inverse, student.encode_items(unique))  # [B, M, D]
    return torch.einsum("bd,bmd->bm", user_vectors, vectors)


class TeacherScoreCache:
    """Each training user's ``M`` candidates and the teacher's scores of them, computed once."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, num_users: int):
        self.items, self.scores = items, scores
        self.row_of_user = torch.full((num_users,), -1, dtype=torch.long)
        self.row_of_user[users] = torch.arange(len(users))

    def lookup(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.row_of_user[users.cpu()]
        return self.items[rows].to(users.device), self.scores[rows].to(users.device)

    @classmethod
    def load_or_build(cls, teacher: Teacher, context: DistillContext, size: int) -> TeacherScoreCache:
        path = context.workdir / CACHE_FILE
        key = {"teacher": str(teacher.source), "candidates": size, "seed": context.run.train.seed,
               "history_length": context.run.train.history_length}
        users = training_users(context.dataset, context.split, context.run)
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == key:
                log.info("teacher scores: reusing %s", path)
                return cls(users.users, saved["items"], saved["scores"], context.dataset.num_users)
        items = _uniform_candidates(len(users), context.dataset.num_items, size,
                                    np.random.default_rng([context.run.train.seed, 7]))
        scores = _score_in_chunks(teacher, users, items)
        torch.save({"key": key, "items": items, "scores": scores}, path)
        return cls(users.users, items, scores, context.dataset.num_users)


def _uniform_candidates(num_users: int, num_items: int, size: int, generator: np.random.Generator) -> torch.Tensor:
    """``[U, min(size, N)]`` items, distinct within a row, drawn uniformly."""
    size = min(size, num_items)
    rows = [np.argpartition(generator.random((min(512, num_users - lo), num_items)), size - 1, axis=1)[:, :size]
            for lo in range(0, num_users, 512)]
    return torch.from_numpy(np.concatenate(rows) if rows else np.zeros((0, size), dtype=np.int64)).long()


def _score_in_chunks(teacher: Teacher, users: UserInput, items: torch.Tensor) -> torch.Tensor:
    step = max(1, PAIRS_PER_CALL // max(1, items.shape[1]))
    log.info("teacher scores: %d users x %d candidates (%d teacher passes)", len(users), items.shape[1], items.numel())
    device = teacher.model.device
    parts = []
    for lo in tqdm(range(0, len(users), step), desc="teacher scores", leave=False, mininterval=1.0, disable=None):
        rows = torch.arange(lo, min(lo + step, len(users)))
        block = UserInput(users.users[rows], users.history[rows]).to(device)
        parts.append(teacher.score_candidates(block, items[rows].to(device)).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(items.shape)
