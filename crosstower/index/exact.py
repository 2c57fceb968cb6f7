"""Brute-force maximum inner product search: the index of every two-tower model.

It ranks through :func:`crosstower.evaluate.ranking.topk_items`, the function exhaustive
evaluation uses, so served and evaluated rankings agree item for item (same exclusions, same
lower-index-first tie rule). It is also the baseline that every approximate index is measured
against, in recall and in bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.evaluate.ranking import DEFAULT_ITEM_CHUNK, DEFAULT_USER_BATCH, topk_items
from crosstower.index.base import Index, Timer, as_numpy, as_tensor, check_exclude


class ExactInnerProductIndex(Index):
    """Score = ``<user_vector, item_vector>`` over the whole catalogue; item vectors in float32."""

    kind = "exact_inner_product"
    exact = True

    def __init__(self, item_vectors: torch.Tensor | np.ndarray) -> None:
        with Timer() as timer:
            item_vectors = as_numpy(item_vectors)
            if item_vectors.ndim != 2 or len(item_vectors) == 0:
                raise ValueError(f"item_vectors must be a non-empty [N, D] matrix, got shape {item_vectors.shape}")
            # A memory-mapped float32 array is kept as is: converting would read it all.
            if item_vectors.dtype != np.float32:
                item_vectors = item_vectors.astype(np.float32)
            self._items = item_vectors
            self._items_t = as_tensor(np.ascontiguousarray(item_vectors))
        self.build_seconds = timer.seconds

    @property
    def num_items(self) -> int:
        return int(self._items.shape[0])

    @property
    def dim(self) -> int:
        return int(self._items.shape[1])

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        exclude: Ragged | None = None,
        user_batch: int = DEFAULT_USER_BATCH,
        item_chunk: int = DEFAULT_ITEM_CHUNK,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` of ``queries`` (user vectors ``[B, D]``) by inner product."""
        users = torch.as_tensor(queries).detach().to("cpu", torch.float32)
        if users.ndim != 2 or users.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}] user vectors, got {tuple(users.shape)}")
        exclude = check_exclude(exclude, len(users))
        items = self._items_t

        def scorer(rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
            return users[torch.from_numpy(rows)] @ items[start:stop].T

        with torch.no_grad():
            return topk_items(scorer, len(users), self.num_items, exclude, k, user_batch, item_chunk)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"item_vectors": self._items}

    def meta(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "dim": self.dim}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ExactInnerProductIndex:
        vectors = arrays["item_vectors"]
        if vectors.dtype != np.float32 or vectors.shape != (meta["num_items"], meta["dim"]):
            raise ValueError(f"item_vectors is {vectors.dtype}{list(vectors.shape)}, expected float32 "
                             f"[{meta['num_items']}, {meta['dim']}]")
        return cls(vectors)
