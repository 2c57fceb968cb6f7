"""The index of a TRMD student: late-interaction candidates, then its two rankers exactly.

A TRMD student scores ``s = s1 + s2``: ``s2`` is MaxSim over normalised token vectors, as in
late interaction, and ``s1 = a . max(h_u, h_i) + c`` reads the two towers' [CLS] states through
an element-wise max, which no nearest-neighbour index searches. So the index keeps what the
late-interaction index keeps (item tokens and a token-level faiss index that proposes
candidates) plus each item's [CLS] state, and re-scores every candidate with both rankers: the
served score of a candidate is the model's own; what it can miss is an item the token search
did not propose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crosstower.index.base import as_numpy, as_tensor
from crosstower.index.late_interaction import LateInteractionIndex
from crosstower.nn.maxsim import maxsim_pairs
from crosstower.nn.tokens import TokenSequence


@dataclass
class TwoRankerQuery:
    """A batch of users as the index searches them: token vectors and [CLS] states ``[B, D]``."""

    tokens: TokenSequence
    cls: torch.Tensor


class TwoRankerIndex(LateInteractionIndex):
    """Late-interaction candidates re-scored by ``MaxSim + a . max(h_u, h_i) + c``."""

    kind = "two_rankers"

    item_cls: np.ndarray  # [N, D] float32
    ranker: np.ndarray  # [D + 1]: the folded ranker a, then the constant c

    @classmethod
    def build_two_rankers(cls, items: TokenSequence, item_cls: torch.Tensor, ranker: torch.Tensor,
                          **settings: Any) -> TwoRankerIndex:
        """Index the catalogue's token vectors ``items`` and [CLS] states ``item_cls``; ``ranker``
        is ``[a; c]``, the first ranker folded for inference."""
        index = cls.build(items, None, **settings)
        index.item_cls = as_numpy(item_cls, np.float32)
        index.ranker = as_numpy(ranker, np.float32)
        return index

    def token_query(self, queries: TwoRankerQuery) -> TokenSequence:
        return queries.tokens

    def exact_scores(self, queries: TwoRankerQuery, items: np.ndarray, tokens: TokenSequence) -> torch.Tensor:
        a, c = as_tensor(self.ranker[:-1]), float(self.ranker[-1])
        joint = torch.maximum(queries.cls[:, None, :].float(), as_tensor(self.item_cls[items]))
        return maxsim_pairs(queries.tokens, tokens) + joint @ a + c

    def arrays(self) -> dict[str, np.ndarray]:
        return {**super().arrays(), "item_cls": self.item_cls, "ranker": self.ranker}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TwoRankerIndex:
        index = super().from_arrays(arrays, meta)
        index.item_cls = np.asarray(arrays["item_cls"], dtype=np.float32)
        index.ranker = np.asarray(arrays["ranker"], dtype=np.float32)
        return index
