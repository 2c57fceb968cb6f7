"""An approximate maximum inner product index over item vectors, by faiss.

What a two-tower model is served by at scale: faiss's ``index_factory`` names the structure
(``"HNSW32"``, ``"IVF{auto},Flat"``, ``"IVF{auto},PQ16"``; ``"Flat"`` is exact) and the index is
stored serialised as one ``uint8`` array, so saving, loading and byte accounting go through the
same protocol as every other index. Excluded items (a user's training items) are removed by
asking faiss for ``k`` plus the most any user of the batch excludes and dropping them, and the
answer is ordered by the evaluator's tie rule (lower item index first); only among items tied at
the k-th place does faiss keep its own choice.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.index.base import Index, Timer, as_numpy, check_exclude, excluded, ranked


def train_faiss_index(vectors: np.ndarray, spec: str, seed: int = 0) -> faiss.Index:
    """A trained and filled faiss index over ``vectors`` (inner-product metric)."""
    # {auto}: 4 sqrt(n) inverted lists, the usual faiss guidance, but no more than n / 39 so
    # that k-means has the 39 training points per centroid faiss asks for.
    lists = max(1, min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39))
    spec = spec.replace("{auto}", str(lists))
    index = faiss.index_factory(vectors.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # 256k training points, or 64 a list where there are more lists (millions of vectors)
        size = max(256 * 1024, 64 * lists)
        sample = np.random.default_rng(seed).permutation(len(vectors))[:size]
        index.train(vectors[sample])
    index.add(vectors)
    return index


def set_search_breadth(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """How widely a search looks: IVF lists probed, HNSW candidates kept (where the index has them)."""
    inner = faiss.downcast_index(index)
    if hasattr(inner, "nprobe"):
        inner.nprobe = nprobe
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ef_search


class FaissInnerProductIndex(Index):
    """Item vectors ``[N, D]`` in a faiss index (inner-product metric); queries are user vectors."""

    kind = "faiss_inner_product"

    def __init__(self, index: faiss.Index, spec: str, nprobe: int = 16, ef_search: int = 128) -> None:
        self.index, self.spec, self.nprobe, self.ef_search = index, spec, nprobe, ef_search
        set_search_breadth(index, nprobe, ef_search)

    @classmethod
    def build(cls, item_vectors: torch.Tensor | np.ndarray, spec: str = "HNSW32", nprobe: int = 16,
              ef_search: int = 128) -> FaissInnerProductIndex:
        with Timer() as timer:
            vectors = np.ascontiguousarray(as_numpy(item_vectors, np.float32))
            if vectors.ndim != 2 or len(vectors) == 0:
                raise ValueError(f"item_vectors must be a non-empty [N, D] matrix, got shape {vectors.shape}")
            index = cls(train_faiss_index(vectors, spec), spec, nprobe, ef_search)
        index.build_seconds = timer.seconds
        return index

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, queries: torch.Tensor, k: int, exclude: Ragged | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of ``queries`` (user vectors ``[B, D]``) by approximate inner product."""
        users = np.ascontiguousarray(as_numpy(queries, np.float32))
        if users.ndim != 2 or users.shape[1] != self.dim:
            raise ValueError(f"queries must be [B, {self.dim}] user vectors, got {tuple(users.shape)}")
        exclude = check_exclude(exclude, len(users))
        wanted = min(self.num_items, k + int(exclude.lengths.max(initial=0)))
        scores, items = self.index.search(users, wanted)
        items = items.astype(np.int64)
        drop = (items < 0) | excluded(exclude, items)
        scores = torch.from_numpy(np.where(drop, -np.inf, scores).astype(np.float32))
        return ranked(scores, torch.from_numpy(np.where(drop, -1, items)), k)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"faiss_index": faiss.serialize_index(self.index)}

    def meta(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "dim": self.dim, "spec": self.spec, "nprobe": self.nprobe,
                "ef_search": self.ef_search}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> FaissInnerProductIndex:
        index = faiss.deserialize_index(np.ascontiguousarray(arrays["faiss_index"]))
        if (index.ntotal, index.d) != (meta["num_items"], meta["dim"]):
            raise ValueError(f"the faiss index holds {index.ntotal} x {index.d}, expected "
                             f"{meta['num_items']} x {meta['dim']}")
        return cls(index, meta["spec"], meta["nprobe"], meta["ef_search"])
