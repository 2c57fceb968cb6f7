"""The data a run reads: the data set its config names, split by its protocol.

Shared by training (:mod:`crosstower.run`) and by everything that opens a finished run
(:mod:`crosstower.run_dir`), so that both read the same data set with the same split features,
and a run folder can tell when the data set it was trained on has changed (:func:`data_fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from crosstower.config import RunConfig
from crosstower.data.dataset import Dataset
from crosstower.data.features import add_train_statistics
from crosstower.data.loaders import LOADERS, load_dataset
from crosstower.data.splits import Split, make_split
from crosstower.errors import DataError

log = logging.getLogger("crosstower.data")


def default_data_dir() -> Path:
    """``$CROSSTOWER_DATA_DIR``, else ``../shared/data`` where it exists, else ``./data``."""
    env = os.environ.get("CROSSTOWER_DATA_DIR")
    if env:
        return Path(env)
    shared = Path("..") / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def resolve_dataset_path(config: RunConfig, data_dir: Path | None) -> Path | None:
    """``dataset.path`` (relative to the data folder), else the data folder itself: loaders
    accept either the data root or the release's own folder."""
    if config.dataset.name == "synthetic" and config.dataset.path is None:
        return None
    root = data_dir or default_data_dir()
    if config.dataset.path is None:
        return root
    relative = Path(config.dataset.path)
    return relative if relative.is_absolute() else root / relative


def load_dataset_of(config: RunConfig, data_dir: Path | None) -> Dataset:
    """The data set ``config`` names, from ``data_dir`` (or the default data folder)."""
    if config.dataset.name not in LOADERS:
        raise DataError(f"dataset.name: unknown dataset '{config.dataset.name}'; valid names: {', '.join(sorted(LOADERS))}")
    path = resolve_dataset_path(config, data_dir)
    if path is not None and not path.exists():
        raise DataError(f"dataset '{config.dataset.name}': directory {path} not found; pass --data-dir")
    return load_dataset(config.dataset.name, path, dict(config.dataset.options))


def load_data(config: RunConfig, data_dir: Path | None) -> tuple[Dataset, Split]:
    """The data set of ``config`` and its split (with the split's features, see
    :func:`with_split_features`)."""
    dataset = load_dataset_of(config, data_dir)
    p4_settings = {"positive_min": config.split.positive_min, "negative_max": config.split.negative_max,
                   "order": config.split.order}
    split = make_split(dataset, config.split.protocol, config.split.seed,
                       **{k: v for k, v in p4_settings.items() if v is not None})
    if config.evaluate.max_users is not None:
        count = config.evaluate.max_users
        split = dataclasses.replace(split, val=split.val.sample(count, config.split.seed),
                                    test=split.test.sample(count, config.split.seed + 1))
    if config.split.statistics in ("all_labels", "in_split"):
        log.warning("split.statistics=%s: validation and test rows read statistics of their own labels; "
                    "these figures measure that leak, they are not results", config.split.statistics)
    return with_split_features(dataset, split, config.split.statistics), split


def with_split_features(dataset: Dataset, split: Split, statistics: str | None = "ordered") -> Dataset:
    """The data set a model of ``split`` reads: under P4, with the rating statistics (mean
    rating, log count per user and item; from the training rows, or from every labelled row
    under ``statistics="all_labels"``) as extra numeric fields; otherwise unchanged."""
    if split.protocol != "p4":
        return dataset
    return add_train_statistics(dataset, split, leak_held_out_labels=statistics == "all_labels")


def data_fingerprint(dataset: Dataset) -> dict:
    """What a checkpoint or a saved split must match: sizes and a hash of the id order."""
    digest = hashlib.sha256()
    for ids in (dataset.user_ids, dataset.item_ids):
        digest.update(np.asarray(ids).astype(str).astype("U").tobytes())
    return {"name": dataset.name, "users": dataset.num_users, "items": dataset.num_items,
            "interactions": len(dataset.interactions), "ids_sha256": digest.hexdigest()[:16]}
