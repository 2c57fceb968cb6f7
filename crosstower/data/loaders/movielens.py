"""MovieLens releases (100K, 1M, 10M, 20M, 25M, latest, latest-small) with user and item features.

The releases use three layouts (``u.*`` files, ``::`` ``.dat`` files, CSV with a header) and two
text encodings; each reader below parses one file into a plain frame keyed by the raw id, and
:func:`load_movielens` hands them to :func:`build_dataset`, so every variant gets the same field
names: items ``genres`` (multi-categorical) and ``year`` (categorical); users, where the release
has them, ``gender``, ``age`` (the ML-1M age bucket), ``occupation`` and ``zip_prefix``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from crosstower.data.dataset import Dataset, FieldSpec, build_dataset
from crosstower.data.loaders.files import find_file, parse_options, read_table, resolve_dir
from crosstower.data.schema import FieldKind
from crosstower.errors import DataError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
# ML-1M's age codes: each is the lower bound of its bucket (1 = "under 18").
AGE_BUCKETS = np.array([1, 18, 25, 35, 45, 50, 56])
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
YEAR_IN_TITLE = r"\((\d{4})\)\s*$"


class MovieLensOptions(BaseModel):
    """Options of every MovieLens variant."""

    model_config = ConfigDict(extra="forbid")

    min_rating: float | None = None  # keep ratings >= this (None keeps all)
    features: bool = True  # load user and item side features


@dataclass(frozen=True)
class Variant:
    """Where one release keeps its files and how they are written."""

    name: str
    layout: str  # "100k" | "dat" | "csv"
    subdirs: tuple[str, ...]
    movies_encoding: str = "utf-8"
    has_users: bool = False

    @property
    def ratings_file(self) -> str:
        return {"100k": "u.data", "dat": "ratings.dat", "csv": "ratings.csv"}[self.layout]


VARIANTS = {
    v.name: v
    for v in (
        Variant("ml-100k", "100k", ("ml-100k",), "latin-1", True),
        Variant("ml-1m", "dat", ("ml-1m",), "latin-1", True),
        Variant("ml-10m", "dat", ("ml-10M100K", "ml-10m"), "utf-8"),
        Variant("ml-20m", "csv", ("ml-20m",)),
        Variant("ml-25m", "csv", ("ml-25m",)),
        Variant("ml-latest", "csv", ("ml-latest",)),
        Variant("ml-latest-small", "csv", ("ml-latest-small",)),
    )
}

# ---------------------------------------------------------------------------------------------
# readers: one file -> one frame (ratings with RATING_COLUMNS; features indexed by raw id)


def read_ml100k_ratings(path: Path) -> pd.DataFrame:
    """``u.data``: tab-separated ``user item rating timestamp``."""
    return read_table(path, sep="\t", header=None, names=RATING_COLUMNS, dtype=np.int64)


def read_ml100k_items(path: Path) -> pd.DataFrame:
    """``u.item``: ``|``-separated latin-1, 5 descriptive columns then 19 genre flags."""
    names = ["item_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES]
    frame = read_table(
        path, sep="|", header=None, names=names, encoding="latin-1", quoting=csv.QUOTE_NONE,
        dtype={"title": str, "release_date": str},
    )  # fmt: skip
    flags = frame[list(ML100K_GENRES)].fillna(0).to_numpy(dtype=bool)
    genre_names = np.array(ML100K_GENRES, dtype=object)
    # one list per movie (rows are movies, not interactions)
    genres = [list(genre_names[row]) for row in flags]
    year = frame["release_date"].str[-4:].where(frame["release_date"].str.match(r".*\d{4}$", na=False))
    year = year.fillna(frame["title"].str.extract(YEAR_IN_TITLE, expand=False))
    return pd.DataFrame(
        {"title": frame["title"].to_numpy(), "year": year.to_numpy(), "genres": genres},
        index=pd.Index(frame["item_id"].to_numpy(), name="item_id"),
    )


def read_ml100k_users(path: Path) -> pd.DataFrame:
    """``u.user``: ``user|age|gender|occupation|zip``; age kept as a number and as its ML-1M bucket."""
    frame = read_table(
        path, sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip"],
        dtype={"zip": str}, quoting=csv.QUOTE_NONE,
    )  # fmt: skip
    age = frame["age"].to_numpy()
    return pd.DataFrame(
        {
            "gender": frame["gender"].to_numpy(),
            "age": AGE_BUCKETS[np.digitize(age, AGE_BUCKETS[1:])],
            "age_value": age.astype(np.float64),
            "occupation": frame["occupation"].to_numpy(),
            "zip_prefix": frame["zip"].str[:1].to_numpy(),
        },
        index=pd.Index(frame["user_id"].to_numpy(), name="user_id"),
    )


def read_dat_ratings(path: Path) -> pd.DataFrame:
    """``ratings.dat``: ``user::item::rating::timestamp``.

    The fields are numbers, so splitting on a single ``:`` leaves empty columns between them and
    lets pandas use its fast C parser (the ``::`` separator would need the slow Python one).
    """
    frame = read_table(path, sep=":", header=None, usecols=[0, 2, 4, 6])
    frame.columns = RATING_COLUMNS
    return frame


def _movies_frame(ids: pd.Series, titles: pd.Series, genres: pd.Series) -> pd.DataFrame:
    genres = genres.fillna("").replace("(no genres listed)", "")
    return pd.DataFrame(
        {
            "title": titles.to_numpy(),
            "year": titles.str.extract(YEAR_IN_TITLE, expand=False).to_numpy(),
            "genres": genres.to_numpy(),
        },
        index=pd.Index(ids.to_numpy(), name="item_id"),
    )


def read_ml1m_movies(path: Path, encoding: str = "latin-1") -> pd.DataFrame:
    """``movies.dat``: ``id::title::genres`` (titles contain ``:``, so split on ``::`` only)."""
    frame = read_table(
        path, sep="::", engine="python", header=None, names=["item_id", "title", "genres"],
        encoding=encoding, quoting=csv.QUOTE_NONE, dtype={"title": str, "genres": str},
    )  # fmt: skip
    return _movies_frame(frame["item_id"], frame["title"], frame["genres"])


def read_ml1m_users(path: Path) -> pd.DataFrame:
    """``users.dat``: ``user::gender::age-bucket::occupation-code::zip``."""
    frame = read_table(
        path, sep="::", engine="python", header=None,
        names=["user_id", "gender", "age", "occupation", "zip"], dtype={"zip": str},
    )  # fmt: skip
    return pd.DataFrame(
        {
            "gender": frame["gender"].to_numpy(),
            "age": frame["age"].to_numpy(),
            "occupation": frame["occupation"].to_numpy(),
            "zip_prefix": frame["zip"].str[:1].to_numpy(),
        },
        index=pd.Index(frame["user_id"].to_numpy(), name="user_id"),
    )


def read_csv_ratings(path: Path) -> pd.DataFrame:
    """``ratings.csv`` (20M and later): ``userId,movieId,rating,timestamp`` with a header."""
    frame = read_table(path, dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float32})
    _require_columns(path, frame, ["userId", "movieId", "rating", "timestamp"])
    frame = frame[["userId", "movieId", "rating", "timestamp"]]
    frame.columns = RATING_COLUMNS
    return frame


def read_csv_movies(path: Path) -> pd.DataFrame:
    """``movies.csv``: ``movieId,title,genres`` with quoted titles."""
    frame = read_table(path, dtype={"title": str, "genres": str})
    _require_columns(path, frame, ["movieId", "title", "genres"])
    return _movies_frame(frame["movieId"], frame["title"].str.strip(), frame["genres"])


def _require_columns(path: Path, frame: pd.DataFrame, names: list[str]) -> None:
    for name in names:
        if name not in frame.columns:
            raise DataError(f"{path}: missing column '{name}' (have {list(frame.columns)})")


# ---------------------------------------------------------------------------------------------

ITEM_SPECS = (
    FieldSpec("genres", FieldKind.MULTI_CATEGORICAL, sep="|"),
    FieldSpec("year", FieldKind.CATEGORICAL),
)
ML1M_USER_SPECS = tuple(FieldSpec(c, FieldKind.CATEGORICAL) for c in ("gender", "age", "occupation", "zip_prefix"))
ML100K_USER_SPECS = ML1M_USER_SPECS + (FieldSpec("age_value", FieldKind.NUMERIC),)


def load_movielens(variant: str, path: Path, options: dict | None = None) -> Dataset:
    """Load one MovieLens release from ``path`` (the release's folder or the folder above it)."""
    v = VARIANTS[variant]
    opts = parse_options(MovieLensOptions, options)
    directory = resolve_dir(Path(path), v.ratings_file, v.subdirs, v.name)
    ratings = _read_ratings(v, find_file(directory, v.ratings_file, v.name))
    if opts.min_rating is not None:
        ratings = ratings[ratings["rating"] >= opts.min_rating]
    users, items = (None, None)
    if opts.features:
        users, items = _read_features(v, directory)
    user_specs = (ML100K_USER_SPECS if v.layout == "100k" else ML1M_USER_SPECS) if users is not None else ()
    dataset = build_dataset(
        v.name, ratings, users, user_specs, items, ITEM_SPECS if items is not None else (), source=str(directory)
    )
    dataset.metadata.update({"source": str(directory), "min_rating": opts.min_rating})
    return dataset


def _read_ratings(v: Variant, path: Path) -> pd.DataFrame:
    reader = {"100k": read_ml100k_ratings, "dat": read_dat_ratings, "csv": read_csv_ratings}[v.layout]
    return reader(path)


def _read_features(v: Variant, directory: Path) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """The user table (None where the release has none) and the movie table."""
    if v.layout == "100k":
        items = read_ml100k_items(find_file(directory, "u.item", v.name))
        users = read_ml100k_users(find_file(directory, "u.user", v.name))
        return users, items
    if v.layout == "dat":
        items = read_ml1m_movies(find_file(directory, "movies.dat", v.name), v.movies_encoding)
        users = read_ml1m_users(find_file(directory, "users.dat", v.name)) if v.has_users else None
        return users, items
    return None, read_csv_movies(find_file(directory, "movies.csv", v.name))
