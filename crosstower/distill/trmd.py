"""TRMD: two rankers and multi-teacher distillation (Choi et al. 2021; methods.md §4).

The student is the two-ranker model of :mod:`crosstower.models.trmd` (``model.name: trmd``):
one tower pair read by a [CLS]-max ranker and by MaxSim. Two frozen teachers each teach one
ranker a representation, by mean squared error (representation distillation, not score KL):

- ``cls``: the cross encoder (``distill.teacher``) reads each pair jointly; its final [CLS]
  state is the target of the student's pseudo-joint [CLS] ``c = W_res max(h_u, h_i) +
  max(h_u, h_i)`` of the same pair (through a learned linear map where the widths differ);
- ``tokens``: the late-interaction model (``distill.colbert_teacher``) encodes the batch's users
  and positive items; its normalised token vectors are the targets of the student's, position by
  position (so both read the same token sequences with the same width ``m``).

``supervised`` is the student's ranking loss on ``s1 + s2``: the listwise softmax over its
candidates by default, or TRMD's own ``1 - P(positive)`` against each negative (``ranking:
faithful``). The student is not an inner product: it is served by the late-interaction token
index with exact two-ranker re-scoring (or ranks exhaustively), and the run says so.

Under protocol P4 (pre-ranking, labelled rows) both teachers read each row's own pair and the
supervised term is the student's binary cross-entropy on ``s1 + s2``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from crosstower.config import DistillConfig, TeacherConfig
from crosstower.data.batching import PointwiseBatch, TrainBatch
from crosstower.distill.distiller import DistillContext, Distiller
from crosstower.distill.losses import candidate_matrix, one_minus_p_positive, token_mse
from crosstower.distill.teacher import Teacher, load_teacher
from crosstower.errors import ConfigError
from crosstower.losses import CandidateLogits
from crosstower.models.trmd import TRMDStudent


class TRMDDistillConfig(DistillConfig):
    """TRMD: a two-ranker student taught the cross encoder's [CLS] and late interaction's tokens."""

    method: Literal["trmd"] = "trmd"  # selects TRMD: two rankers, representation MSE from two teachers
    TERMS = {"supervised": 1.0, "cls": 1.0, "tokens": 1.0}
    TEACHER_TERMS = ("cls",)  # distill.teacher, the cross encoder; tokens read distill.colbert_teacher
    POINTWISE = True
    # The late-interaction teacher of the tokens term: {run: FOLDER} or {config: FILE, overrides: [...]}.
    colbert_teacher: TeacherConfig | None = None
    ranking: Literal["listwise", "faithful"] = "listwise"  # supervised term: listwise softmax, or 1 - P(pos) per negative
    pairs: Literal["positives", "candidates"] = "positives"  # the pairs whose [CLS] the cross encoder reads

    @model_validator(mode="after")
    def _colbert_teacher_when_needed(self):
        if self.uses("tokens") and self.colbert_teacher is None:
            raise ValueError("colbert_teacher: the tokens term reads a late-interaction teacher; give "
                             "colbert_teacher.run or colbert_teacher.config (or set terms.tokens: 0)")
        return self

    def check_run(self, run) -> None:
        if self.ranking == "faithful" and run.split.protocol == "p4":
            raise ValueError("distill.ranking: faithful ranks a positive against its negatives; under protocol p4 "
                             "the supervised term is the labelled rows' cross-entropy (use listwise, the default)")

    def check_student(self, student, model_name: str) -> None:
        if not isinstance(student, TRMDStudent):
            raise ConfigError(f"model: a trmd student is the two-ranker model (model.name: trmd), not {model_name}")

    def build(self, student: TRMDStudent, teacher: Teacher | None, context: DistillContext) -> TRMD:
        if teacher is not None and not hasattr(teacher.model, "forward_pairs"):
            raise ConfigError(f"distill.teacher: trmd's cls term reads a cross encoder's [CLS] state; {teacher.name} "
                              f"({teacher.source}) has none")
        colbert = None
        if self.uses("tokens"):
            colbert = load_teacher(self.colbert_teacher, context.run, context.dataset, context.split, context.out_dir,
                                   context.data_dir, field="distill.colbert_teacher")
            _check_tokens(student, colbert)
        return TRMD(student, self, teacher, colbert)


def _check_tokens(student: TRMDStudent, colbert: Teacher) -> None:
    """The tokens term pairs the teachers' token vectors one to one with the student's."""
    towers = getattr(colbert.model, "towers", None)
    if towers is None or not hasattr(colbert.model, "encode_user_tokens"):
        raise ConfigError(f"distill.colbert_teacher: trmd's tokens term reads late-interaction token vectors; "
                          f"{colbert.name} ({colbert.source}) has none")
    mine = (student.towers.user_length, student.towers.substrate.item_length, student.config.projection_dim,
            student.towers.item_cls)
    theirs = (towers.user_length, towers.substrate.item_length, colbert.model.config.projection_dim, towers.item_cls)
    if mine != theirs:
        raise ConfigError(f"distill.colbert_teacher: the tokens term needs the teacher's token vectors (user {theirs[0]}, "
                          f"item {theirs[1]} tokens of width {theirs[2]}, item [CLS] {theirs[3]}) to match the "
                          f"student's ({mine[0]}, {mine[1]}, {mine[2]}, {mine[3]}): give both the same fields, "
                          f"train.history_length, projection_dim and expansion_tokens")


class TRMD(Distiller):
    def __init__(self, student: TRMDStudent, config: TRMDDistillConfig, teacher: Teacher | None,
                 colbert: Teacher | None):
        super().__init__(student, config, teacher)
        self.__dict__["colbert_teacher"] = colbert  # frozen, like the teacher: not a submodule
        width = teacher.model.config.dim if teacher is not None else student.config.dim
        # methods.md: ranker 1's [CLS] must have the teacher's width; a map where they differ.
        self.cls_map = nn.Identity() if width == student.config.dim else nn.Linear(student.config.dim, width)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.colbert_teacher is not None:
            self.colbert_teacher.model._apply(fn, *args, **kwargs)
        return self

    def terms(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = self.student.candidate_logits(batch, with_states=True)
        terms = {}
        if cfg.uses("supervised"):
            terms["supervised"] = self._ranking(batch, logits)
        if cfg.uses("cls"):
            terms["cls"] = self._cls(batch, logits.states["pseudo_cls"])
        if cfg.uses("tokens"):
            terms["tokens"] = self._tokens(logits, *self.colbert_teacher.token_vectors(batch.user, batch.positives))
        return terms

    def pointwise_terms(self, batch: PointwiseBatch) -> dict[str, torch.Tensor]:
        cfg = self.config
        logits = self.student.pair_logits(batch, with_states=True)
        terms = {"supervised": self.supervised_pointwise(batch, logits)} if cfg.uses("supervised") else {}
        if cfg.uses("cls"):
            with self.teacher.rows(batch):
                target = self.teacher.joint_pass(batch.user, batch.items, traces=False).hidden[:, 0]
            terms["cls"] = F.mse_loss(self.cls_map(logits.states["pseudo_cls"][:, 0]).float(), target.float())
        if cfg.uses("tokens"):
            with self.colbert_teacher.rows(batch):
                teacher_tokens = self.colbert_teacher.token_vectors(batch.user, batch.items)
            terms["tokens"] = self._tokens(logits, *teacher_tokens)
        return terms

    @staticmethod
    def _tokens(logits, users, items) -> torch.Tensor:
        """MSE of the student's token vectors to the late-interaction teacher's (``users``,
        ``items``: its token sequences of each row's user and first candidate)."""
        student_users = logits.states["user_tokens"]
        return (token_mse(student_users.tokens, users.tokens, student_users.mask)
                + token_mse(logits.states["item_tokens"][:, 0], items.tokens, items.mask))

    def _ranking(self, batch: TrainBatch, logits: CandidateLogits) -> torch.Tensor:
        if self.config.ranking == "listwise":
            return self.supervised(batch, logits)
        matrix, mask = candidate_matrix(logits)
        return one_minus_p_positive(matrix, mask)

    def _cls(self, batch: TrainBatch, pseudo_cls: torch.Tensor) -> torch.Tensor:
        """MSE of the student's pseudo-joint [CLS] to the cross encoder's final [CLS] state."""
        if self.config.pairs == "positives":
            target = self.teacher.joint_pass(batch.user, batch.positives, traces=False).hidden[:, 0]
            mine = pseudo_cls[:, 0]
        else:
            target = self.teacher.candidate_logits(batch, with_states=True).states["cross"].hidden[:, 0]
            mine = pseudo_cls.reshape(-1, pseudo_cls.shape[-1])
        return F.mse_loss(self.cls_map(mine).float(), target.float())
