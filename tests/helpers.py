"""Small builders shared by tests."""

from __future__ import annotations

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
