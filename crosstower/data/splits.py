"""Evaluation protocols P1, P2 and P3 (DESIGN.md), deterministic by seed and saved with the run.

A :class:`Split` holds the training interactions and, for validation and test, an
:class:`EvalUsers` block: which users are evaluated, their model-input history (time-ordered),
the items excluded from their ranking and their targets.

* P1 temporal per user: each user's interactions sorted by (timestamp, item); the last 20% are
  test, the 10% before them validation, the rest training. Validation users see their training
  items as history; test users see training + validation items. Those items are also excluded.
* P2 user holdout: users are shuffled with the seed and split 80/10/10. Training users give all
  their interactions; a held-out user's first 80% (time order) is the history, the rest targets.
* P3 cold start: the P2 user holdout, but the held-out user has no history (side features only)
  and every interaction is a target; nothing is excluded.
* P4 pre-ranking: rows are labelled by their rating (``>= positive_min`` positive, ``<=
  negative_max`` negative, in between dropped) and the labelled rows are split temporally per
  user like P1 (``order="temporal"``), or, as IntTower's released scripts split, at random over
  all rows 70/10/20 by the seed (``order="random"``). ``Split.labelled`` holds the labelled
  train/val/test rows (user, item, timestamp, rating, label); ``Split.train`` holds the training
  *positives*, the interactions a model may read as history; ``val`` / ``test`` are ranking
  views (train-positive history, the part's positives as targets) kept so every split has the
  same shape. The model input of a labelled row is built by
  :class:`~crosstower.data.batching.PointwiseRows`.

Where the release ships its own user split (Deezer's train/validation/test user files, kept in
``dataset.metadata["user_split"]``), P2 and P3 use it instead of the seeded shuffle.

Targets are sets: repeated items and items already excluded are dropped from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crosstower.data.dataset import ITEM, RATING, TIME, USER, Dataset
from crosstower.data.ragged import Ragged
from crosstower.errors import DataError

PROTOCOLS = ("p1", "p2", "p3", "p4")
EVAL_PARTS = ("history", "exclude", "targets")
LABEL = "label"
LABELLED_PARTS = ("train", "val", "test")
LABELLED_COLUMNS = (USER, ITEM, TIME, RATING, LABEL)
# P4's default rating thresholds (IntTower's MovieLens labels: 4-5 positive, 1-2 negative, 3 dropped).
POSITIVE_MIN, NEGATIVE_MAX = 4.0, 2.0


@dataclass(frozen=True)
class EvalUsers:
    """Users to rank for, with their history (model input), exclusions and targets."""

    users: np.ndarray  # int64 [n] user indices
    history: Ragged  # time-ordered item indices the model may read
    exclude: Ragged  # items removed from the ranking
    targets: Ragged  # items to retrieve (a set per user)

    def __len__(self) -> int:
        return len(self.users)

    def sample(self, count: int, seed: int) -> EvalUsers:
        """At most ``count`` of these users, drawn with ``seed``, in their original order."""
        if count >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False))
        return EvalUsers(self.users[rows], self.history.take(rows), self.exclude.take(rows), self.targets.take(rows))


@dataclass(frozen=True)
class Split:
    protocol: str
    seed: int
    train: pd.DataFrame  # columns user, item, timestamp (+ rating), sorted by (user, timestamp, item)
    val: EvalUsers
    test: EvalUsers
    # P4 only: the labelled rows of each part (LABELLED_PARTS), columns LABELLED_COLUMNS, each
    # part sorted by (user, timestamp, item); label is float32 1.0 / 0.0.
    labelled: dict[str, pd.DataFrame] | None = None

    def save(self, path: Path) -> None:
        """Write the split as one compressed ``.npz`` so a run can be re-evaluated exactly."""
        arrays: dict[str, np.ndarray] = {
            "protocol": np.array(self.protocol),
            "seed": np.array(self.seed),
            "train_user": self.train[USER].to_numpy(),
            "train_item": self.train[ITEM].to_numpy(),
            "train_timestamp": self.train[TIME].to_numpy(),
        }
        for name, block in (("val", self.val), ("test", self.test)):
            arrays[f"{name}_users"] = block.users
            for part in EVAL_PARTS:
                arrays.update(getattr(block, part).save(f"{name}_{part}"))
        for name, rows in (self.labelled or {}).items():
            arrays.update({f"labelled_{name}_{col}": rows[col].to_numpy() for col in LABELLED_COLUMNS})
        np.savez_compressed(path, **arrays)

    @staticmethod
    def load(path: Path) -> "Split":
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            train = pd.DataFrame({USER: arrays["train_user"], ITEM: arrays["train_item"], TIME: arrays["train_timestamp"]})

            def block(name: str) -> EvalUsers:
                parts = {p: Ragged(arrays[f"{name}_{p}_indptr"], arrays[f"{name}_{p}_values"]) for p in EVAL_PARTS}
                return EvalUsers(arrays[f"{name}_users"], **parts)

            labelled = None
            if "labelled_train_label" in arrays:
                labelled = {
                    name: pd.DataFrame({col: arrays[f"labelled_{name}_{col}"] for col in LABELLED_COLUMNS})
                    for name in LABELLED_PARTS
                }
            protocol, seed = str(arrays["protocol"]), int(arrays["seed"])
            return Split(protocol, seed, train, block("val"), block("test"), labelled)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable split file ({exc})") from None
        except KeyError as exc:
            raise DataError(f"{path}: not a crosstower split (missing {exc})") from None


def make_split(
    dataset: Dataset,
    protocol: str,
    seed: int = 0,
    positive_min: float = POSITIVE_MIN,
    negative_max: float = NEGATIVE_MAX,
    order: str = "temporal",
) -> Split:
    """Split ``dataset`` by ``protocol`` (p1 to p4); raises DataError on an empty part.

    ``positive_min``, ``negative_max`` and ``order`` (``"temporal"`` or ``"random"``) are P4's
    rating thresholds and row split (ignored by the others).
    """
    protocol = protocol.lower()
    inter = _sorted_interactions(dataset.interactions)
    if protocol == "p1":
        split = _temporal_split(inter, dataset.num_users, seed)
    elif protocol == "p4":
        split = _pointwise_split(inter, dataset, seed, positive_min, negative_max, order)
    elif protocol in ("p2", "p3"):
        release_split = dataset.metadata.get("user_split")
        split = _user_holdout_split(inter, dataset.num_users, seed, protocol == "p3", release_split)
    else:
        raise DataError(f"split.protocol: unknown protocol '{protocol}' (expected one of {PROTOCOLS})")
    for name, part in (("train", split.train), ("validation", split.val.users), ("test", split.test.users)):
        if len(part) == 0:
            raise DataError(f"split {protocol}: the {name} part of '{dataset.name}' is empty")
    return split


def _sorted_interactions(inter: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in inter.columns if c in (USER, ITEM, TIME, "rating")]
    return inter[cols].sort_values([USER, TIME, ITEM], kind="stable").reset_index(drop=True)


def _position_in_user(inter: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each row's 0-based position within its user, and the user's interaction count."""
    position = inter.groupby(USER).cumcount().to_numpy()
    count = inter.groupby(USER)[ITEM].transform("size").to_numpy()
    return position, count


