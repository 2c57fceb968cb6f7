"""Training examples and batches.

A training example is one training interaction (user u, item i at time t): the model reads u's
side features and u's training items *before* t (the history, truncated to the last
``history_length``) and must rank i above the negatives. Evaluation builds the same
:class:`UserInput` from a split's :class:`~crosstower.data.splits.EvalUsers`, so what is trained
is what is evaluated.

Protocol P4 trains and evaluates on labelled rows instead (:class:`PointwiseRows`): the model
reads the user's side features and the user's training *positives* strictly before the row's
time stamp, whatever part (train, validation, test) the row is in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from crosstower.data.dataset import ITEM, TIME, USER
from crosstower.data.splits import LABEL, EvalUsers
from crosstower.losses import CandidateLogits


@dataclass
class UserInput:
    """What a model may read about a batch of users."""

    users: torch.Tensor  # int64 [B] user indices
    history: torch.Tensor  # int64 [B, L] item indices, most recent last, -1 = padding
    example_age: torch.Tensor | None = None  # float [B]; 0 at serving time (YouTubeDNN)

    @property
    def history_mask(self) -> torch.Tensor:
        return self.history >= 0

    def __len__(self) -> int:
        return len(self.users)

    def to(self, device: torch.device | str) -> "UserInput":
        """The same input on ``device`` (a no-op on the device it is on)."""
        return UserInput(*(_to(t, device) for t in (self.users, self.history, self.example_age)))

    def rows(self, index: slice | np.ndarray) -> "UserInput":
        """The users at ``index`` (a slice, or positions), every field alike."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        age = None if self.example_age is None else self.example_age[index]
        return UserInput(self.users[index], self.history[index], age)


@dataclass
class TrainBatch:
    """One batch of examples and their candidates.

    The sampled negatives are an explicit ``[B, K]`` tensor. In-batch negatives (the other
    rows' positives) are not materialised: a model scores them with one ``[B, B]`` product,
    and ``in_batch_mask`` marks the accidental hits among them (the diagonal included). Every
    candidate's logQ correction is the log of its expected count in the pool, so in-batch
    column ``j`` uses ``positive_log_q[j]``.
    """

    user: UserInput
    positives: torch.Tensor  # int64 [B]
    negatives: torch.Tensor  # int64 [B, K] sampled negatives, K may be 0
    negative_mask: torch.Tensor  # bool [B, K]: accidental hits to drop
    positive_log_q: torch.Tensor | None  # float [B], subtracted from positive logits
    negative_log_q: torch.Tensor | None  # float [B, K]
    in_batch_mask: torch.Tensor | None = None  # bool [B, B]; None: no in-batch negatives
    # int64 [B]: each row's position in TrainExamples, so that what was computed once per
    # training example (a teacher's cached output, privileged features) can be looked up
    examples: torch.Tensor | None = None
    # train.candidate_scoring "auto": an inner-product model may score the candidates by one
    # matrix product over the batch's distinct items when they are few
    dense_scores: bool = False

    def to(self, device: torch.device | str) -> "TrainBatch":
        """The same batch on ``device``: batches are built on the CPU and trained on ``train.device``."""
        return dataclasses.replace(self, user=self.user.to(device), **{
            f.name: _to(getattr(self, f.name), device) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        })

    def logits(
        self, positive: torch.Tensor, sampled: torch.Tensor, in_batch: torch.Tensor | None = None,
        states: dict | None = None,
    ) -> CandidateLogits:
        """A model's logits on this batch's candidates (``positive [B]``, ``sampled [B, K]``,
        ``in_batch [B, B]`` where the batch has in-batch negatives) with the batch's masks and
        log-Q terms: what :func:`crosstower.losses.listwise_softmax` reads."""
        with_in_batch = self.in_batch_mask is not None and in_batch is not None
        return CandidateLogits(
            positive, sampled, self.negative_mask, in_batch if with_in_batch else None,
            self.in_batch_mask if with_in_batch else None, self.positive_log_q, self.negative_log_q, states or {},
        )


