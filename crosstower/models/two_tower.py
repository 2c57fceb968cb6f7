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
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from crosstower.config import ModelConfig
from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.models.base import BuildContext, EmbeddingRecommender, InnerProductIndexConfig, item_prior
from crosstower.nn.fields import MLP, FieldEmbedder, masked_mean
from crosstower.nn.tokenizers import embed_history


class TwoTowerConfig(ModelConfig):
    """What DSSM and YouTubeDNN share; each preset sets its own defaults."""

    embedding_dim: int = Field(64, ge=1)  # width of every field embedding (history items: sum of their fields')
    output_dim: int = Field(64, ge=1)  # width of the user and item vectors that are scored and served
    user_hidden: list[int] = Field(default_factory=lambda: [128])  # hidden layer widths of the user tower's MLP
    item_hidden: list[int] = Field(default_factory=lambda: [128])  # hidden layer widths of the item tower's MLP
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields to embed; None: every item field
    use_history: bool = True  # off under P3 whatever is set (the evaluated users have none)
    item_mlp: bool = True  # False: the item vector is the sum of its field embeddings
    use_example_age: bool = False  # off where the data set has no time stamps
    similarity: Literal["cosine", "dot"] = "cosine"  # cosine: L2-normalise both vectors first; dot: as they are
    temperature: float = Field(0.05, gt=0)  # logits = similarity / temperature
    learn_temperature: bool = False  # train the temperature with the weights (it starts at temperature)
    item_bias: bool = False  # add a learned per-item prior to the score (served as one more dimension)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate after each hidden layer of the towers
    index: InnerProductIndexConfig = Field(default_factory=InnerProductIndexConfig)  # how the item vectors are served

    @model_validator(mode="after")
    def _item_side_fits(self):
        if not self.item_mlp and self.embedding_dim != self.output_dim:
            raise ValueError("item_mlp false needs embedding_dim == output_dim (the item vector is its embedding)")
        return self

    def build(self, dataset: Dataset, context: BuildContext) -> TwoTower:
        return TwoTower(dataset, self, context)


class DSSMConfig(TwoTowerConfig):
    name: Literal["dssm"] = "dssm"  # selects DSSM: MLP towers over field embeddings, cosine similarity


class YouTubeDNNConfig(TwoTowerConfig):
    name: Literal["youtubednn"] = "youtubednn"  # selects YouTubeDNN: a user MLP against item embeddings, dot product
    item_mlp: bool = False
    item_hidden: list[int] = Field(default_factory=list)
    use_example_age: bool = True
    similarity: Literal["cosine", "dot"] = "dot"
    temperature: float = Field(1.0, gt=0)


class TwoTower(EmbeddingRecommender):
    def __init__(self, dataset: Dataset, config: TwoTowerConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.use_history = s.use_history and context.users_have_history
        self.use_example_age = s.use_example_age and dataset.has_time  # no time stamps: age carries nothing
        d = s.embedding_dim
        self.item_fields = FieldEmbedder(dataset.items.select(s.item_fields), d)
        user_table = dataset.users.select(context.user_fields(s.user_fields, dataset))
        self.user_fields = FieldEmbedder(user_table, d) if user_table.fields else None
        user_in = (self.user_fields.num_fields * d if self.user_fields else 0) + (d if self.use_history else 0)
        user_in += 1 if self.use_example_age else 0
        if user_in == 0:
            raise ConfigError("model: the user tower has no input (no history and no user field besides user_id)")
        self.user_input_dim, self.item_input_dim = user_in, self.item_fields.num_fields * d
        self.user_tower = MLP([user_in, *s.user_hidden, s.output_dim], s.dropout)
        if s.item_mlp:
            self.item_tower = MLP([self.item_fields.num_fields * d, *s.item_hidden, s.output_dim], s.dropout)
        self.log_scale = nn.Parameter(torch.tensor(-math.log(s.temperature)), requires_grad=s.learn_temperature)
        self.bias = item_prior(dataset.num_items, s.item_bias)

    def _history_vector(self, user: UserInput) -> torch.Tensor:
        return masked_mean(embed_history(self.item_fields, user.history), user.history_mask)

    def user_inputs(self, user: UserInput) -> torch.Tensor:
        """``[B, user_in]``: what the user tower reads (field embeddings, the mean history
        embedding, the example age), the embeddings a PFD teacher shares."""
        parts = []
        if self.user_fields is not None:
            parts.append(self.user_fields(user.users).flatten(1))
        if self.use_history:
            parts.append(self._history_vector(user))
        if self.use_example_age:
            age = user.example_age if user.example_age is not None else torch.zeros(user.users.shape[0], device=user.users.device)
            parts.append(age.unsqueeze(-1))
        return torch.cat(parts, dim=-1)

    def item_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """``[N, item_in]``: the item's field embeddings, what the item tower reads."""
        return self.item_fields(items).flatten(1)

    def encode_users(self, user: UserInput) -> torch.Tensor:
        vector = self._similarity_space(self.user_tower(self.user_inputs(user))) * self.log_scale.exp()
        return self._user_with_prior(vector)

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        if self.config.item_mlp:
            vector = self.item_tower(self.item_inputs(items))
        else:
            vector = self.item_fields(items).sum(1)
        return self._item_with_prior(self._similarity_space(vector), items)

    def _similarity_space(self, vector: torch.Tensor) -> torch.Tensor:
        return F.normalize(vector, dim=-1) if self.config.similarity == "cosine" else vector
