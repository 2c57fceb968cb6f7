"""Privileged user x item features for PFD (methods.md §2): what the teacher may read and a
two-tower student may not, because each depends on the user and the candidate together.

For a training example (user u at time t) and any candidate item j (the positive, a sampled
negative, an in-batch one), from u's interactions strictly before t (the example's history
window, slots at time t or later masked out):

* ``category_count``: how many of those items share a category with j (log1p; for a multi-valued
  field, the mean over j's values);
* ``category_share``: the same count over the number of past items;
* ``category_recency``: how many steps ago u last touched one of j's categories, over the window
  length (1 when never), and ``category_never`` (1 when never);
* ``item_count``: how often u interacted with j itself (log1p);
* ``category_rating`` (data sets with ratings): u's mean rating of those items minus u's mean
  rating of all its past items (0 when none).

Defined for sampled negatives too, and read only from the past, so none of them copies the
label; post-event features (a rating of j itself) are not among them. Everything is gathered
from tensors, so a batch of ``B x C`` candidates costs a few gathers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.data.dataset import ITEM, RATING, TIME, USER, Dataset, category_field

NAMES = ("category_count", "category_share", "category_recency", "category_never", "item_count", "category_rating")


class PrivilegedFeatures(nn.Module):
    """``features(user, examples, candidates) -> [B, C, F]`` for training examples (positions in
    :class:`~crosstower.data.batching.TrainExamples`, as ``TrainBatch.examples`` holds them)."""

    def __init__(self, dataset: Dataset, train, history_length: int, field: str):
        super().__init__()
        frame = train.sort_values([USER, TIME, ITEM], kind="stable")  # TrainExamples' order
        self.history_length = history_length
        values = torch.as_tensor(dataset.items.values[field]).long()
        self.register_buffer("categories", values[:, None] if values.dim() == 1 else values, persistent=False)
        self.num_categories = dataset.items.fields[field].vocab_size
        self.register_buffer("times", torch.tensor(frame[TIME].to_numpy(np.float64)), persistent=False)
        self.with_rating = RATING in frame.columns
        ratings = frame[RATING].to_numpy(np.float32) if self.with_rating else np.zeros(len(frame), np.float32)
        self.register_buffer("ratings", torch.tensor(ratings), persistent=False)

    @property
    def num_features(self) -> int:
        return len(NAMES) if self.with_rating else len(NAMES) - 1

    def past_mask(self, user: UserInput, examples: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: history slots that hold an item and lie strictly before the example's time."""
        length = user.history.shape[1]
        offsets = examples[:, None] - length + torch.arange(length, device=examples.device)
        past = self.times[offsets.clamp_min(0)] < self.times[examples][:, None]
        return (user.history >= 0) & past

    def forward(self, user: UserInput, examples: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``[B, C, F]`` features of each example's candidates ``candidates [B, C]``."""
        b, length = user.history.shape
        past = self.past_mask(user, examples)
        slots = torch.arange(length, device=past.device).expand(b, -1)
        history_values = self.categories[user.history.clamp_min(0)]  # [B, L, M]
        real = past[..., None] & (history_values > 0)
        flat = history_values.reshape(b, -1)
        counts = torch.zeros(b, self.num_categories, device=past.device).scatter_add_(1, flat, real.reshape(b, -1).float())
        last = torch.full((b, self.num_categories), -1.0, device=past.device).scatter_reduce_(
            1, flat, torch.where(real, slots[..., None].float(), -1.0).reshape(b, -1), reduce="amax")
        candidate_values = self.categories[candidates]  # [B, C, M]
        valid = (candidate_values > 0).float()
        per_value = valid.sum(-1).clamp_min(1.0)
        gathered = candidate_values.reshape(b, -1)
        count = (counts.gather(1, gathered).view_as(valid) * valid).sum(-1) / per_value
        n_past = past.sum(-1, keepdim=True).float()
        most_recent = torch.where(valid > 0, last.gather(1, gathered).view_as(valid), -1.0).amax(-1)
        never = (most_recent < 0).float()
        recency = torch.where(most_recent < 0, 1.0, (length - 1 - most_recent) / max(length, 1))
        same_item = (user.history[:, None, :] == candidates[:, :, None]) & past[:, None, :]
        features = [count.log1p(), count / n_past.clamp_min(1.0), recency, never, same_item.sum(-1).float().log1p()]
        if self.with_rating:
            offsets = examples[:, None] - length + torch.arange(length, device=examples.device)
            ratings = torch.where(past, self.ratings[offsets.clamp_min(0)], 0.0)
            sums = torch.zeros(b, self.num_categories, device=past.device).scatter_add_(
                1, flat, (real * ratings[..., None]).reshape(b, -1))
            rating_sum = (sums.gather(1, gathered).view_as(valid) * valid).sum(-1) / per_value
            user_mean = ratings.sum(-1, keepdim=True) / n_past.clamp_min(1.0)
            features.append((rating_sum / count.clamp_min(1e-6) - user_mean) * (count > 0))
        return torch.stack(features, dim=-1)
