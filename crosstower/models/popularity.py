"""Most-popular baseline: every user gets the catalogue ranked by training interaction count."""

from __future__ import annotations

import numpy as np
import torch

from crosstower.data.batching import UserInput
from crosstower.models.base import Recommender


class Popularity(Recommender):
    trainable = False

    def __init__(self, num_items: int):
        super().__init__(num_items)
        self.register_buffer("log_counts", torch.zeros(num_items))

    def fit_counts(self, train_items: np.ndarray) -> None:
        counts = np.bincount(train_items, minlength=self.num_items)
        self.log_counts.copy_(torch.log1p(torch.as_tensor(counts, dtype=torch.float32)))

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self.log_counts[items].expand(len(user), -1)
