"""Two-tower baselines: DSSM and YouTubeDNN as presets of one configurable model.

* DSSM (Huang et al. 2013, as used for retrieval): MLP towers over field embeddings on both
  sides, cosine similarity times a scale (fixed, or learned), softmax over sampled negatives.
* YouTubeDNN (Covington et al. 2016): the user tower is an MLP over the mean of the history's
  item embeddings, the user features and the example age (0 at serving); the item side is the
  item embedding itself; sampled softmax with the logQ correction.

Both are :class:`EmbeddingRecommender` s: the score is ``<u, v>`` (an optional per-item bias is
folded in as one extra coordinate), so the same vectors serve through MIPS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.models.base import EmbeddingRecommender, item_prior
from crosstower.nn.fields import MLP, FieldEmbedder, masked_mean
from crosstower.nn.tokenizers import embed_history


@dataclass
class TwoTowerSettings:
    embedding_dim: int = 64
    output_dim: int = 64
    user_hidden: list[int] = field(default_factory=lambda: [128])
    item_hidden: list[int] = field(default_factory=lambda: [128])
    item_mlp: bool = True  # False: the item vector is the sum of its field embeddings
    user_fields: list[str] | None = None  # None: every user field
    item_fields: list[str] | None = None
    use_history: bool = True
    use_example_age: bool = False
    similarity: str = "cosine"  # "cosine" or "dot"
    temperature: float = 0.05  # logits = similarity / temperature
    learn_temperature: bool = False
    item_bias: bool = False
    dropout: float = 0.0


class TwoTower(EmbeddingRecommender):
    def __init__(self, dataset: Dataset, settings: TwoTowerSettings):
        super().__init__(dataset.num_items)
        s = self.settings = settings
        d = s.embedding_dim
        self.item_fields = FieldEmbedder(dataset.items.select(s.item_fields), d)
        user_table = dataset.users.select(s.user_fields)
        self.user_fields = FieldEmbedder(user_table, d) if user_table.fields else None
        user_in = (self.user_fields.num_fields * d if self.user_fields else 0) + (d if s.use_history else 0)
        user_in += 1 if s.use_example_age else 0
        if user_in == 0:
            raise ConfigError("model: the user tower has no input (no history and no user field besides user_id)")
        self.user_tower = MLP([user_in, *s.user_hidden, s.output_dim], s.dropout)
        if s.item_mlp:
            self.item_tower = MLP([self.item_fields.num_fields * d, *s.item_hidden, s.output_dim], s.dropout)
        self.log_scale = nn.Parameter(torch.tensor(-math.log(s.temperature)), requires_grad=s.learn_temperature)
        self.bias = item_prior(dataset.num_items, s.item_bias)

    def _history_vector(self, user: UserInput) -> torch.Tensor:
        return masked_mean(embed_history(self.item_fields, user.history), user.history_mask)

    def encode_users(self, user: UserInput) -> torch.Tensor:
        parts = []
        if self.user_fields is not None:
            parts.append(self.user_fields(user.users).flatten(1))
        if self.settings.use_history:
            parts.append(self._history_vector(user))
        if self.settings.use_example_age:
            age = user.example_age if user.example_age is not None else torch.zeros(len(user), device=user.users.device)
            parts.append(age.unsqueeze(-1))
        vector = self._similarity_space(self.user_tower(torch.cat(parts, dim=-1))) * self.log_scale.exp()
        return self._user_with_prior(vector)

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        tokens = self.item_fields(items)
        vector = self.item_tower(tokens.flatten(1)) if self.settings.item_mlp else tokens.sum(1)
        return self._item_with_prior(self._similarity_space(vector), items)

    def _similarity_space(self, vector: torch.Tensor) -> torch.Tensor:
        return F.normalize(vector, dim=-1) if self.settings.similarity == "cosine" else vector
