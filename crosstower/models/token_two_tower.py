"""The two-tower model SparCode is compared with: the same tokenizers, one dot product.

The user tokenizer (DNN or SA) emits one token and the item tokenizer one token; the score is
their inner product. Holding the tokenizers fixed isolates what SparCode adds: the all-to-all
interaction encoder over several quantised tokens. With ``item_bias`` the score gains the same
learned per-item prior SparCode can add, ``<u, i> + p_i``, so that the two are compared with
equal means of expressing popularity; it stays servable by MIPS (``[u; 1] . [i; p_i]``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.models.base import BuildContext, EmbeddingRecommender, InnerProductIndexConfig, item_prior
from crosstower.models.sparcode import TokenizerConfig, build_tokenizers


class TokenTwoTowerConfig(TokenizerConfig):
    """A two-tower model over SparCode's tokenizers: one user token, one item token, a dot product."""

    name: Literal["twotower"] = "twotower"  # selects the two-tower model over SparCode's tokenizers
    index: InnerProductIndexConfig = Field(default_factory=InnerProductIndexConfig)  # how the item vectors are served

    @model_validator(mode="after")
    def _one_token_tokenizer(self):
        if self.tokenizer == "late":
            raise ValueError("tokenizer 'late' emits one vector per user token; its two-tower model is "
                             "late interaction itself (model name 'colbert')")
        return self

    def build(self, dataset: Dataset, context: BuildContext) -> TokenTwoTower:
        return TokenTwoTower(dataset, self, context)


class TokenTwoTower(EmbeddingRecommender):
    def __init__(self, dataset: Dataset, config: TokenTwoTowerConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        self.config = config
        self.tokenizer, self.item_tokenizer = build_tokenizers(dataset, config, context, user_tokens=1, item_tokens=1)
        self.bias = item_prior(dataset.num_items, config.item_bias)

    def encode_users(self, user: UserInput) -> torch.Tensor:
        return self._user_with_prior(self.tokenizer(user)[:, 0])

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        return self._item_with_prior(self.item_tokenizer(items)[:, 0], items)
