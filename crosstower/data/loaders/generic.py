"""A loader for the user's own files: one interaction table plus optional user / item tables.

Everything format-specific is declared in the options (file names, separators, which column is
which, the kind of each feature), so a new data set needs a YAML block rather than code. Columns
are named by header or, for files without one, by position (0-based integers).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Discriminator, Field as PydanticField, Tag, model_validator

from crosstower.data.dataset import Dataset, FieldSpec, build_dataset
from crosstower.data.loaders.files import find_file, logical_suffix, parse_options, read_parquet, read_table
from crosstower.data.schema import FieldKind
from crosstower.errors import DataError

log = logging.getLogger("crosstower.data")

NAME = "generic"
Column = str | int
SEPARATORS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET = (".parquet", ".pq")
NAME_COLUMNS = ("title", "name")  # kept beside the fields: shown with recommendations


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnMap(_Strict):
    """Our column names -> the file's column names (or positions)."""

    user: Column = "user_id"
    item: Column = "item_id"
    timestamp: Column | None = None
    rating: Column | None = None


class FieldOptions(_Strict):
    column: Column | None = None
    kind: Literal["categorical", "multi_categorical", "numeric", "dense_vector"]
    sep: str | None = None  # token separator of a multi-categorical string column
    max_len: int = PydanticField(32, ge=1)
    name: str | None = None
    columns: list[Column] | None = None  # several columns forming one dense vector

    @model_validator(mode="after")
    def _one_source(self) -> "FieldOptions":
        if self.column is None and not self.columns:
            raise ValueError("a field needs 'column' (or 'columns' for a dense vector)")
        if self.columns and self.kind != "dense_vector":
            raise ValueError("'columns' is only for kind dense_vector")
        if self.columns and self.name is None:
            raise ValueError("a field built from 'columns' needs a 'name'")
        return self


class SideOptions(_Strict):
    """One feature file of users or items."""

    file: str
    id_column: Column
    fields: list[FieldOptions] = []
    sep: str | None = None
    header: bool = True
    # "wide": one row per id; "long": several (id, value) rows per id, each field gathering its
    # values per id (multi_categorical fields only), e.g. an item-category table.
    format: Literal["wide", "long"] = "wide"

    @model_validator(mode="after")
    def _long_fields_are_multi_valued(self) -> "SideOptions":
        if self.format == "long":
            wrong = [f.name or f.column for f in self.fields if f.kind != "multi_categorical"]
            if wrong:
                raise ValueError(f"a long-format file gathers several values per id: declare {wrong} as "
                                 f"kind multi_categorical")
        return self


# A side's features: one file or a list; the union is decided by the value's type, so a problem
# is reported against the one form that was meant (its tag left out of the message).
UNION_TAGS = ("one_file", "file_list")
SideFiles = Annotated[Annotated[SideOptions, Tag(UNION_TAGS[0])] | Annotated[list[SideOptions], Tag(UNION_TAGS[1])],
                      Discriminator(lambda value: UNION_TAGS[1] if isinstance(value, list) else UNION_TAGS[0])]


class GenericOptions(_Strict):
    interactions: str
    sep: str | None = None  # None: from the extension (.csv ',', .tsv '\t', else whitespace)
    header: bool = True
    columns: ColumnMap = PydanticField(default_factory=ColumnMap)
    # One feature file per side, or a list of them (joined on the id; wide and long formats mixed).
    user_features: SideFiles | None = None
    item_features: SideFiles | None = None
    min_rating: float | None = None
    name: str | None = None
    # Interactions with a blank user or item id are an error naming the rows; true drops them
    # with a warning that counts them.
    skip_invalid_rows: bool = False


def read_any(path: Path, sep: str | None, header: bool) -> pd.DataFrame:
    """A CSV / TSV / whitespace / Parquet file chosen by extension; headerless columns become
    ``col0, col1, ...`` so that positions can be reported by name."""
    suffix = logical_suffix(path)
    if suffix in PARQUET:
        return read_parquet(path)
    sep = sep if sep is not None else SEPARATORS.get(suffix, r"\s+")
    engine = "python" if len(sep) > 1 and sep != r"\s+" else "c"
    frame = read_table(path, sep=sep, header=0 if header else None, engine=engine)
    if not header:
        frame.columns = [f"col{i}" for i in range(frame.shape[1])]
    return frame