def _temporal_parts(inter: pd.DataFrame) -> np.ndarray:
    """Each row's part (0 train, 1 validation, 2 test) in a frame sorted by (user, time, item):
    per user, the last 20% (rounded down) test, the 10% before them validation."""
    position, count = _position_in_user(inter)
    n_test = np.floor(count * 0.2).astype(np.int64)
    n_val = np.floor(count * 0.1).astype(np.int64)
    return np.where(position >= count - n_test, 2, np.where(position >= count - n_test - n_val, 1, 0))


def _random_parts(num_rows: int, seed: int) -> np.ndarray:
    """Each row's part (0 train, 1 validation, 2 test), drawn by the seed over all rows at once:
    70/10/20, P1's proportions, without regard to user or time."""
    rank = np.empty(num_rows, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(num_rows)] = np.arange(num_rows)
    return np.where(rank < round(0.7 * num_rows), 0, np.where(rank < round(0.8 * num_rows), 1, 2))


def _temporal_split(inter: pd.DataFrame, num_users: int, seed: int) -> Split:
    part = _temporal_parts(inter)
    train, val, test = (inter[part == p] for p in (0, 1, 2))
    train_hist = _rows(train, num_users)
    val_rows = _rows(val, num_users)
    hist_for_test = Ragged.concat_rows(train_hist, val_rows)
    val_block = _eval_block(np.unique(val[USER].to_numpy()), train_hist, train_hist, val_rows)
    test_block = _eval_block(np.unique(test[USER].to_numpy()), hist_for_test, hist_for_test, _rows(test, num_users))
    return Split("p1", seed, train.reset_index(drop=True), val_block, test_block)


def label_rows(inter: pd.DataFrame, positive_min: float, negative_max: float) -> pd.DataFrame:
    """The rows with a label: rating >= ``positive_min`` -> 1.0, <= ``negative_max`` -> 0.0;
    rows in between (and unrated rows) are dropped. The frame's order is kept."""
    rating = inter[RATING].to_numpy(np.float64)
    positive, negative = rating >= positive_min, rating <= negative_max
    rows = inter[positive | negative].copy()
    rows[LABEL] = positive[positive | negative].astype(np.float32)
    return rows


