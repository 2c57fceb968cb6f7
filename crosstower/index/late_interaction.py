"""The late-interaction index: item token vectors, token-level candidate generation, exact MaxSim.

A late-interaction score is not one inner product, so no single-vector MIPS index serves it. This
index does what ColBERT v1 end-to-end retrieval does (methods.md §8.1):

1. **Candidates.** Every real user token asks a faiss index over *all item token vectors* for its
   ``tokens_per_query`` nearest item tokens (inner product on unit vectors). An item's
   approximate score is MaxSim with every similarity a token did not retrieve imputed by the
   lowest one it did retrieve (an upper bound on it, as in XTR, Lee et al. 2023), plus the item
   bias: up to a per-user constant, the sum over user tokens of ``best hit - lowest hit`` plus the
   bias. Items no token retrieved keep the bias alone, so the most popular items compete too (a
   model trained with in-batch negatives and logQ carries much of the popularity in its bias).
   The ``max_candidates`` items with the best approximate score are kept.
2. **Exact re-scoring.** The candidates' stored token vectors (float16, or ColBERTv2 residuals:
   :mod:`crosstower.index.token_store`) are scored by the model's own
   :func:`~crosstower.nn.maxsim.maxsim_pairs`, plus the item bias, and the top
   ``k`` returned with the evaluator's tie rule (lower item index first), so served and exhaustive
   rankings can be compared item for item.

The faiss index is named by an ``index_factory`` string (``"IVF64,Flat"``, ``"HNSW32"``,
``"Flat"``) and stored serialised as one ``uint8`` array, so saving, loading and byte accounting
go through the same protocol as every other index. What searches scored is reported by
:attr:`LateInteractionIndex.last_scored_fraction` and :attr:`LateInteractionIndex.mean_scored_fraction`.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.index.base import Index, Timer, as_numpy, as_tensor, check_exclude, excluded, ranked
from crosstower.index.faiss_inner_product import train_faiss_index
from crosstower.index.token_store import STORES, Float16Store, ResidualStore
from crosstower.nn.maxsim import maxsim_pairs
from crosstower.nn.tokens import TokenSequence


class LateInteractionIndex(Index):
    """Item tokens ``[N, L_i, m]`` (float16 or residual codes, :mod:`crosstower.index.token_store`)
    + their mask + item bias + a token-level faiss index."""

    kind = "late_interaction"

    def __init__(
        self, store: Float16Store | ResidualStore, mask: np.ndarray, bias: np.ndarray, candidate_index: faiss.Index,
        spec: str, tokens_per_query: int = 128, max_candidates: int = 300, nprobe: int = 16,
    ) -> None:
        self.store, self.mask, self.bias, self.spec = store, mask, bias, spec
        self.candidate_index = candidate_index
        self.tokens_per_query, self.max_candidates, self.nprobe = tokens_per_query, max_candidates, nprobe
        # The faiss index holds the real tokens only, in (item, token) order: id -> item.
        self.token_item = np.nonzero(mask)[0].astype(np.int64)
        self.bias_order = np.argsort(-bias, kind="stable")  # items by bias: candidates no token retrieves
        self.last_scored_fraction = 0.0
        self._scored_pairs = self._queries = 0  # over every search since construction
        self._check_layout()

    def _check_layout(self) -> None:
        n, length, _ = self.store.shape
        if self.mask.shape != (n, length) or self.bias.shape != (n,):
            raise ValueError(f"mask {self.mask.shape} / bias {self.bias.shape} do not match tokens {self.store.shape}")
        if self.candidate_index.ntotal != len(self.token_item):
            raise ValueError(f"candidate index holds {self.candidate_index.ntotal} tokens, the mask {len(self.token_item)}")

    @classmethod
    def build(
        cls, items: TokenSequence, bias: torch.Tensor | None = None, spec: str = "IVF{auto},Flat",
        store: str = "float16", nbits: int = 4, **search_settings: int,
    ) -> LateInteractionIndex:
        """Index the catalogue's normalised token vectors ``items`` (``[N, L_i, m]`` + mask),
        stored as ``store`` ("float16", or "residual" with ``nbits`` bits a dimension)."""
        with Timer() as timer:
            tokens = as_numpy(items.tokens, np.float32)
            mask = as_numpy(items.mask, bool)
            if tokens.ndim != 3 or len(tokens) == 0 or not mask.any(axis=1).all():
                raise ValueError(f"items must be [N, L_i, m] token vectors with a real token per item, got {tokens.shape}")
            if store not in STORES:
                raise ValueError(f"store must be one of {sorted(STORES)}, got '{store}'")
            bias_array = np.zeros(len(tokens), np.float32) if bias is None else as_numpy(bias, np.float32)
            encoded = Float16Store.encode(tokens, mask) if store == "float16" else ResidualStore.encode(tokens, mask, nbits)
            # The candidate index sees what re-scoring will see: the stored (decoded) vectors.
            real = encoded.decode(np.arange(len(tokens)))[mask]  # row-major: item by item, token by token
            index = cls(encoded, mask, bias_array, train_faiss_index(real, spec), spec, **search_settings)
        index.build_seconds = timer.seconds
        return index

    @property
    def num_items(self) -> int:
        return int(self.store.shape[0])

    @property
    def mean_scored_fraction(self) -> float:
        """Share of the catalogue scored exactly per query, over every search so far."""
        return self._scored_pairs / max(1, self._queries * self.num_items)

    # ---- search ------------------------------------------------------------------------------
    def candidates(self, users: TokenSequence) -> list[np.ndarray]:
        """Per user, the item ids to score exactly (at most ``max_candidates``)."""
        b, length, m = users.tokens.shape
        flat = users.tokens.detach().reshape(-1, m).numpy().astype(np.float32)
        real = users.mask.reshape(-1).numpy()
        if hasattr(self.candidate_index, "nprobe"):
            self.candidate_index.nprobe = self.nprobe
        sims, ids = self.candidate_index.search(flat[real], self.tokens_per_query)
        found = ids >= 0
        lowest = np.where(found, sims, np.inf).min(axis=1, keepdims=True)  # imputed for the rest
        owner = np.repeat(np.flatnonzero(real), self.tokens_per_query)  # user-token row of every hit
        hit_items = np.where(found, self.token_item[ids.clip(min=0)], -1).reshape(-1)
        gains, keep = (sims - lowest).reshape(-1), found.reshape(-1)
        return _top_voted(owner[keep], hit_items[keep], gains[keep], b, length, self.bias,
                          self.bias_order[: self.max_candidates], self.max_candidates)

    def search(
        self, queries: TokenSequence, k: int, exclude: Ragged | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores, items)`` of every user's token vectors ``queries`` ``[B, L_u, m]``.

        Slots beyond a user's candidates hold item -1 and score -inf.
        """
        tokens = self.token_query(queries)
        exclude = check_exclude(exclude, tokens.tokens.shape[0])
        candidates = self.candidates(tokens)
        width = max([1, *(len(c) for c in candidates)])
        items = np.full((len(candidates), width), -1, dtype=np.int64)
        for row, c in enumerate(candidates):
            items[row, : len(c)] = c
        valid = items >= 0
        gathered = items.clip(min=0)
        token_seq = TokenSequence(
            torch.from_numpy(self.store.decode(gathered)), as_tensor(self.mask[gathered]) & torch.from_numpy(valid)[..., None]
        )
        with torch.no_grad():
            scores = self.exact_scores(queries, gathered, token_seq)
        scores = scores.masked_fill(~torch.from_numpy(valid & ~excluded(exclude, items)), float("-inf"))
        self.last_scored_fraction = float(valid.sum() / (len(candidates) * self.num_items))
        self._scored_pairs += int(valid.sum())
        self._queries += len(candidates)
        return ranked(scores, torch.from_numpy(items), k)

    def token_query(self, queries: Any) -> TokenSequence:
        """The user token vectors of ``queries`` (a subclass's query may carry more)."""
        return queries

    def exact_scores(self, queries: Any, items: np.ndarray, tokens: TokenSequence) -> torch.Tensor:
        """Scores ``[B, C]`` of each user against its candidates ``items`` (their stored
        ``tokens``): MaxSim plus the item bias."""
        return maxsim_pairs(queries, tokens) + as_tensor(self.bias[items])

    # ---- the index protocol ------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {
            **self.store.arrays(), "item_mask": self.mask, "item_bias": self.bias,
            "candidate_index": faiss.serialize_index(self.candidate_index),
        }

    def meta(self) -> dict[str, Any]:
        n, length, m = self.store.shape
        return {
            "num_items": n, "item_tokens": length, "dim": m, "candidate_index": self.spec,
            "tokens_per_query": self.tokens_per_query, "max_candidates": self.max_candidates, "nprobe": self.nprobe,
            **self.store.meta(),
        }

    def describe(self) -> dict[str, Any]:
        """The index's summary, with the share of the catalogue scored exactly per query so far."""
        return {**super().describe(), "scored_fraction": self.mean_scored_fraction}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> LateInteractionIndex:
        store = STORES[meta.get("store", "float16")].from_arrays(arrays, meta)
        expected = (meta["num_items"], meta["item_tokens"], meta["dim"])
        if store.shape != expected:
            raise ValueError(f"stored tokens are {list(store.shape)}, expected {list(expected)}")
        candidate_index = faiss.deserialize_index(np.ascontiguousarray(arrays["candidate_index"]))
        return cls(
            store, np.asarray(arrays["item_mask"], dtype=bool), np.asarray(arrays["item_bias"]), candidate_index,
            meta["candidate_index"], meta["tokens_per_query"], meta["max_candidates"], meta["nprobe"],
        )


