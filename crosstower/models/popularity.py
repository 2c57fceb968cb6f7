"""Most-popular baseline: every user gets the catalogue ranked by training interaction count."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch

from crosstower.config import ModelConfig
from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.models.base import BuildContext, Recommender


class PopularityConfig(ModelConfig):
    name: Literal["popularity"] = "popularity"  # selects the most-popular baseline (no other keys)
    trains: ClassVar[bool] = False

    def build(self, dataset: Dataset, context: BuildContext) -> Popularity:
        return Popularity(dataset.num_items)


class Popularity(Recommender):
    """Not trained by gradient: :meth:`fit` counts the training interactions."""

    trainable = False

    def __init__(self, num_items: int):
        super().__init__(num_items)
        self.register_buffer("log_counts", torch.zeros(num_items))

    def fit(self, train_items: np.ndarray) -> None:
        counts = np.bincount(train_items, minlength=self.num_items)
        self.log_counts.copy_(torch.log1p(torch.as_tensor(counts, dtype=torch.float32)))

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self.log_counts[items].expand(len(user), -1)
