"""The two-tower model SparCode is compared with: the same tokenizers, one dot product.

The user tokenizer (DNN or SA) emits one token and the item tokenizer one token; the score is
their inner product. Holding the tokenizers fixed isolates what SparCode adds: the all-to-all
interaction encoder over several quantised tokens. With ``item_bias`` the score gains the same
learned per-item prior SparCode can add, ``<u, i> + p_i``, so that the two are compared with
equal means of expressing popularity; it stays servable by MIPS (``[u; 1] . [i; p_i]``).
"""

from __future__ import annotations

import torch
from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.models.base import EmbeddingRecommender, item_prior
from crosstower.models.sparcode import SparCodeSettings, build_tokenizers


class TokenTwoTower(EmbeddingRecommender):
    def __init__(self, dataset: Dataset, settings: SparCodeSettings):
        super().__init__(dataset.num_items)
        self.settings = settings
        self.tokenizer, self.item_tokenizer = build_tokenizers(dataset, settings, user_tokens=1, item_tokens=1)
        self.bias = item_prior(dataset.num_items, settings.item_bias)

    def encode_users(self, user: UserInput) -> torch.Tensor:
        return self._user_with_prior(self.tokenizer(user)[:, 0])

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        return self._item_with_prior(self.item_tokenizer(items)[:, 0], items)
