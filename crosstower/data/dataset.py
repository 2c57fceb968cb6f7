"""The in-memory dataset every loader produces, and the one builder they all call.

Loaders only parse their native format into plain pandas frames (raw ids, raw feature values);
:func:`build_dataset` re-indexes users and items to ``0..n-1``, encodes the feature columns by
their declared kind, and checks what a model will later rely on. Keeping the encoding in one
place means every data set gets the same conventions (id 0 = missing, standardised numerics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from crosstower.data.schema import FeatureTable, Field, FieldKind
from crosstower.errors import ConfigError, DataError

USER, ITEM, TIME, RATING = "user", "item", "timestamp", "rating"


@dataclass(frozen=True)
class FieldSpec:
    """How to encode one raw feature column (or a group of columns) into a :class:`Field`.

    ``columns`` lists several raw columns that together form one dense vector (the Deezer
    release stores a 128-d embedding as 128 columns); otherwise the raw column is ``column``.
    ``sep`` splits a string column into tokens for a multi-categorical field.
    """

    column: str
    kind: FieldKind
    name: str | None = None
    max_len: int = 32
    sep: str | None = None
    columns: tuple[str, ...] | None = None

    @property
    def field_name(self) -> str:
        return self.name or self.column


@dataclass
class Dataset:
    """Interactions plus user and item feature tables, all keyed by dense indices.

    ``interactions`` has int64 columns ``user`` and ``item`` (indices into ``user_ids`` and
    ``item_ids``), an int64 ``timestamp`` (the row order within the user where the release has
    no time stamps, see ``has_time``) and an optional float ``rating``.
    """

    name: str
    interactions: pd.DataFrame
    users: FeatureTable
    items: FeatureTable
    user_ids: np.ndarray
    item_ids: np.ndarray
    has_time: bool = True
    metadata: dict = field(default_factory=dict)
    # Each item's title or name where the item features have a "title" or "name" column (shown
    # beside recommendations), else None.
    item_names: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def stats(self) -> dict:
        inter = self.interactions
        per_user = inter.groupby(USER).size()
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": len(inter),
            "density": len(inter) / max(1, self.num_users * self.num_items),
            "interactions_per_user_median": float(per_user.median()) if len(per_user) else 0.0,
            "has_time": self.has_time,
            "has_rating": RATING in inter.columns,
            "user_fields": _describe_fields(self.users),
            "item_fields": _describe_fields(self.items),
        }


def _describe_fields(table: FeatureTable) -> dict[str, dict]:
    """How each field was encoded: its kind; for categorical kinds the vocabulary size (padding
    id 0 included) and the share of rows with no value; for multi-categorical ones the slots per
    row and the mean number filled; for dense vectors the width."""
    out = {}
    for name, spec in table.fields.items():
        values = table.values[name]
        info: dict = {"kind": spec.kind.value}
        if spec.kind == FieldKind.CATEGORICAL:
            info.update(vocab_size=spec.vocab_size, missing_share=round(float((values == 0).mean()), 4) if len(values) else 0.0)
        elif spec.kind == FieldKind.MULTI_CATEGORICAL:
            filled = (values > 0).sum(axis=1)
            info.update(vocab_size=spec.vocab_size, max_values=spec.dim,
                        mean_values=round(float(filled.mean()), 2) if len(values) else 0.0,
                        missing_share=round(float((filled == 0).mean()), 4) if len(values) else 0.0)
        elif spec.kind == FieldKind.DENSE_VECTOR:
            info.update(dim=spec.dim)
        out[name] = info
    return out


def build_dataset(
    name: str,
    interactions: pd.DataFrame,
    user_features: pd.DataFrame | None = None,
    user_specs: list[FieldSpec] | tuple = (),
    item_features: pd.DataFrame | None = None,
    item_specs: list[FieldSpec] | tuple = (),
    source: str = "interactions",
) -> Dataset:
    """Build a :class:`Dataset` from raw frames.

    ``interactions`` needs columns ``user_id`` and ``item_id`` and may have ``timestamp`` and
    ``rating``. Feature frames are indexed by the raw user / item id. The catalogue is the set
    of items that occur in the interactions; users likewise. ``source`` names the file in errors.
    """
    for col in ("user_id", "item_id"):
        if col not in interactions.columns:
            raise DataError(f"{source}: missing column '{col}' (have {list(interactions.columns)})")
    if len(interactions) == 0:
        raise DataError(f"{source}: no interactions")
    inter = interactions.dropna(subset=["user_id", "item_id"])
    user_codes, user_ids = pd.factorize(inter["user_id"], sort=True)
    item_codes, item_ids = pd.factorize(inter["item_id"], sort=True)
    out = pd.DataFrame({USER: user_codes.astype(np.int64), ITEM: item_codes.astype(np.int64)})
    has_time = "timestamp" in inter.columns
    if has_time:
        ts = inter["timestamp"]
        if ts.isna().any():
            raise DataError(f"{source}: column 'timestamp' has missing values")
        out[TIME] = ts.to_numpy().astype(np.int64)
    else:
        # Keep the release's own order within a user (sequence files are time-ordered).
        out[TIME] = out.groupby(USER).cumcount().to_numpy(np.int64)
    if "rating" in inter.columns:
        out[RATING] = inter["rating"].to_numpy().astype(np.float32)
    user_ids = np.asarray(user_ids)
    item_ids = np.asarray(item_ids)
    users = _encode_side("user", user_ids, user_features, list(user_specs))
    items = _encode_side("item", item_ids, item_features, list(item_specs))
    return Dataset(name, out, users, items, user_ids, item_ids, has_time, item_names=_item_names(item_ids, item_features))


def _item_names(ids: np.ndarray, frame: pd.DataFrame | None) -> np.ndarray | None:
    """The items' "title" (or "name") column, aligned with ``ids``; None where there is none."""
    column = next((c for c in ("title", "name") if frame is not None and c in frame.columns), None)
    if column is None:
        return None
    names = frame.loc[~frame.index.duplicated(keep="first"), column].reindex(ids)
    return names.where(names.notna(), None).to_numpy(dtype=object)


