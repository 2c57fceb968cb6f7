"""Leakage-free rating statistics for protocol P4, added to the side tables as ordinary fields.

IntTower's MovieLens script feeds ``user_mean_rating`` and ``item_mean_rating`` computed from each
split's own labels, test labels included (``reference/sparcode_inttower_mvke.md`` 2.5). Here
every statistic is computed from the **training rows of the split only**:

* ``user_mean_rating`` / ``item_mean_rating``: the mean rating of the entity's labelled training
  rows; an entity with no training row gets the global training mean;
* ``user_train_count`` / ``item_train_count``: ``log1p`` of the number of those rows (0 if none).

They become ``numeric`` fields, standardised like every numeric field (zero mean, unit variance
over the side's entities; a fixed affine map of train-only numbers), so every model reads them
through its field embedder with no special case. Validation and test ratings never enter.

A training row must not read its own rating either: the entity statistics above contain it (a
user's mean over 10 rows is a tenth the row's label), so a model trained on them learns to trust
the mean more than it deserves on validation and test rows. Under ``split.statistics: ordered``
(the default) each training row therefore reads **ordered statistics**
(:func:`ordered_row_statistics`): those of the entity's training rows strictly before the row's
time stamp, the rule its history follows and CatBoost's "ordered target statistics". Leaving out
only the row itself would not do: given the entity, a leave-one-out mean falls as the row's rating
rises, so a model that knows the entity could read the label back.

Two settings reproduce the leaks of IntTower's released scripts (``reference/
sparcode_inttower_mvke.md`` 2.5) only to measure what they are worth to each model; their
figures are never results. ``split.statistics: all_labels`` computes the tables from every
labelled row, validation and test included (``leak_held_out_labels``; its Amazon script);
``in_split`` has each part's rows read the statistics of that part's own labelled rows
(:func:`in_split_row_statistics`; its MovieLens script), so a test row's mean holds its label
with the weight of one over the user's test rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from crosstower.data.dataset import ITEM, RATING, TIME, USER, Dataset
from crosstower.data.schema import FeatureTable, Field, FieldKind
from crosstower.data.splits import Split
from crosstower.errors import DataError

SIDES = {"user": USER, "item": ITEM}
STATISTICS = ("mean_rating", "train_count")


def field_names(side: str) -> tuple[str, ...]:
    """The statistic fields of ``side`` ("user" or "item")."""
    return tuple(f"{side}_{name}" for name in STATISTICS)


def train_statistics(train: pd.DataFrame, num_users: int, num_items: int) -> dict[str, np.ndarray]:
    """Raw (unstandardised) statistics of the training rows ``train`` (columns user, item, rating),
    one float64 array per field name, indexed by user or item index."""
    if len(train) == 0:
        raise DataError("P4 statistics: no training rows")
    ratings = train[RATING].to_numpy(np.float64)
    global_mean = ratings.mean()
    out = {}
    for side, column in SIDES.items():
        size = num_users if side == "user" else num_items
        index = train[column].to_numpy(np.int64)
        count = np.bincount(index, minlength=size).astype(np.float64)
        total = np.bincount(index, weights=ratings, minlength=size)
        mean = np.divide(total, count, out=np.full(size, global_mean), where=count > 0)
        out[f"{side}_mean_rating"], out[f"{side}_train_count"] = mean, np.log1p(count)
    return out


def ordered_statistics(train: pd.DataFrame) -> dict[str, np.ndarray]:
    """Raw statistics of each row of ``train`` (columns user, item, timestamp, rating), computed
    from the same entity's rows with an earlier time stamp only; one float64 array per field
    name, aligned with ``train``'s rows. A row with no earlier row reads count 0 and the global
    training mean, as an entity with no training row does in :func:`train_statistics`."""
    if len(train) == 0:
        raise DataError("P4 statistics: no training rows")
    ratings = train[RATING].to_numpy(np.float64)
    times = train[TIME].to_numpy(np.int64)
    global_mean = ratings.mean()
    out = {}
    for side, column in SIDES.items():
        entity = train[column].to_numpy(np.int64)
        order = np.lexsort((times, entity))
        sorted_entity, sorted_time = entity[order], times[order]
        # Sums over the earlier rows of the sorted order: from the entity's first row up to the
        # first row of the row's own (entity, time) run, so rows at one time stamp never see each other.
        cumulative = np.concatenate([[0.0], np.cumsum(ratings[order])])
        run_start = _group_starts(sorted_entity, sorted_time)
        entity_start = _group_starts(sorted_entity)
        count = (run_start - entity_start).astype(np.float64)
        total = cumulative[run_start] - cumulative[entity_start]
        mean = np.divide(total, count, out=np.full(len(order), global_mean), where=count > 0)
        for name, values in ((f"{side}_mean_rating", mean), (f"{side}_train_count", np.log1p(count))):
            out[name] = np.empty(len(order))
            out[name][order] = values
    return out


def _group_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """For each position of rows sorted by ``sorted_keys``, the position of the first row with
    the same keys."""
    size = len(sorted_keys[0])
    new_group = np.zeros(size, dtype=bool)
    new_group[:1] = True
    for key in sorted_keys:
        new_group[1:] |= key[1:] != key[:-1]
    return np.maximum.accumulate(np.where(new_group, np.arange(size), 0))


def ordered_row_statistics(dataset: Dataset, split: Split) -> dict[str, dict[str, np.ndarray]]:
    """:func:`ordered_statistics` of ``split``'s labelled training rows, standardised by the same
    affine map as the entity statistics in the tables (so that a mean rating of 4 is one number
    to the model whether a training row or a test row reads it): side ("user", "item") -> field
    name -> float32 values aligned with the rows."""
    entity = _entity_statistics(dataset, split)
    rows = ordered_statistics(_labelled_train(split))
    return {side: {n: standardise(rows[n], reference=entity[n]) for n in field_names(side)} for side in SIDES}


def in_split_row_statistics(dataset: Dataset, split: Split, part: str) -> dict[str, dict[str, np.ndarray]]:
    """Statistics of ``part``'s labelled rows ("train", "val" or "test"), each row reading those
    of its own entities within the part, its own label included (the leak of ``in_split``), on
    the tables' scale; shaped like :func:`ordered_row_statistics`."""
    rows = split.labelled[part]
    entity = _entity_statistics(dataset, split)
    within = train_statistics(rows, dataset.num_users, dataset.num_items)
    index = {side: rows[column].to_numpy(np.int64) for side, column in SIDES.items()}
    return {
        side: {n: standardise(within[n][index[side]], reference=entity[n]) for n in field_names(side)}
        for side in SIDES
    }


