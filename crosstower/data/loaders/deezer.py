"""The Deezer semi-personalised cold-start release (Briand et al., KDD 2021).

Users come in three files, ``user_features_{train,validation,test}.parquet`` (optionally with a
``_svd`` / ``_mf`` suffix), each row holding the songs the user listened to in days 1-30
(``d1d30_songs``: these are the interactions, without time stamps) and the user's side features:
20 pretrained 128-d embeddings spread over ``<feature>_embedding0..127`` columns, ``nb_*`` counts
and ``age_value``. Songs carry pretrained vectors in ``song_embeddings.parquet``. The release's
own user split is kept in ``dataset.metadata["user_split"]`` so the cold-start protocol can use it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from crosstower.data.dataset import Dataset, FieldSpec, build_dataset, parse_vector
from crosstower.data.loaders.files import HINT, find_file, find_optional, parse_options, read_parquet, resolve_dir
from crosstower.data.schema import FieldKind
from crosstower.errors import DataError

NAME = "deezer"
SPLITS = ("train", "validation", "test")
SUBDIRS = ("deezer", "deezer-semi-perso-cold-start", "deezer-semi-perso-cold-start-sample")
EMBEDDING_COLUMN = re.compile(r"^(?P<feature>.+)_embedding(?P<position>\d+)$")


class DeezerOptions(BaseModel):
    """``variant`` picks the ``_svd`` / ``_mf`` suffixed user files and the matching song vectors."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["svd", "mf"] | None = None
    splits: list[Literal["train", "validation", "test"]] = list(SPLITS)
    songs_column: str = "d1d30_songs"
    # song_embeddings columns to use as dense item fields; None: features_<variant>, or every
    # features_* column when no variant is given; [] loads no song vectors.
    item_vectors: list[str] | None = None
    user_features: bool = True


def user_file_name(split: str, variant: str | None) -> str:
    return f"user_features_{split}{'_' + variant if variant else ''}.parquet"


def _user_file(directory: Path, split: str, variant: str | None) -> Path:
    found = find_optional(directory, user_file_name(split, variant))
    if found is not None:
        return found
    if variant is None:
        for other in ("svd", "mf"):
            if find_optional(directory, user_file_name(split, other)) is not None:
                raise DataError(
                    f"{NAME}: {directory} has {user_file_name(split, other)} but no "
                    f"{user_file_name(split, None)}; set dataset.options.variant: {other}"
                )
    return find_file(directory, user_file_name(split, variant), NAME)


def _data_directory(path: Path, opts: DeezerOptions) -> Path:
    """``path`` or the sub-folder holding the user files (of any variant when none is chosen,
    so that a wrong variant is reported as such rather than as a missing folder)."""
    split = opts.splits[0]
    variants = [opts.variant] if opts.variant else [None, "svd", "mf"]
    for variant in variants:
        try:
            return resolve_dir(path, user_file_name(split, variant), SUBDIRS, NAME)
        except DataError:
            continue
    return resolve_dir(path, user_file_name(split, opts.variant), SUBDIRS, NAME)  # raises


def read_user_files(directory: Path, opts: DeezerOptions) -> pd.DataFrame:
    """All requested user files stacked, with a ``split`` column naming the file of each row."""
    frames = []
    for split in opts.splits:
        path = _user_file(directory, split, opts.variant)
        frame = read_parquet(path)
        for column in ("user_index", opts.songs_column):
            if column not in frame.columns:
                raise DataError(f"{path}: missing column '{column}' (have {_preview(frame.columns)})")
        frames.append(frame.assign(split=split))
    users = pd.concat(frames, ignore_index=True)
    repeated = users["user_index"][users["user_index"].duplicated()]
    if len(repeated):
        raise DataError(f"{NAME}: user_index {repeated.iloc[0]} appears in more than one of {opts.splits}")
    return users


