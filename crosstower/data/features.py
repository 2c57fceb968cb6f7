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
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from crosstower.data.dataset import ITEM, RATING, USER, Dataset
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


def add_train_statistics(dataset: Dataset, split: Split) -> Dataset:
    """A copy of ``dataset`` whose user and item tables also hold the P4 statistics of
    ``split``'s labelled training rows; the original dataset is left unchanged."""
    if split.labelled is None:
        raise DataError(f"split {split.protocol}: has no labelled rows to compute P4 statistics from")
    stats = train_statistics(split.labelled["train"], dataset.num_users, dataset.num_items)
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


def standardise(values: np.ndarray) -> np.ndarray:
    """z-score over the side's entities (a constant column becomes zeros), float32."""
    std = values.std()
    return ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
