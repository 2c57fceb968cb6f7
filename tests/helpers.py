"""Small builders shared by tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd

from crosstower.data.dataset import Dataset, FieldSpec, build_dataset
from crosstower.data.schema import FieldKind


def random_dataset(num_users: int = 60, num_items: int = 80, rows: int = 1500, seed: int = 0) -> Dataset:
    """Random interactions with one categorical user field and one item genre field."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "user_id": rng.integers(0, num_users, rows),
        "item_id": rng.integers(0, num_items, rows),
        "timestamp": rng.integers(0, 10**6, rows),
    }).drop_duplicates(["user_id", "item_id"])
    users = pd.DataFrame({"group": rng.integers(0, 4, num_users)}, index=np.arange(num_users))
    items = pd.DataFrame({"genre": rng.integers(0, 5, num_items).astype(str)}, index=np.arange(num_items))
    return build_dataset(
        "random", frame, users, [FieldSpec("group", FieldKind.CATEGORICAL)],
        items, [FieldSpec("genre", FieldKind.MULTI_CATEGORICAL)],
    )



def rated_frames(
    num_users: int = 60, num_items: int = 80, rows: int = 3000, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Raw frames (interactions with a 1-5 ``rating``, user features, item features) of
    :func:`rated_dataset`, e.g. to write as files for the generic loader. The rating has a signal
    to learn: round(3 + item quality + user bias + user-genre taste + noise), clipped to 1..5."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, num_users, rows)
    item = rng.integers(0, num_items, rows)
    genre = rng.integers(0, 5, num_items)
    quality = rng.normal(0.0, 1.0, num_items)
    bias = rng.normal(0.0, 0.5, num_users)
    taste = rng.normal(0.0, 1.0, (num_users, 5))
    raw = 3 + quality[item] + bias[user] + taste[user, genre[item]] + rng.normal(0.0, 0.5, rows)
    frame = pd.DataFrame({
        "user_id": user,
        "item_id": item,
        "timestamp": rng.integers(0, 10**6, rows),
        "rating": np.clip(np.round(raw), 1, 5),
    }).drop_duplicates(["user_id", "item_id"]).reset_index(drop=True)
    users = pd.DataFrame({"group": rng.integers(0, 4, num_users)}, index=pd.Index(np.arange(num_users), name="user_id"))
    items = pd.DataFrame({"genre": genre.astype(str)}, index=pd.Index(np.arange(num_items), name="item_id"))
    return frame, users, items


def rated_dataset(num_users: int = 60, num_items: int = 80, rows: int = 3000, seed: int = 0) -> Dataset:
    """Like :func:`random_dataset` (one user field, one item genre field) plus a learnable 1-5
    ``rating`` column (see :func:`rated_frames`); for the pointwise protocol P4."""
    frame, users, items = rated_frames(num_users, num_items, rows, seed)
    return build_dataset(
        "rated", frame, users, [FieldSpec("group", FieldKind.CATEGORICAL)],
        items, [FieldSpec("genre", FieldKind.MULTI_CATEGORICAL)],
    )


def sparcode_model(dataset: Dataset, quantize: bool = True, max_history: int = 50, **keys):
    """A SparCode (``quantize`` False: the all-to-all model) from its config keys, flat keys of
    configs written before the quantizer / sparsity / index blocks included (they are moved in,
    as for any old config), reading ``max_history`` history items."""
    from crosstower.models.base import BuildContext
    from crosstower.models.sparcode import SparCode, SparCodeConfig

    raw = SparCodeConfig.upgrade({"name": "sparcode" if quantize else "alltoall", **keys})
    return SparCode(dataset, SparCodeConfig.model_validate(raw), BuildContext(history_length=max_history))


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package); registered
    in ``sys.modules`` because dataclasses look their module up while a class is built."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