def _top_voted(
    owner: np.ndarray, items: np.ndarray, gains: np.ndarray, num_users: int, length: int, bias: np.ndarray,
    by_bias: np.ndarray, top: int,
) -> list[np.ndarray]:
    """Per user, the ``top`` items by approximate score: summed retrieval gains plus the item bias.

    ``owner`` is the user-token row (``user * length + token``) of each hit and ``gains`` its
    similarity above the token's lowest hit. Per (user token, item) only the best hit counts (the
    max of MaxSim); per (user, item) those maxima are summed. Items no token retrieved score their
    bias alone, so the ``by_bias`` items (the highest biases, best first) are candidates as well.
    """
    num_items = len(bias)
    keys = owner * num_items + items
    order = np.lexsort((-gains, keys))  # by key, best gain first within a key
    keys, gains = keys[order], gains[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    keys, gains = keys[first], gains[first]  # max over a user token's hits on one item
    user_item = (keys // num_items) // length * num_items + keys % num_items
    pairs, inverse = np.unique(user_item, return_inverse=True)
    users, candidate = pairs // num_items, pairs % num_items
    approx = np.bincount(inverse, weights=gains, minlength=len(pairs)) + bias[candidate]
    out = []
    bounds = np.searchsorted(users, np.arange(num_users + 1))
    for u in range(num_users):
        lo, hi = bounds[u], bounds[u + 1]
        unretrieved = by_bias[~np.isin(by_bias, candidate[lo:hi])]
        pool = np.concatenate([candidate[lo:hi], unretrieved])
        scores = np.concatenate([approx[lo:hi], bias[unretrieved]])
        out.append(np.sort(pool[np.argsort(-scores, kind="stable")[:top]]))
    return out