def part_row_statistics(
    dataset: Dataset, split: Split, part: str, mode: str | None
) -> dict[str, dict[str, np.ndarray]] | None:
    """The per-row statistics the rows of ``part`` read under ``split.statistics`` = ``mode``
    instead of the tables' values, or None where they read the tables."""
    if mode == "ordered" and part == "train":
        return ordered_row_statistics(dataset, split)
    if mode == "in_split":
        return in_split_row_statistics(dataset, split, part)
    return None


def _entity_statistics(dataset: Dataset, split: Split) -> dict[str, np.ndarray]:
    """:func:`train_statistics` of ``split``'s labelled training rows: what the tables hold, and
    the scale every per-row variant is standardised by."""
    return train_statistics(_labelled_train(split), dataset.num_users, dataset.num_items)


def _labelled_train(split: Split) -> pd.DataFrame:
    if split.labelled is None:
        raise DataError(f"split {split.protocol}: has no labelled rows to compute P4 statistics from")
    return split.labelled["train"]


def add_train_statistics(dataset: Dataset, split: Split, leak_held_out_labels: bool = False) -> Dataset:
    """A copy of ``dataset`` whose user and item tables also hold the P4 statistics of
    ``split``'s labelled training rows (of all its labelled rows, validation and test included,
    with ``leak_held_out_labels``: a deliberate leak, see the module docstring); the original
    dataset is left unchanged."""
    rows = _labelled_train(split)
    if leak_held_out_labels:
        rows = pd.concat([split.labelled[part] for part in ("train", "val", "test")], ignore_index=True)
    stats = train_statistics(rows, dataset.num_users, dataset.num_items)
    tables = {}
    for side, table in (("user", dataset.users), ("item", dataset.items)):
        clash = [n for n in field_names(side) if n in table]
        if clash:
            raise DataError(f"{side} features: field(s) {clash} clash with the P4 training statistics")
        copy = FeatureTable(table.num_rows, dict(table.fields), dict(table.values))
        for name in field_names(side):
            copy.add(Field(name, FieldKind.NUMERIC), standardise(stats[name]))
        tables[side] = copy
    return dataclasses.replace(dataset, users=tables["user"], items=tables["item"])


def standardise(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """z-score by the mean and standard deviation of ``reference`` (default ``values`` itself:
    the side's entities; a constant reference leaves a shift only), float32."""
    reference = values if reference is None else reference
    std = reference.std()
    return ((values - reference.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
