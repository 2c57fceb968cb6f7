"""The frozen teacher: a finished run, or a config trained first and kept beside the student.

A teacher is loaded from its run folder with its own config and weights, frozen (no gradient,
eval mode, never saved with the student) and checked against the student's data and split: a
teacher that saw the student's test interactions would make any distilled number a leak. It
reads the student's batches through :meth:`Teacher.adapt`, which cuts each history to the
length the teacher was trained with.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch

from crosstower.config import RunConfig, TeacherConfig, dump_config, load_config
from crosstower.data.batching import PointwiseBatch, TrainBatch, UserInput
from crosstower.data.dataset import ITEM, TIME, USER, Dataset
from crosstower.data.run_data import data_fingerprint
from crosstower.data.splits import Split
from crosstower.errors import ConfigError, CrosstowerError
from crosstower.losses import CandidateLogits
from crosstower.models import Recommender
from crosstower.nn.fields import row_values
from crosstower.run_dir import METRICS, RunFolder, open_run

log = logging.getLogger("crosstower.distill")

# Settings a reused teacher may differ in: where and how fast it ran, not what it learnt.
_RUNTIME_KEYS = ("threads", "device")


@dataclass
class Teacher:
    """A frozen model and the history length it was trained with."""

    model: Recommender
    history_length: int
    source: Path
    name: str
    train_seconds: float = 0.0  # what training the teacher cost (its run's timing)

    def __post_init__(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()

    def adapt(self, user: UserInput) -> UserInput:
        """``user`` with each history cut to the teacher's length (its most recent items)."""
        if user.history.shape[1] <= self.history_length:
            return user
        tail = user.history[:, user.history.shape[1] - self.history_length:]
        return UserInput(user.users, tail, user.example_age)

    @torch.no_grad()
    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """The teacher's logits on exactly the student's candidates (positive, sampled, in-batch)."""
        return self.model.candidate_logits(dataclasses.replace(batch, user=self.adapt(batch.user)), with_states)

    def rows(self, batch: PointwiseBatch) -> ContextManager[None]:
        """Within the block the teacher reads each labelled row's own field values (P4's ordered
        statistics of training rows), as the student and as the teacher did in training."""
        return row_values(self.model, batch.row_values())

    @torch.no_grad()
    def pair_logits(self, batch: PointwiseBatch) -> torch.Tensor:
        """The teacher's logits ``[B]`` of labelled rows (protocol P4)."""
        with self.rows(batch):
            return self.model.pair_logits(dataclasses.replace(batch, user=self.adapt(batch.user))).logits

    @torch.no_grad()
    def cross_embeddings(self, user: UserInput, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (user, item) pair's user and item embeddings from the teacher's joint encoding."""
        return self.model.cross_embeddings(self.adapt(user), items)

    @torch.no_grad()
    def cross_attention(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Each pair's last-layer user->item attention ``[P, L_u, L_i]``, averaged over heads."""
        return self.model.cross_attention(self.adapt(user), items)

    @torch.no_grad()
    def joint_pass(self, user: UserInput, items: torch.Tensor, traces: bool = True) -> Any:
        """The cross encoder's pass over each (user, item) pair: its final states and, with
        ``traces``, every layer's attention, queries and keys (a
        :class:`~crosstower.models.cross.CrossOutput`)."""
        model = self.model
        return model.forward_pairs(model.substrate.users(self.adapt(user)), model.substrate.items(items),
                                   return_traces=traces)

    @torch.no_grad()
    def token_vectors(self, user: UserInput, items: torch.Tensor) -> tuple[Any, Any]:
        """A late-interaction teacher's normalised token vectors of the users and of the items
        (two :class:`~crosstower.nn.tokens.TokenSequence`)."""
        return self.model.encode_user_tokens(self.adapt(user)), self.model.encode_item_tokens(items)

    @torch.no_grad()
    def score_candidates(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, C]`` of each user against its own candidates ``items [B, C]``."""
        b, c = items.shape
        users = UserInput(user.users.repeat_interleave(c), user.history.repeat_interleave(c, dim=0),
                          None if user.example_age is None else user.example_age.repeat_interleave(c))
        return self.model.score_pairs(self.adapt(users), items.reshape(-1)).view(b, c)


def load_teacher(settings: TeacherConfig, student: RunConfig, dataset: Dataset, split: Split, student_out: Path,
                 data_dir: Path | None, field: str = "distill.teacher") -> Teacher:
    """The teacher ``settings`` (the config's ``field``) name, trained first when it is named by
    a config."""
    if settings.run is not None:
        folder = Path(settings.run)
        where = f"{field}.run"
    else:
        folder = _trained_teacher(settings, student_out, data_dir)
        where = f"{field}.config"
    try:
        run = open_run(folder, data_dir)
    except CrosstowerError as exc:
        raise ConfigError(f"{where} {folder}: cannot load the teacher ({exc})") from None
    _check_compatible(run.config, run.split, student, split, dataset, run.metrics.get("data"), f"{where} {folder}")
    log.info("teacher: %s from %s (test %s)", run.config.model.name, folder, _headline(run.metrics))
    seconds = float(run.metrics.get("timing", {}).get("train_seconds", 0.0))
    return Teacher(run.model, run.config.train.history_length, folder, run.config.model.name, seconds)


def _trained_teacher(settings: TeacherConfig, student_out: Path, data_dir: Path | None) -> Path:
    """The run of the teacher config: trained beside the student's run, under the teacher run's
    own name (so students of one teacher share it), unless an equal run is already there."""
    from crosstower.run import run_experiment  # the run module builds distillers: import late

    config = load_config(Path(settings.config), settings.overrides)
    folder = RunFolder(Path(student_out).parent / config.run_name)
    if folder.file(METRICS).exists():
        if _comparable(folder.read_config()) != _comparable(config):
            raise ConfigError(f"distill.teacher.config {settings.config}: {folder.path} holds a different run; "
                              f"remove it, or name that run with distill.teacher.run")
        log.info("teacher: reusing %s", folder.path)
        return folder.path
    resume = any(path.exists() for path in folder.checkpoints)
    log.info("teacher: training %s into %s%s", settings.config, folder.path, " (resumed)" if resume else "")
    run_experiment(config, folder.path, data_dir, resume=resume)
    return folder.path


def _comparable(config: RunConfig) -> str:
    raw = config.model_dump(mode="json")
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in _RUNTIME_KEYS}
    return dump_config(RunConfig.model_validate(raw))


def _check_compatible(teacher: RunConfig, teacher_split: Split, student: RunConfig, split: Split, dataset: Dataset,
                      teacher_data: dict | None, where: str) -> None:
    """The teacher must have trained on the student's data, protocol and training interactions,
    and read no longer a history than the student's batches hold."""
    if teacher_data != data_fingerprint(dataset) or teacher.dataset != student.dataset:
        raise ConfigError(f"{where}: trained on another data set ({teacher.dataset.name}) than the student "
                          f"({student.dataset.name})")
    if teacher.split != student.split or not _same_interactions(teacher_split, split):
        raise ConfigError(f"{where}: trained on another split (protocol {teacher.split.protocol}, seed "
                          f"{teacher.split.seed}) than the student (protocol {student.split.protocol}, seed "
                          f"{student.split.seed}); its scores could leak the student's test interactions")
    if teacher.train.history_length > student.train.history_length:
        raise ConfigError(f"{where}: reads {teacher.train.history_length} history items but the student's batches "
                          f"hold {student.train.history_length}; set train.history_length >= "
                          f"{teacher.train.history_length}")


def _same_interactions(a: Split, b: Split) -> bool:
    """Whether two splits train on the same interactions (a saved split keeps user, item and
    time, not the ratings)."""
    columns = [USER, ITEM, TIME]
    return a.train[columns].reset_index(drop=True).equals(b.train[columns].reset_index(drop=True))


def _headline(metrics: dict) -> str:
    test = metrics.get("metrics", {}).get("test", {})
    shown = ("recall", "auc")  # ranking runs' recalls, pre-ranking (P4) runs' AUC
    return ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k.startswith(shown)) or "no test metrics"
