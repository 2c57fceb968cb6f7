"""Fields and their kinds, and the feature table of one side (users or items).

A side is a table with one row per entity (user or item index). Each column is a *field* whose
kind tells models how to embed it:

* ``categorical``: one id per row, int64 in ``[0, vocab_size)``; 0 means missing/padding.
* ``multi_categorical``: up to ``max_len`` ids per row (genres, tags), int64 ``[n, max_len]``
  padded with 0.
* ``numeric``: one float per row, standardised (zero mean, unit variance; missing -> 0).
* ``dense_vector``: a pretrained float vector per row, float32 ``[n, dim]``.
* ``history``: the user's time-ordered item sequence. It depends on the split (a user's history
  is what precedes the targets), so it is not stored in the table: batches carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from crosstower.errors import DataError


class FieldKind(str, Enum):
    CATEGORICAL = "categorical"
    MULTI_CATEGORICAL = "multi_categorical"
    NUMERIC = "numeric"
    DENSE_VECTOR = "dense_vector"
    HISTORY = "history"


@dataclass(frozen=True)
class Field:
    """One column of a side table.

    ``vocab_size`` counts the padding id 0 (categorical kinds); ``dim`` is the vector length
    (dense vectors) or the maximum number of ids per row (multi-categorical).
    """

    name: str
    kind: FieldKind
    vocab_size: int = 0
    dim: int = 1
    # The raw value of each id from 1 on (categorical kinds read from a file), so that what a
    # model recommends can be shown as the data set spells it; empty where there is none.
    vocabulary: tuple = field(default=(), compare=False, repr=False)


@dataclass
class FeatureTable:
    """Columns of one side, all with ``num_rows`` rows, keyed by field name."""

    num_rows: int
    fields: dict[str, Field] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, spec: Field, values: np.ndarray) -> None:
        """Add a column after checking its shape and dtype against its kind."""
        expected = _expected_shape(spec, self.num_rows)
        if values.shape != expected:
            raise DataError(f"field '{spec.name}': expected shape {expected}, got {values.shape}")
        if spec.kind in (FieldKind.CATEGORICAL, FieldKind.MULTI_CATEGORICAL):
            values = values.astype(np.int64, copy=False)
            if values.size and (values.min() < 0 or values.max() >= spec.vocab_size):
                raise DataError(f"field '{spec.name}': ids must lie in [0, {spec.vocab_size})")
        else:
            values = values.astype(np.float32, copy=False)
        self.fields[spec.name] = spec
        self.values[spec.name] = values

    def select(self, names: list[str] | None) -> "FeatureTable":
        """The table restricted to ``names`` (all fields when None); unknown names are an error."""
        if names is None:
            return self
        unknown = [n for n in names if n not in self.fields]
        if unknown:
            raise DataError(f"unknown field(s) {unknown}; this side has {sorted(self.fields)}")
        return FeatureTable(
            self.num_rows,
            {n: self.fields[n] for n in names},
            {n: self.values[n] for n in names},
        )

    def __contains__(self, name: str) -> bool:
        return name in self.fields


def _expected_shape(spec: Field, num_rows: int) -> tuple[int, ...]:
    if spec.kind == FieldKind.MULTI_CATEGORICAL:
        return (num_rows, spec.dim)
    if spec.kind == FieldKind.DENSE_VECTOR:
        return (num_rows, spec.dim)
    if spec.kind == FieldKind.HISTORY:
        raise DataError(f"field '{spec.name}': history fields are carried by batches, not tables")
    return (num_rows,)