def _pointwise_split(
    inter: pd.DataFrame, dataset: Dataset, seed: int, positive_min: float, negative_max: float, order: str
) -> Split:
    if RATING not in inter.columns:
        raise DataError(
            f"split p4: data set '{dataset.name}' has no 'rating' column; P4 labels rows by rating "
            f"(>= {positive_min:g} positive, <= {negative_max:g} negative)"
        )
    if negative_max >= positive_min:
        raise DataError(f"split p4: negative_max {negative_max:g} must be below positive_min {positive_min:g}")
    if order not in ("temporal", "random"):
        raise DataError(f"split p4: order must be 'temporal' or 'random', got '{order}'")
    labelled = label_rows(inter, positive_min, negative_max).reset_index(drop=True)
    part = _temporal_parts(labelled) if order == "temporal" else _random_parts(len(labelled), seed)
    rows = {
        name: labelled[part == p][list(LABELLED_COLUMNS)].reset_index(drop=True) for p, name in enumerate(LABELLED_PARTS)
    }
    for name, frame in rows.items():
        _check_labelled(frame, name, dataset.name, per_user=name != "train")
    train = rows["train"]
    positives = train[train[LABEL] == 1][[USER, ITEM, TIME, RATING]].reset_index(drop=True)
    # Ranking views of the labelled positives: history and exclusions are the training positives.
    history = _rows(positives, dataset.num_users)
    blocks = {}
    for name in ("val", "test"):
        frame = rows[name]
        targets = _rows(frame[frame[LABEL] == 1], dataset.num_users)
        blocks[name] = _eval_block(np.unique(frame[USER].to_numpy()), history, history, targets)
    return Split("p4", seed, positives, blocks["val"], blocks["test"], rows)


def _check_labelled(rows: pd.DataFrame, name: str, dataset_name: str, per_user: bool) -> None:
    """AUC needs both labels in a part; GAUC (validation, test) a user who has both."""
    where = f"split p4: the {name} rows of '{dataset_name}'"
    labels = rows[LABEL].to_numpy()
    if len(rows) == 0:
        raise DataError(f"{where} are empty (too few labelled rows per user)")
    if labels.min() == labels.max():
        raise DataError(f"{where} all have label {int(labels[0])}; check split.positive_min / split.negative_max")
    if per_user:
        by_user = rows.groupby(USER)[LABEL].agg(["min", "max"])
        if not (by_user["min"] < by_user["max"]).any():
            raise DataError(f"{where}: no user has both labels, so GAUC is undefined")


def _user_groups(users: np.ndarray, seed: int, release_split: np.ndarray | None) -> dict[str, np.ndarray]:
    """Train/val/test users: the release's own user split where it has one (Deezer), else a
    seeded 80/10/10 shuffle."""
    if release_split is not None:
        names = {"train": "train", "val": "validation", "test": "test"}
        return {k: users[release_split[users] == v] for k, v in names.items()}
    shuffled = np.random.default_rng(seed).permutation(users)
    n_train, n_val = int(round(len(users) * 0.8)), int(round(len(users) * 0.1))
    return {"train": shuffled[:n_train], "val": shuffled[n_train : n_train + n_val], "test": shuffled[n_train + n_val :]}


def _user_holdout_split(
    inter: pd.DataFrame, num_users: int, seed: int, cold_start: bool, release_split: np.ndarray | None = None
) -> Split:
    groups = _user_groups(np.unique(inter[USER].to_numpy()), seed, release_split)
    user_col = inter[USER].to_numpy()
    train = inter[np.isin(user_col, groups["train"])].reset_index(drop=True)
    blocks = {}
    for name in ("val", "test"):
        held = inter[np.isin(user_col, groups[name])]
        position, count = _position_in_user(held)
        is_history = position < np.ceil(count * 0.8) if not cold_start else np.zeros(len(held), bool)
        history = _rows(held[is_history], num_users)
        targets = _rows(held if cold_start else held[~is_history], num_users)
        blocks[name] = _eval_block(np.sort(groups[name]), history, history, targets)
    return Split("p3" if cold_start else "p2", seed, train, blocks["val"], blocks["test"])


def _rows(inter: pd.DataFrame, num_users: int) -> Ragged:
    """Items per user (all users, empty rows included), in the frame's (time) order."""
    return Ragged.from_groups(inter[USER].to_numpy(), inter[ITEM].to_numpy(), num_users)


def _eval_block(users: np.ndarray, history: Ragged, exclude: Ragged, targets: Ragged) -> EvalUsers:
    """Restrict to ``users`` and clean targets: unique, not excluded; drop users left with none."""
    users = users.astype(np.int64)
    history, exclude, targets = history.take(users), exclude.take(users), targets.take(users)
    targets = _clean_targets(exclude, targets)
    keep = targets.lengths > 0
    if not keep.all():
        rows = np.nonzero(keep)[0]
        users, history, exclude, targets = users[rows], history.take(rows), exclude.take(rows), targets.take(rows)
    return EvalUsers(users, history, exclude, targets)


def _clean_targets(exclude: Ragged, targets: Ragged) -> Ragged:
    """Targets as sets: unique per row, in item order, without the row's excluded items."""
    width = int(max(targets.values.max(initial=0), exclude.values.max(initial=0))) + 1
    keys = np.unique(targets.pair_keys(width))
    keys = keys[~np.isin(keys, exclude.pair_keys(width))]
    return Ragged.from_groups(keys // width, keys % width, targets.num_rows)