def _encode_side(
    side: str, ids: np.ndarray, frame: pd.DataFrame | None, specs: list[FieldSpec]
) -> FeatureTable:
    table = FeatureTable(len(ids))
    table.add(Field(f"{side}_id", FieldKind.CATEGORICAL, vocab_size=len(ids) + 1), np.arange(1, len(ids) + 1))
    if not specs:
        return table
    if frame is None:
        raise DataError(f"{side} fields {[s.field_name for s in specs]} declared but no {side} feature file given")
    aligned = frame[~frame.index.duplicated(keep="first")].reindex(ids)
    for spec in specs:
        needed = list(spec.columns) if spec.columns else [spec.column]
        missing = [c for c in needed if c not in aligned.columns]
        if missing:
            raise DataError(f"{side} features: missing column(s) {missing[:5]} for field '{spec.field_name}'")
        field_, values = _encode_field(spec, aligned)
        table.add(field_, values)
    return table


def _encode_field(spec: FieldSpec, frame: pd.DataFrame) -> tuple[Field, np.ndarray]:
    name = spec.field_name
    if spec.kind == FieldKind.CATEGORICAL:
        codes, uniques = pd.factorize(frame[spec.column], sort=True)
        return (Field(name, spec.kind, vocab_size=len(uniques) + 1, vocabulary=tuple(pd.Index(uniques).tolist())),
                codes.astype(np.int64) + 1)
    if spec.kind == FieldKind.MULTI_CATEGORICAL:
        return _encode_multi(spec, frame[spec.column])
    if spec.kind == FieldKind.NUMERIC:
        values = pd.to_numeric(frame[spec.column], errors="coerce").to_numpy(np.float64)
        return Field(name, spec.kind), _standardise(values)
    if spec.kind == FieldKind.DENSE_VECTOR:
        matrix = _dense_matrix(spec, frame)
        return Field(name, spec.kind, dim=matrix.shape[1]), matrix
    raise DataError(f"field '{name}': kind '{spec.kind.value}' cannot be read from a feature file")


