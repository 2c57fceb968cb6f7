"""How the late-interaction index stores item token vectors: float16, or ColBERTv2 residuals.

Both stores keep the dense ``[N, L_i]`` token layout of the catalogue (padding slots included, so
an item's tokens are found by its index alone) and decode any set of items back to float32
vectors for exact MaxSim re-scoring.

* :class:`Float16Store`: every vector in float16, ``2 m`` bytes a token.
* :class:`ResidualStore` (ColBERTv2, methods.md §8.2): each vector is its nearest k-means centroid
  (by inner product on unit vectors) plus a residual quantised per dimension to ``nbits`` bits.
  The bucket cutoffs are the quantiles ``j / 2^b`` of all residual values pooled over dimensions,
  the reconstruction values the quantiles ``(j + 0.5) / 2^b``; decoding renormalises. A token
  costs a 4-byte centroid id plus ``m b / 8`` bytes (20 bytes at m = 32, b = 4, against 64 in
  float16); the centroids are shared by the catalogue.
"""

from __future__ import annotations

from typing import Any, ClassVar

import faiss
import numpy as np

NBITS = (1, 2, 4, 8)


class Float16Store:
    kind: ClassVar[str] = "float16"

    def __init__(self, tokens: np.ndarray) -> None:
        if tokens.dtype != np.float16 or tokens.ndim != 3:
            raise ValueError(f"item_tokens must be float16 [N, L_i, m], got {tokens.dtype}{list(tokens.shape)}")
        self.tokens = tokens

    @classmethod
    def encode(cls, tokens: np.ndarray, mask: np.ndarray) -> Float16Store:
        return cls(tokens.astype(np.float16))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.tokens.shape)

    def decode(self, items: np.ndarray) -> np.ndarray:
        """Float32 token vectors ``[*items.shape, L_i, m]`` of the items ``items``."""
        return self.tokens[items].astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"item_tokens": self.tokens}

    def meta(self) -> dict[str, Any]:
        return {"store": self.kind}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Float16Store:
        return cls(arrays["item_tokens"])


class ResidualStore:
    kind: ClassVar[str] = "residual"

    def __init__(self, centroids: np.ndarray, codes: np.ndarray, residuals: np.ndarray, weights: np.ndarray,
                 nbits: int, dim: int) -> None:
        if nbits not in NBITS:
            raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
        if codes.ndim != 2 or residuals.shape != (*codes.shape, dim * nbits // 8) or len(weights) != 2**nbits:
            raise ValueError(f"residual store arrays disagree: codes {codes.shape}, residuals {residuals.shape}, "
                             f"{len(weights)} bucket weights for {nbits} bits and dim {dim}")
        self.centroids, self.codes, self.residuals, self.weights = centroids, codes, residuals, weights
        self.nbits, self.dim = nbits, dim

    @classmethod
    def encode(cls, tokens: np.ndarray, mask: np.ndarray, nbits: int = 4, centroids: int | None = None,
               seed: int = 0) -> ResidualStore:
        """Compress ``tokens [N, L_i, m]``; k-means and the quantiles use the real tokens only."""
        n, length, m = tokens.shape
        if (m * nbits) % 8:
            raise ValueError(f"dim {m} x {nbits} bits is not a whole number of bytes")
        flat = np.ascontiguousarray(tokens.reshape(-1, m), dtype=np.float32)
        real = flat[mask.reshape(-1)]
        # ColBERTv2's rule, 2^floor(log2(16 sqrt(tokens))) centroids, capped for k-means' sake
        k = centroids or 2 ** int(np.floor(np.log2(16 * np.sqrt(len(real)))))
        k = max(1, min(k, len(real) // 39 or 1))
        kmeans = faiss.Kmeans(m, k, niter=20, seed=seed, spherical=True)
        kmeans.train(real)
        table = kmeans.centroids.astype(np.float32)
        codes = _nearest(table, flat)
        residual = flat - table[codes]
        cutoffs = np.quantile(residual[mask.reshape(-1)], np.arange(1, 2**nbits) / 2**nbits)
        weights = np.quantile(residual[mask.reshape(-1)], (np.arange(2**nbits) + 0.5) / 2**nbits).astype(np.float32)
        buckets = np.searchsorted(cutoffs, residual).astype(np.uint8)  # [T, m] in [0, 2^b)
        packed = _pack(buckets, nbits)
        return cls(table, codes.reshape(n, length).astype(np.int32), packed.reshape(n, length, -1), weights, nbits, m)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.codes.shape, self.dim)

    def decode(self, items: np.ndarray) -> np.ndarray:
        codes = self.codes[items]
        buckets = _unpack(self.residuals[items].reshape(-1, self.residuals.shape[-1]), self.nbits, self.dim)
        vectors = self.centroids[codes.reshape(-1)] + self.weights[buckets]
        vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors.reshape(*codes.shape, self.dim)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "codes": self.codes, "residuals": self.residuals,
                "bucket_weights": self.weights}

    def meta(self) -> dict[str, Any]:
        return {"store": self.kind, "nbits": self.nbits, "dim": self.dim}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ResidualStore:
        return cls(np.asarray(arrays["centroids"]), arrays["codes"], arrays["residuals"],
                   np.asarray(arrays["bucket_weights"]), int(meta["nbits"]), int(meta["dim"]))


STORES = {Float16Store.kind: Float16Store, ResidualStore.kind: ResidualStore}


def _nearest(centroids: np.ndarray, vectors: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the centroid with the largest inner product, for every vector."""
    return np.concatenate([np.argmax(vectors[lo : lo + chunk] @ centroids.T, axis=1)
                           for lo in range(0, len(vectors), chunk)]) if len(vectors) else np.zeros(0, np.int64)


def _pack(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """``[T, m]`` values below ``2^nbits`` -> ``[T, m nbits / 8]`` bytes, most significant bit first."""
    bits = (buckets[..., None] >> np.arange(nbits - 1, -1, -1, dtype=np.uint8)) & 1  # [T, m, b]
    return np.packbits(bits.reshape(len(buckets), -1), axis=1)


def _unpack(packed: np.ndarray, nbits: int, dim: int) -> np.ndarray:
    bits = np.unpackbits(packed, axis=1)[:, : dim * nbits].reshape(len(packed), dim, nbits)
    return (bits * (1 << np.arange(nbits - 1, -1, -1))).sum(-1)