def resolve_column(frame: pd.DataFrame, column: Column, source: str) -> str:
    """The frame's name for ``column`` (a name or a 0-based position)."""
    if isinstance(column, int):
        if 0 <= column < frame.shape[1]:
            return frame.columns[column]
        raise DataError(f"{source}: missing column {column} (the file has {frame.shape[1]} columns)")
    if column not in frame.columns:
        raise DataError(f"{source}: missing column '{column}' (have {list(frame.columns)[:20]})")
    return column


def read_interactions(path: Path, opts: GenericOptions) -> pd.DataFrame:
    """The interaction table renamed to ``user_id``, ``item_id`` and the optional columns."""
    frame = read_any(path, opts.sep, opts.header)
    source = path.name
    names = {"user_id": resolve_column(frame, opts.columns.user, source),
             "item_id": resolve_column(frame, opts.columns.item, source)}
    out = pd.DataFrame({ours: frame[theirs] for ours, theirs in names.items()})
    out = _without_blank_ids(out, names, opts, source)
    frame = frame.loc[out.index]
    if opts.columns.timestamp is not None:
        out["timestamp"] = _timestamps(frame[resolve_column(frame, opts.columns.timestamp, source)], source)
    if opts.columns.rating is not None:
        rating = frame[resolve_column(frame, opts.columns.rating, source)]
        out["rating"] = pd.to_numeric(rating, errors="coerce")
        if out["rating"].isna().any():
            raise DataError(f"{source}: rating column has missing or non-numeric values")
    return out


def _without_blank_ids(frame: pd.DataFrame, names: dict[str, str], opts: GenericOptions, source: str) -> pd.DataFrame:
    """``frame`` without rows whose user or item id is missing or blank, which are refused
    unless ``skip_invalid_rows`` (then dropped with a warning). ``names``: our column -> the
    file's."""
    blank = {}
    for column, given in names.items():
        values = frame[column]
        missing = values.isna()
        if not pd.api.types.is_numeric_dtype(values):  # text ids: blank ones are missing too
            missing |= values.astype(str).str.strip() == ""
        if missing.any():
            blank[given] = missing
    if not blank:
        return frame
    bad = np.logical_or.reduce([m.to_numpy() for m in blank.values()])
    if opts.skip_invalid_rows:
        log.warning("%s: dropped %d rows with a blank id (column %s)", source, int(bad.sum()),
                    " / ".join(repr(c) for c in blank))
        return frame[~bad]
    column, missing = next(iter(blank.items()))
    first_line = 2 if opts.header else 1  # the file's line of row 0
    lines = (np.flatnonzero(missing.to_numpy()) + first_line).tolist()
    shown = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
    raise DataError(f"{source}: {len(lines)} row{'s' if len(lines) > 1 else ''} with a blank id in column {column!r} "
                    f"(line{'s' if len(lines) > 1 else ''} {shown}); fill them, or set "
                    f"dataset.options.skip_invalid_rows: true to drop such rows")


def _timestamps(values: pd.Series, source: str) -> np.ndarray:
    """Numbers as they are; date strings as seconds since the epoch."""
    if pd.api.types.is_numeric_dtype(values):
        if values.isna().any():
            raise DataError(f"{source}: timestamp column has missing values")
        return values.to_numpy().astype(np.int64)
    try:
        parsed = pd.to_datetime(values, utc=True)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{source}: cannot read timestamps ({str(exc).splitlines()[0]})") from None
    if parsed.isna().any():
        raise DataError(f"{source}: timestamp column has missing values")
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)


def read_sides(
    directory: Path, side: str, options: SideOptions | list[SideOptions], ids: pd.Series
) -> tuple[pd.DataFrame, list[FieldSpec]]:
    """Every feature file of one side joined on the raw id, and their field specs."""
    files = options if isinstance(options, list) else [options]
    frames, specs, owner = [], [], {}
    for opts in files:
        frame, file_specs = read_side(directory, side, opts, ids)
        for spec in file_specs:
            for column in spec.columns or (spec.column,):
                if column in owner:
                    raise DataError(f"{opts.file}: column '{column}' is also read from {owner[column]}; rename one "
                                    f"of them in its file")
                owner[column] = opts.file
        used = [c for spec in file_specs for c in (spec.columns or (spec.column,))]
        shown = [c for c in NAME_COLUMNS if c in frame.columns and c not in owner and c not in used]
        owner.update(dict.fromkeys(shown, opts.file))
        frames.append(frame[used + shown])
        specs += file_specs
    return pd.concat(frames, axis=1, join="outer"), specs