@dataclass
class PointwiseBatch:
    """Labelled (user, item) rows for pointwise training and pre-ranking (protocol P4)."""

    user: UserInput  # [B] users with their histories before each row
    items: torch.Tensor  # int64 [B] the row's item
    labels: torch.Tensor  # float [B] 1.0 positive, 0.0 negative
    # Per-row values of user and item fields that replace the tables' (P4's ordered statistics
    # of training rows), each [B]; read through crosstower.nn.fields.row_values.
    user_values: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    item_values: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    def to(self, device: torch.device | str) -> "PointwiseBatch":
        return PointwiseBatch(
            self.user.to(device), self.items.to(device), self.labels.to(device),
            {n: v.to(device) for n, v in self.user_values.items()}, {n: v.to(device) for n, v in self.item_values.items()},
        )

    def row_values(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Field name -> (the index tensor the model embeds, the rows' values), as
        :func:`crosstower.nn.fields.row_values` takes them."""
        return {
            **{name: (self.user.users, values) for name, values in self.user_values.items()},
            **{name: (self.items, values) for name, values in self.item_values.items()},
        }


def _to(tensor: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


class TrainExamples:
    """All training interactions as examples, with vectorised history gathering."""

    def __init__(self, train: pd.DataFrame, history_length: int, num_users: int):
        frame = train.sort_values([USER, TIME, ITEM], kind="stable")
        self.users = frame[USER].to_numpy(np.int64)
        self.items = frame[ITEM].to_numpy(np.int64)
        times = self.times = frame[TIME].to_numpy(np.float64)
        counts = np.bincount(self.users, minlength=num_users)
        self.user_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.history_length = history_length
        # Example age (YouTubeDNN): how old the example is relative to the newest training row,
        # in units of the spread of time stamps; serving uses age 0.
        span = max(times.max() - times.min(), 1.0) if len(times) else 1.0
        self.example_age = ((times.max() - times) / span).astype(np.float32) if len(times) else times

    def __len__(self) -> int:
        return len(self.items)

    def user_input(self, index: np.ndarray) -> UserInput:
        users = self.users[index]
        offsets = index[:, None] - self.history_length + np.arange(self.history_length)[None, :]
        valid = offsets >= self.user_start[users][:, None]
        history = np.where(valid, self.items[np.clip(offsets, 0, None)], -1)
        return UserInput(
            torch.from_numpy(users),
            torch.from_numpy(history),
            torch.from_numpy(self.example_age[index]),
        )


def eval_user_input(block: EvalUsers, rows: np.ndarray, history_length: int) -> UserInput:
    """The model input of evaluation users ``rows`` of ``block`` (example age 0)."""
    history = block.history.take(rows).padded_tail(history_length)
    users = torch.from_numpy(block.users[rows])
    return UserInput(users, torch.from_numpy(history), torch.zeros(len(rows)))


class PointwiseRows:
    """Labelled rows of one P4 part and, per row, the model input the row may read.

    A row ``(u, i, t, y)`` reads ``u``'s side features and ``u``'s training positives with time
    stamp strictly before ``t`` (the most recent ``history_length`` of them, most recent last):
    a training row never sees its own or a simultaneous interaction, and a validation or test
    row sees training data only. ``training`` gives the rows YouTubeDNN's example age (relative
    to the newest row, as :class:`TrainExamples`); evaluation rows get age 0, as at serving.
    ``user_values`` / ``item_values`` (field name -> one value per row) replace the side tables'
    values of those fields for these rows (P4's ordered statistics of training rows).
    """

    def __init__(
        self, rows: pd.DataFrame, train_positives: pd.DataFrame, history_length: int, num_users: int,
        training: bool = False, user_values: dict[str, np.ndarray] | None = None,
        item_values: dict[str, np.ndarray] | None = None,
    ):
        self.user_values, self.item_values = dict(user_values or {}), dict(item_values or {})
        for name, values in {**self.user_values, **self.item_values}.items():
            if len(values) != len(rows):
                raise ValueError(f"per-row values of field '{name}': {len(values)} values for {len(rows)} rows")
        self.users = rows[USER].to_numpy(np.int64)
        self.items = rows[ITEM].to_numpy(np.int64)
        self.labels = rows[LABEL].to_numpy(np.float32)
        times = rows[TIME].to_numpy(np.int64)
        positives = train_positives.sort_values([USER, TIME, ITEM], kind="stable")
        pos_users = positives[USER].to_numpy(np.int64)
        pos_times = positives[TIME].to_numpy(np.int64)
        # One trailing -1 so that gathering from an empty positive set yields padding.
        self.positive_items = np.append(positives[ITEM].to_numpy(np.int64), -1)
        counts = np.bincount(pos_users, minlength=num_users)
        self.user_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # The end of each row's history: the number of positives ordered before (user, time)
        # by the key user * T + rank(time), found by one binary search.
        _, time_rank = np.unique(np.concatenate([pos_times, times]), return_inverse=True)
        width = int(time_rank.max(initial=0)) + 1
        pos_key = pos_users * width + time_rank[: len(pos_times)]
        row_key = self.users * width + time_rank[len(pos_times) :]
        self.history_end = np.searchsorted(pos_key, row_key, side="left").astype(np.int64)
        self.history_length = history_length
        if training and len(times):
            span = max(float(times.max() - times.min()), 1.0)
            self.example_age = ((times.max() - times) / span).astype(np.float32)
        else:
            self.example_age = np.zeros(len(times), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def user_input(self, index: np.ndarray) -> UserInput:
        users = self.users[index]
        offsets = self.history_end[index][:, None] - self.history_length + np.arange(self.history_length)[None, :]
        valid = offsets >= self.user_start[users][:, None]
        history = np.where(valid, self.positive_items[np.clip(offsets, 0, None)], -1)
        return UserInput(torch.from_numpy(users), torch.from_numpy(history), torch.from_numpy(self.example_age[index]))

    def batch(self, index: np.ndarray) -> PointwiseBatch:
        """Rows ``index`` as a :class:`PointwiseBatch`."""
        return PointwiseBatch(
            self.user_input(index), torch.from_numpy(self.items[index]), torch.from_numpy(self.labels[index]),
            {n: torch.from_numpy(v[index]) for n, v in self.user_values.items()},
            {n: torch.from_numpy(v[index]) for n, v in self.item_values.items()},
        )
