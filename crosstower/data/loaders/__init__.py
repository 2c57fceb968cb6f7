"""Loaders: one function per data set name, each ``(path, options) -> Dataset``.

Every loader validates its own options (a pydantic model that forbids unknown keys, so a typo in
a config is an error rather than a silently ignored setting), parses its files into plain frames
and ends with :func:`crosstower.data.dataset.build_dataset`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from crosstower.data.dataset import Dataset
from crosstower.data.loaders.deezer import load_deezer
from crosstower.data.loaders.generic import load_generic
from crosstower.data.loaders.movielens import VARIANTS, load_movielens
from crosstower.data.loaders.sequences import load_sequences
from crosstower.errors import DataError

Loader = Callable[[Path, dict], Dataset]


def _load_synthetic(path: Path, options: dict) -> Dataset:
    """Imported on use, so that a problem in the generator does not break the other loaders."""
    from crosstower.data.synthetic import load_synthetic

    return load_synthetic(path, **options)


LOADERS: dict[str, Loader] = {
    **{name: partial(load_movielens, name) for name in VARIANTS},
    "sequences": load_sequences,
    "deezer": load_deezer,
    "generic": load_generic,
    "synthetic": _load_synthetic,
}


def load_dataset(name: str, path: Path | str | None, options: dict | None = None) -> Dataset:
    """Load the data set ``name`` from the folder ``path`` with loader-specific ``options``."""
    loader = LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset '{name}'; valid names: {', '.join(sorted(LOADERS))}")
    if path is None and name != "synthetic":
        raise DataError(f"{name}: no data directory given; pass --data-dir")
    return loader(Path(path) if path is not None else None, dict(options or {}))


__all__ = ["LOADERS", "Loader", "load_dataset"]