def read_side(
    directory: Path, side: str, opts: SideOptions, ids: pd.Series
) -> tuple[pd.DataFrame, list[FieldSpec]]:
    """A feature table indexed by the raw id (typed like ``ids``, one row per id) and its field
    specs. A wide file may repeat an id only on identical rows; a long file's rows are gathered
    into one list of values per id and field."""
    path = find_file(directory, opts.file, NAME)
    frame = read_any(path, opts.sep, opts.header)
    id_column = resolve_column(frame, opts.id_column, path.name)
    specs = [_field_spec(frame, f, path.name) for f in opts.fields]
    frame = frame.set_index(id_column)
    frame.index = _match_id_type(frame.index, ids)
    if not frame.index.isin(ids).any():
        raise DataError(f"{path.name}: no {side} id in column '{id_column}' occurs in the interactions")
    if opts.format == "long":
        columns = [spec.column for spec in specs]
        return frame[columns].groupby(level=0).agg(lambda values: values.dropna().tolist()), specs
    frame = frame[~frame.reset_index().duplicated().to_numpy()]  # identical repeated rows say nothing new
    repeated = frame.index[frame.index.duplicated()].unique()
    if len(repeated):
        shown = ", ".join(map(str, repeated[:5].tolist()))
        raise DataError(f"{path.name}: {len(repeated)} {side} ids have several different rows (e.g. {shown}); for "
                        f"several values per {side} declare format: long and the field as kind multi_categorical")
    return frame, specs


def _field_spec(frame: pd.DataFrame, field: FieldOptions, source: str) -> FieldSpec:
    columns = tuple(resolve_column(frame, c, source) for c in field.columns) if field.columns else None
    column = resolve_column(frame, field.column, source) if field.column is not None else columns[0]
    return FieldSpec(
        column, FieldKind(field.kind), name=field.name or column, max_len=field.max_len, sep=field.sep, columns=columns
    )


def _match_id_type(index: pd.Index, ids: pd.Series) -> pd.Index:
    """Feature ids compared as the interactions' ids (numbers read as text match numbers)."""
    if pd.api.types.is_numeric_dtype(ids) and pd.api.types.is_numeric_dtype(index):
        return index
    if not pd.api.types.is_numeric_dtype(ids):
        return index.astype(str)
    return pd.Index(pd.to_numeric(index, errors="coerce"))


def load_generic(path: Path, options: dict | None = None) -> Dataset:
    """Load the files named in ``options`` from the folder ``path``."""
    opts = parse_options(GenericOptions, options, skip=UNION_TAGS)
    directory = Path(path)
    inter_path = find_file(directory, opts.interactions, NAME)
    interactions = read_interactions(inter_path, opts)
    if not pd.api.types.is_numeric_dtype(interactions["user_id"]):
        interactions["user_id"] = interactions["user_id"].astype(str)
    if not pd.api.types.is_numeric_dtype(interactions["item_id"]):
        interactions["item_id"] = interactions["item_id"].astype(str)
    if opts.min_rating is not None:
        if "rating" not in interactions.columns:
            raise DataError("dataset.options.min_rating: needs dataset.options.columns.rating")
        interactions = interactions[interactions["rating"] >= opts.min_rating]
    users, user_specs = (None, [])
    if opts.user_features is not None:
        users, user_specs = read_sides(directory, "user", opts.user_features, interactions["user_id"])
    items, item_specs = (None, [])
    if opts.item_features is not None:
        items, item_specs = read_sides(directory, "item", opts.item_features, interactions["item_id"])
    name = opts.name or Path(opts.interactions).name.split(".")[0]
    dataset = build_dataset(name, interactions, users, user_specs, items, item_specs, source=inter_path.name)
    dataset.metadata["source"] = str(inter_path)
    return dataset