def _standardise(values: np.ndarray) -> np.ndarray:
    """z-score over all entities of the side. This is a fixed affine map of a static side feature
    (no labels are involved); statistics of interactions, which would leak, are not built here
    (P4's label-derived features are computed from training rows only)."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(len(values), dtype=np.float32)
    mean, std = values[finite].mean(), values[finite].std()
    out = np.where(finite, (values - mean) / (std if std > 0 else 1.0), 0.0)
    return out.astype(np.float32)


def _tokens(value, sep: str | None) -> list:
    """The values of one multi-categorical cell: a string split at ``sep``, a list as it is, a
    single number as one value, nothing for a missing cell."""
    if isinstance(value, str):
        return [t for t in value.split(sep)] if sep else [value]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, (int, float, np.integer, np.floating)):
        return [value]
    return list(value)


def _encode_multi(spec: FieldSpec, column: pd.Series) -> tuple[Field, np.ndarray]:
    rows = [[t for t in _tokens(v, spec.sep) if t != ""] for v in column]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    flat = pd.Series([t for r in rows for t in r], dtype=object)
    codes, uniques = pd.factorize(flat.astype(str), sort=True)
    max_len = int(min(spec.max_len, max(1, lengths.max(initial=0))))
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for r in np.nonzero(lengths)[0]:  # one slice per row; rows are entities, not interactions
        keep = codes[starts[r] : starts[r] + min(lengths[r], max_len)] + 1
        out[r, : len(keep)] = keep
    return Field(spec.field_name, FieldKind.MULTI_CATEGORICAL, vocab_size=len(uniques) + 1, dim=max_len,
                 vocabulary=tuple(pd.Index(uniques).tolist())), out


def _dense_matrix(spec: FieldSpec, frame: pd.DataFrame) -> np.ndarray:
    if spec.columns:
        matrix = frame[list(spec.columns)].to_numpy(np.float32)
    else:
        vectors = [parse_vector(v, spec.field_name) for v in frame[spec.column]]
        dims = {len(v) for v in vectors if v is not None}
        if len(dims) != 1:
            raise DataError(f"field '{spec.field_name}': vectors of differing lengths {sorted(dims)[:5]}")
        dim = dims.pop()
        matrix = np.stack([v if v is not None else np.full(dim, np.nan) for v in vectors]).astype(np.float32)
    return np.nan_to_num(matrix, nan=0.0)


def parse_vector(value, field_name: str = "vector") -> np.ndarray | None:
    """A vector stored as a list, an array, or a string such as ``"[0.1, 0.2]"`` (None if missing).

    Splitting the string is much faster than evaluating it as a Python literal, which matters
    for large embedding tables.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        if isinstance(value, str):
            return np.array(value.strip().strip("[]").replace(",", " ").split(), dtype=np.float32)
        return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        preview = str(value)[:40]
        raise DataError(f"field '{field_name}': cannot read {preview!r} as a vector of numbers") from None


def category_field(dataset: Dataset, requested: str | None, key: str = "distill.category_field") -> str:
    """The item field whose values are the categories: ``requested``, or the first categorical
    item field besides the item id (``key`` names the setting in errors)."""
    fields = dataset.items.fields
    candidates = [n for n, f in fields.items()
                  if n != "item_id" and f.kind in (FieldKind.CATEGORICAL, FieldKind.MULTI_CATEGORICAL)]
    if requested is None:
        if not candidates:
            raise ConfigError(f"{key}: {dataset.name} has no categorical item field besides item_id")
        return candidates[0]
    if requested not in candidates:
        raise ConfigError(f"{key}: {requested!r} is not a categorical item field of {dataset.name} "
                          f"(choose one of {', '.join(candidates) or 'none'})")
    return requested