def _preview(columns: pd.Index, limit: int = 8) -> str:
    names = [str(c) for c in columns]
    return str(names[:limit])[:-1] + (f", ... {len(names) - limit} more]" if len(names) > limit else "]")


def interactions_from_lists(users: pd.DataFrame, songs_column: str) -> pd.DataFrame:
    """One (user, song) row per listened song, in list order within each user."""
    pairs = users[["user_index", songs_column]].explode(songs_column).dropna(subset=[songs_column])
    return pd.DataFrame(
        {"user_id": pairs["user_index"].to_numpy(np.int64), "item_id": pairs[songs_column].to_numpy(np.int64)}
    )


def user_specs(columns: pd.Index) -> list[FieldSpec]:
    """One dense field per ``<feature>_embedding*`` group, numeric fields for counts and age."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for column in columns:
        match = EMBEDDING_COLUMN.match(str(column))
        if match:
            groups.setdefault(match["feature"], []).append((int(match["position"]), column))
    specs = [
        FieldSpec(cols[0][1], FieldKind.DENSE_VECTOR, name=feature, columns=tuple(c for _, c in sorted(cols)))
        for feature, cols in groups.items()
    ]
    numeric = [c for c in columns if str(c).startswith("nb_") or c == "age_value"]
    return specs + [FieldSpec(c, FieldKind.NUMERIC) for c in numeric]


def parse_vectors(values: pd.Series) -> pd.Series:
    """Vectors stored as lists/arrays or as strings ``"[0.1, 0.2]"`` -> float32 arrays."""
    return values.map(lambda value: parse_vector(value, str(values.name)))


def read_song_vectors(path: Path, columns: list[str] | None, variant: str | None) -> pd.DataFrame:
    """The song table indexed by ``song_index`` with the chosen vector columns parsed."""
    frame = read_parquet(path)
    if "song_index" not in frame.columns:
        raise DataError(f"{path}: missing column 'song_index' (have {_preview(frame.columns)})")
    if columns is None:
        wanted = f"features_{variant}" if variant else None
        columns = [c for c in frame.columns if c.startswith("features_") and (wanted is None or c == wanted)]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (have {_preview(frame.columns)})")
    out = pd.DataFrame({c: parse_vectors(frame[c]).to_numpy() for c in columns})
    out.index = pd.Index(frame["song_index"].to_numpy(np.int64), name="song_index")
    return out


def load_deezer(path: Path, options: dict | None = None) -> Dataset:
    """Load the Deezer cold-start release from the folder ``path`` (or a folder above it)."""
    opts = parse_options(DeezerOptions, options)
    if not opts.splits:
        raise DataError("dataset.options.splits: name at least one of train, validation, test")
    directory = _data_directory(Path(path), opts)
    users = read_user_files(directory, opts)
    interactions = interactions_from_lists(users, opts.songs_column)
    if interactions.empty:
        raise DataError(f"{NAME}: no songs in column '{opts.songs_column}' of the user files in {directory}; {HINT}")
    user_frame = users.set_index("user_index") if opts.user_features else None
    specs = user_specs(users.columns) if opts.user_features else []
    items, item_specs = None, []
    if opts.item_vectors != []:
        songs_path = find_file(directory, "song_embeddings.parquet", NAME)
        items = read_song_vectors(songs_path, opts.item_vectors, opts.variant)
        item_specs = [FieldSpec(c, FieldKind.DENSE_VECTOR) for c in items.columns]
    dataset = build_dataset(NAME, interactions, user_frame, specs, items, item_specs, source=str(directory))
    split_of = pd.Series(users["split"].to_numpy(), index=users["user_index"].to_numpy(np.int64))
    dataset.metadata.update(
        {
            "source": str(directory),
            "user_split": split_of.reindex(dataset.user_ids).to_numpy().astype(str),
            "users_without_songs": int(len(users) - len(dataset.user_ids)),
        }
    )
    return dataset
