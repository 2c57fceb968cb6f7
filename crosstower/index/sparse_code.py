"""SparCode's inverted index: per query code, a posting list of (item, precomputed score).

SparCode scores a user as ``sum_k E(code_k(user), item)``: every user token is quantised to a code
tuple of M entries from codebooks of size N, and the all-to-all encoder ``E`` depends on the user
only through that code. So ``E`` can be run offline for every code that can occur
(:mod:`crosstower.index.code_table_build`), and serving is a lookup: read the posting lists of
the user's K_u codes, add the scores per item, take the top-k. The encoder's scores pass through
ReLU, so most are exactly 0 and need not be stored (:mod:`crosstower.index.keep_rules`).

Storage, one CSR table sorted by code id (see :func:`~crosstower.index.code_ids.encode_code_ids`):

- ``indptr``  int64 ``[C + 1]``: code row ``r`` owns entries ``indptr[r]:indptr[r + 1]``
- ``items``   int32 ``[nnz]``: item ids, ascending within a row
- ``scores``  float16 ``[nnz]``: the kept scores (all > 0)
- ``code_ids`` int64 ``[C]``: the mixed-radix id of each row's code tuple, strictly increasing
- ``codes``   int32 ``[C, M]``: the code tuples themselves (redundant with ``code_ids``; for
  inspection and for mapping rows back to codes)
- ``code_vectors`` float32 ``[C, D]``: the quantised (reconstruction) vector of each code, used to
  map a query code that was never indexed to the nearest indexed one.
- ``item_prior`` float32 ``[num_items]``, optional: a per-item score added to every user's sum
  (a model's learned item bias, e.g. popularity), so that the code scores need not carry it.
- ``code_usage`` int64 ``[C]``, optional: how many of the indexing users' tokens took each code.
  It lets a size budget be shared among the codes by use
  (:class:`~crosstower.index.keep_rules.UsageBudget`).

Score semantics at search time: an item absent from all of a user's posting lists scores exactly
its prior (0 without one), not -inf. That is the true (kept) score, since dropped entries are
those at or below the keep rule and ReLU makes the rest 0; it also means such items still fill
the top-k (by prior, then in ascending item order, the evaluation tie rule) rather than leaving
holes. Excluded items score -inf, as in evaluation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.evaluate.ranking import topk_items
from crosstower.index.base import Index, Timer, as_numpy, as_tensor, check_exclude
from crosstower.index.code_ids import CodeQueries, check_codes, encode_code_ids
from crosstower.index.code_table_build import ScoreCodes, chunk_results, collect, sorted_codes
from crosstower.index.keep_rules import Keep, canonical_keep, parse_keep, row_limits

# Dense accumulation block: users per block x catalogue <= 2^24 floats (64 MB of float32).
DENSE_BLOCK = 1 << 24
# Nearest-code fallback block: unseen tokens per block x indexed codes <= 2^22 floats.
NEAREST_BLOCK = 1 << 22


ABSENT_ROW = -1
"""The index row of an absent token (a query code tuple of -1 entries): an empty posting list."""


# ------------------------------------------------------------------------------------ index


class SparseCodeIndex(Index):
    """Inverted index code -> (item, score); search sums the posting lists of a user's codes."""

    kind = "sparse_code"

    def __init__(
        self,
        indptr: np.ndarray,
        items: np.ndarray,
        scores: np.ndarray,
        code_ids: np.ndarray,
        codes: np.ndarray,
        code_vectors: np.ndarray,
        num_items: int,
        codebook_size: int,
        keep: Keep = "nonzero",
        item_prior: np.ndarray | None = None,
        code_usage: np.ndarray | None = None,
    ) -> None:
        # np.asanyarray keeps a memory map when its dtype is already right (no read, no copy).
        self._indptr = np.asanyarray(indptr, dtype=np.int64)
        self._items = np.asanyarray(items, dtype=np.int32)
        self._scores = np.asanyarray(scores, dtype=np.float16)
        self._code_ids = np.asanyarray(code_ids, dtype=np.int64)
        self._codes = np.asanyarray(codes, dtype=np.int32)
        self._code_vectors = np.asanyarray(code_vectors, dtype=np.float32)
        self.num_items = int(num_items)
        self.codebook_size = int(codebook_size)
        self.keep: Keep = canonical_keep(keep)
        self._item_prior = None if item_prior is None else np.asanyarray(item_prior, dtype=np.float32)
        self._code_usage = None if code_usage is None else np.asanyarray(code_usage, dtype=np.int64)
        self._prior_order: np.ndarray | None = None  # items by descending prior, computed on demand
        self._nearest_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scratch = _OneQueryScratch()
        self._check_layout()

    def _check_layout(self) -> None:
        """Cheap consistency checks (O(C), never O(nnz)), so a bad folder fails at load time."""
        c = len(self._code_ids)
        if c == 0 or self.num_items < 1:
            raise ValueError("an index needs at least one code and one item")
        if self._indptr.shape != (c + 1,) or self._codes.ndim != 2 or len(self._codes) != c:
            raise ValueError(f"indptr {self._indptr.shape} / codes {self._codes.shape} do not match {c} code ids")
        if self._code_vectors.ndim != 2 or len(self._code_vectors) != c:
            raise ValueError(f"code_vectors {self._code_vectors.shape} do not match {c} code ids")
        nnz = len(self._items)
        if len(self._scores) != nnz or self._indptr[0] != 0 or self._indptr[-1] != nnz:
            raise ValueError(f"indptr ends at {self._indptr[-1]} but there are {nnz} items, {len(self._scores)} scores")
        if self._item_prior is not None and self._item_prior.shape != (self.num_items,):
            raise ValueError(f"item_prior has shape {self._item_prior.shape}, expected ({self.num_items},)")
        if self._code_usage is not None and self._code_usage.shape != (c,):
            raise ValueError(f"code_usage has shape {self._code_usage.shape}, expected ({c},)")
        if np.any(np.diff(self._indptr) < 0):
            raise ValueError("indptr is not non-decreasing")
        if np.any(np.diff(self._code_ids) <= 0):
            raise ValueError("code_ids are not strictly increasing")
        if not np.array_equal(encode_code_ids(self._codes, self.codebook_size), self._code_ids):
            raise ValueError("code_ids do not match codes")

    # -------------------------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        score_codes: ScoreCodes,
        codes: torch.Tensor | np.ndarray,
        code_vectors: torch.Tensor | np.ndarray,
        num_items: int,
        codebook_size: int,
        *,
        keep: Keep = "nonzero",
        code_chunk: int = 1024,
        workers: int = 1,
        progress: bool = True,
        item_prior: torch.Tensor | np.ndarray | None = None,
        code_usage: torch.Tensor | np.ndarray | None = None,
    ) -> SparseCodeIndex:
        """Score every code in ``codes`` against the catalogue and keep the entries ``keep`` says.

        ``codes`` [C, M] are the distinct tuples to index (typically those seen in training;
        pass all N^M of them to enumerate the whole code space); ``code_vectors`` [C, D] their
        reconstruction vectors. ``score_codes`` is called on chunks of ``code_chunk`` codes.
        With ``workers > 1`` chunks are scored in spawned processes, so ``score_codes`` must be
        picklable (a module-level function or an object of an importable class, e.g. an
        ``nn.Module`` wrapper) and is sent once to each worker; torch's threads are divided
        among the workers. ``item_prior`` [num_items] is added to every user's score at search.
        ``code_usage`` [C] (aligned with ``codes``) counts the tokens that took each code; a
        :class:`~crosstower.index.keep_rules.UsageBudget` needs it, and the index keeps it for
        later pruning.
        """
        if code_chunk < 1 or workers < 1 or num_items < 1:
            raise ValueError(f"need code_chunk, workers, num_items >= 1, got {code_chunk}, {workers}, {num_items}")
        with Timer() as timer:
            codes_np, vectors, ids, order = sorted_codes(codes, code_vectors, codebook_size)
            usage = None if code_usage is None else as_numpy(code_usage, np.int64)
            if usage is not None:
                if usage.shape != (len(codes_np),):
                    raise ValueError(f"code_usage must be [{len(codes_np)}], got shape {usage.shape}")
                usage = usage[order]
            rule = parse_keep(keep)
            limits = row_limits(rule, usage, num_items, len(codes_np))
            counts, items, scores = collect(
                chunk_results(score_codes, codes_np, num_items, rule, limits, code_chunk, workers),
                total=math.ceil(len(codes_np) / code_chunk), progress=progress,
            )
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            prior = None if item_prior is None else as_numpy(item_prior, np.float32)
            index = cls(indptr, items, scores, ids, codes_np, vectors, num_items, codebook_size, keep, prior, usage)
        index.build_seconds = timer.seconds
        return index

    def pruned(self, keep: Keep) -> SparseCodeIndex:
        """A sparser index from this one's stored entries: the top-L per code, the scores above a
        threshold, or a :class:`~crosstower.index.keep_rules.UsageBudget` (which needs
        ``code_usage``); ties at the boundary go to the lower item index (as in :meth:`build`).

        This is how the accuracy / size trade-off is measured without running the encoder again;
        it equals building with ``keep`` whenever this index kept every entry the new rule keeps
        (e.g. it was built with ``"nonzero"``), up to the float16 rounding of the stored scores.
        """
        rule = parse_keep(keep)
        rows = np.repeat(np.arange(self.num_codes), np.diff(self._indptr))
        scores = np.asarray(self._scores)
        if rule.mode == "threshold":
            kept = np.flatnonzero(scores > rule.value)
        else:
            limits = row_limits(rule, self._code_usage, self.num_items, self.num_codes)
            order = np.lexsort((np.asarray(self._items), -scores.astype(np.float32), rows))
            rank = np.arange(len(order)) - self._indptr[rows[order]]
            kept = np.sort(order[rank < limits[rows[order]]])  # back in (row, item) order
        counts = np.bincount(rows[kept], minlength=self.num_codes)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return SparseCodeIndex(
            indptr, np.asarray(self._items)[kept], scores[kept], self._code_ids, self._codes,
            self._code_vectors, self.num_items, self.codebook_size, keep, self._item_prior, self._code_usage,
        )

    def with_code_usage(self, codes: torch.Tensor | np.ndarray, counts: torch.Tensor | np.ndarray) -> SparseCodeIndex:
        """This index with ``code_usage`` set from ``counts[j]`` tokens of code ``codes[j]`` (an
        index saved without usage, e.g. before it was recorded). Indexed codes absent from
        ``codes`` get 0; a code in ``codes`` that is not indexed is a ValueError."""
        codes_np = check_codes(codes, self.codebook_size, "codes")
        counts_np = as_numpy(counts, np.int64)
        if codes_np.ndim != 2 or counts_np.shape != (len(codes_np),):
            raise ValueError(f"codes [n, M] and counts [n] must match, got {codes_np.shape} and {counts_np.shape}")
        rows, indexed = self._rows_of(encode_code_ids(codes_np, self.codebook_size))
        missing = ~indexed
        if missing.any():
            raise ValueError(f"{int(missing.sum())} of the codes are not indexed, e.g. {codes_np[missing][0].tolist()}")
        usage = np.bincount(rows, weights=counts_np, minlength=self.num_codes).astype(np.int64)
        return SparseCodeIndex(
            self._indptr, self._items, self._scores, self._code_ids, self._codes, self._code_vectors,
            self.num_items, self.codebook_size, self.keep, self._item_prior, usage,
        )

    # -------------------------------------------------------------------------------- search

    def search(
        self,
        queries: CodeQueries | tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor,
        k: int,
        exclude: Ragged | None = None,
        user_batch: int | None = None,
        sparse: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items of every user, ``queries = CodeQueries(codes [B, K_u, M], vectors)``
        (or the codes tensor alone when every code is known to be indexed).

        ``sparse`` forces (True) or forbids (False) ranking over the posting-list items only
        (with an item prior, also over enough of the top-prior items to stay exact); by default
        it is used when they are far fewer than the catalogue. Both give the same result (tested).

        Users are processed in blocks of ``user_batch`` (default: as many as fit a 64 MB dense
        score block); the result does not depend on the block size.
        """
        if isinstance(queries, (torch.Tensor, np.ndarray)):  # codes alone: all must be indexed
            queries = CodeQueries(queries, None)
        rows = self.lookup(*queries)
        exclude = check_exclude(exclude, len(rows))
        batch = user_batch or max(1, DENSE_BLOCK // self.num_items)
        parts = []
        for lo in range(0, len(rows), batch):
            hi = min(lo + batch, len(rows))
            sub = exclude.take(np.arange(lo, hi))
            parts.append(self._search_block(rows[lo:hi], sub, k, sparse))
        if not parts:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _search_block(
        self, rows: np.ndarray, exclude: Ragged, k: int, sparse: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of one block: over the posting-list items only when they are few (the result is
        the same; the cost then follows the posting lists, not the catalogue), else densely."""
        users, items, scores = self._gather(rows)
        b = len(rows)
        per_user = self._prior_candidates(users, exclude, k, b)
        if sparse is None:  # sorting n triples beats a dense block only when n is small
            sparse = 32 * (len(items) + b * per_user) < b * self.num_items
        if sparse:
            if per_user:
                users, items, scores = self._with_prior_candidates(users, items, scores, per_user, b)
            if b == 1:  # one query (serving latency): no sort over the candidates
                found = self._scratch.topk(items, scores, self.num_items, exclude.row(0), k, self._item_prior)
            else:
                found = _sparse_topk(users, items, scores, b, self.num_items, exclude, k, self._item_prior)
            if found is not None:
                return found
        dense = self._dense(users, items, scores, b)
        return topk_items(_block_scorer(dense), b, self.num_items, exclude, k, b, self.num_items)

    def _prior_candidates(self, users: np.ndarray, exclude: Ragged, k: int, b: int) -> int:
        """How many top-prior items each user of a block needs beside its posting lists, so that
        ranking over posting-list items alone stays exact: an item outside a user's lists scores
        its prior, and the best ``k`` of those are among the first ``k + |lists| + |excluded|``
        items by prior. 0 without a prior."""
        if self._item_prior is None:
            return 0
        most = int(np.bincount(users, minlength=b).max(initial=0)) + int(exclude.lengths.max(initial=0))
        return min(self.num_items, k + most)

    def _with_prior_candidates(
        self, users: np.ndarray, items: np.ndarray, scores: np.ndarray, per_user: int, b: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block's triples plus (user, top-prior item, 0) for each of the ``per_user``
        top-prior items and every user: candidates whose score is their prior alone (adding 0
        changes no sum)."""
        if self._prior_order is None:
            self._prior_order = np.lexsort((np.arange(self.num_items), -self._item_prior))  # ties: lower item
        top = self._prior_order[:per_user].astype(np.int64)
        return (np.concatenate([users, np.repeat(np.arange(b, dtype=np.int64), len(top))]),
                np.concatenate([items, np.tile(top, b)]),
                np.concatenate([scores, np.zeros(b * len(top), dtype=np.float32)]))

    def dense_scores(self, codes: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """The accumulated scores ``[B, num_items]`` float32 (no exclusions): what search ranks."""
        return self._accumulate(self.lookup(codes, vectors))

    def lookup(self, codes: torch.Tensor | np.ndarray, vectors: torch.Tensor | None = None) -> np.ndarray:
        """Index rows ``[B, K_u]`` of the query codes; unindexed codes map to the nearest indexed
        code by squared Euclidean distance between the token's vector and the code vectors, and
        absent tokens (codes of -1) to :data:`ABSENT_ROW`."""
        codes_np = check_codes(codes, self.codebook_size, "query codes", absent=True)
        if codes_np.ndim != 3 or codes_np.shape[2] != self.num_codebooks:
            raise ValueError(f"query codes must be [B, K_u, {self.num_codebooks}], got {codes_np.shape}")
        absent = (codes_np == -1).all(-1).reshape(-1)
        rows, indexed = self._rows_of(encode_code_ids(codes_np, self.codebook_size).reshape(-1))
        rows[absent] = ABSENT_ROW
        unseen = np.flatnonzero(~absent & ~indexed)
        if len(unseen):
            if vectors is None:
                raise ValueError(f"{len(unseen)} query codes were not indexed and no vectors were given")
            flat = torch.as_tensor(vectors).detach().to("cpu", torch.float32).reshape(-1, self.dim)
            if len(flat) != len(rows):
                raise ValueError(f"vectors must be [B, K_u, {self.dim}] matching the codes {codes_np.shape}")
            rows[unseen] = self.nearest_codes(flat[torch.from_numpy(unseen)])
        return rows.reshape(codes_np.shape[:2])

    def _rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The row of each code id and whether that code is indexed (where it is not, the row is
        only where the id would sort)."""
        rows = np.searchsorted(self._code_ids, ids).clip(max=self.num_codes - 1)
        return rows, self._code_ids[rows] == ids

    def nearest_codes(self, vectors: torch.Tensor) -> np.ndarray:
        """Row of the indexed code nearest to each vector (ties: the lower code id)."""
        table, norms = self._nearest_table()
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        block = max(1, NEAREST_BLOCK // self.num_codes)
        out = []
        for part in vectors.split(block):  # a loop over blocks of tokens, not over tokens
            dist = norms[None, :] - 2.0 * part @ table.T + (part * part).sum(1, keepdim=True)
            out.append(dist.argmin(dim=1))  # argmin returns the first minimum: the lower code id
        return torch.cat(out).numpy().astype(np.int64)

    def _nearest_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._nearest_cache is None:
            table = torch.from_numpy(np.array(self._code_vectors))  # one read of C x D floats
            self._nearest_cache = (table, (table * table).sum(1))
        return self._nearest_cache

    def _accumulate(self, rows: np.ndarray) -> torch.Tensor:
        """Dense ``[b, num_items]`` sums of the posting lists of each user's codes."""
        return self._dense(*self._gather(rows), len(rows))

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (user, item, score) triples of all b*K_u posting lists, in token order per user,
        gathered with one vectorised CSR slice: no loop over users or codes."""
        b, k_u = rows.shape
        flat = rows.reshape(-1)
        present = flat != ABSENT_ROW
        safe = np.where(present, flat, 0)
        starts = self._indptr[safe]
        lengths = np.where(present, self._indptr[safe + 1] - starts, 0)
        ends = np.cumsum(lengths)
        pos = np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)
        user = np.repeat(np.arange(len(flat), dtype=np.int64) // max(k_u, 1), lengths)
        return user, self._items[pos].astype(np.int64), self._scores[pos].astype(np.float32)

    def _dense(self, users: np.ndarray, items: np.ndarray, scores: np.ndarray, b: int) -> torch.Tensor:
        """The triples added into ``[b, num_items]`` float32 (the prior, else 0) with one ``index_add_``."""
        if self._item_prior is None:
            dense = torch.zeros(b, self.num_items)
        else:  # a copy, not a view: topk_items may then mask it in place
            dense = as_tensor(self._item_prior).expand(b, -1).clone()
        dense.view(-1).index_add_(0, torch.from_numpy(users * self.num_items + items), torch.from_numpy(scores))
        return dense

    # -------------------------------------------------------------------------------- sizes

    @property
    def num_codes(self) -> int:
        return int(len(self._code_ids))

    @property
    def num_codebooks(self) -> int:
        return int(self._codes.shape[1])

    @property
    def dim(self) -> int:
        return int(self._code_vectors.shape[1])

    @property
    def nnz(self) -> int:
        return int(len(self._items))

    @property
    def kept_fraction(self) -> float:
        """Share of the code x item score table that is stored: nnz / (C * num_items)."""
        return self.nnz / (self.num_codes * self.num_items)

    def posting(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores) of code row ``row``, items ascending (for inspection and tests)."""
        lo, hi = self._indptr[row], self._indptr[row + 1]
        return np.asarray(self._items[lo:hi]), np.asarray(self._scores[lo:hi])

    # -------------------------------------------------------------------------------- protocol

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "indptr": self._indptr,
            "items": self._items,
            "scores": self._scores,
            "code_ids": self._code_ids,
            "codes": self._codes,
            "code_vectors": self._code_vectors,
        }
        if self._item_prior is not None:
            arrays["item_prior"] = self._item_prior
        if self._code_usage is not None:
            arrays["code_usage"] = self._code_usage
        return arrays

    def meta(self) -> dict[str, Any]:
        return {
            "num_items": self.num_items,
            "codebook_size": self.codebook_size,
            "num_codebooks": self.num_codebooks,
            "dim": self.dim,
            "codes_indexed": self.num_codes,
            "nnz": self.nnz,
            "kept_fraction": self.kept_fraction,
            "keep": self.keep,
            "item_prior": self._item_prior is not None,
            "code_usage": self._code_usage is not None,
        }

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["code_space_covered"] = self.num_codes / self.codebook_size**self.num_codebooks
        return info

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> SparseCodeIndex:
        index = cls(
            arrays["indptr"], arrays["items"], arrays["scores"], arrays["code_ids"], arrays["codes"],
            arrays["code_vectors"], meta["num_items"], meta["codebook_size"], meta.get("keep", "nonzero"),
            arrays.get("item_prior"), arrays.get("code_usage"),
        )
        for optional in ("item_prior", "code_usage"):
            if meta.get(optional, False) != (optional in arrays):
                raise ValueError(f"the header and the arrays disagree on whether there is a {optional}")
        if index.nnz != meta["nnz"] or index.num_codes != meta["codes_indexed"]:
            raise ValueError("array sizes disagree with the header")
        return index


# ------------------------------------------------------------------------------------ helpers


def _sparse_topk(
    users: np.ndarray, items: np.ndarray, scores: np.ndarray, b: int, num_items: int, exclude: Ragged, k: int,
    item_prior: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k over the candidate items only, or None when some user has fewer than ``k`` of
    them left after exclusion (its list would continue with items scored by the prior or 0; the
    dense path handles that). Sums start from the item's prior and are added in the same order
    as the dense path, so scores are identical, and equal scores rank by lower item index, as in
    evaluation."""
    keys = torch.from_numpy(users * num_items + items)
    unique, inverse = torch.unique(keys, return_inverse=True)
    unique = unique.numpy()
    if item_prior is None:
        start = torch.zeros(len(unique))
    else:
        start = torch.from_numpy(np.asarray(item_prior)[unique % num_items])
    sums = start.index_add_(0, inverse, torch.from_numpy(scores)).numpy()
    keep = ~np.isin(unique, exclude.pair_keys(num_items))
    unique, sums = unique[keep], sums[keep]
    user, item = unique // num_items, unique % num_items
    if (np.bincount(user, minlength=b) < k).any():
        return None
    order = np.lexsort((item, -sums, user))  # by user, then score descending, then item
    counts = np.bincount(user, minlength=b)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = (first[:, None] + np.arange(k)[None, :]).reshape(-1)
    chosen = order[take]
    return torch.from_numpy(sums[chosen].reshape(b, k)), torch.from_numpy(item[chosen].reshape(b, k))


def top_k_positions(sums: np.ndarray, k: int, ties: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` largest ``sums`` (``len(sums) >= k``), by score descending, equal
    scores by ascending ``ties`` (default: the position itself, for sums laid out by item id):
    everything above the k-th value, then the lowest-tied of the entries equal to it; only those
    k are sorted."""
    ties = np.arange(len(sums)) if ties is None else ties
    if len(sums) > k:
        kth = np.partition(sums, len(sums) - k)[len(sums) - k]
        above = np.flatnonzero(sums > kth)
        equal = np.flatnonzero(sums == kth)
        if len(equal) > k - len(above):
            equal = equal[np.argsort(ties[equal], kind="stable")[: k - len(above)]]
        chosen = np.concatenate([above, equal])
    else:
        chosen = np.arange(len(sums))
    return chosen[np.lexsort((ties[chosen], -sums[chosen]))]


class _OneQueryScratch(threading.local):
    """Catalogue-sized work arrays for one-query search, one pair per thread, reused by every call.

    A single query's candidates are the few thousand entries of its posting lists; finding the
    distinct ones with a sort (``torch.unique``) was the largest cost of a batch-1 search. Here a
    slot array marks one occurrence per item and a score array sums in place, so a query costs
    its posting lists, not a sort or a catalogue-sized allocation (the arrays are allocated once
    per thread and only the touched entries are ever read). Per thread because a service answers
    requests from a thread pool.
    """

    def __init__(self) -> None:
        self.slot = np.empty(0, dtype=np.int64)
        self.sums = np.empty(0, dtype=np.float32)

    def topk(
        self, items: np.ndarray, scores: np.ndarray, num_items: int, excluded: np.ndarray, k: int,
        item_prior: np.ndarray | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What :func:`_sparse_topk` returns for one query (the same float32 sums, added in the
        same order from the item's prior, and the same tie rule), or None when fewer than ``k``
        candidates are left after ``excluded``."""
        if len(self.slot) != num_items:
            self.slot = np.empty(num_items, dtype=np.int64)
            self.sums = np.empty(num_items, dtype=np.float32)
        position = np.arange(len(items))
        self.slot[items] = position  # of repeated items one write survives, whichever it is
        candidates = items[self.slot[items] == position]  # so exactly one entry per distinct item
        self.sums[candidates] = 0.0 if item_prior is None else item_prior[candidates]
        torch.from_numpy(self.sums).index_add_(0, torch.from_numpy(items), torch.from_numpy(scores))
        sums = self.sums[candidates]
        if len(excluded):
            keep = ~np.isin(candidates, excluded)
            candidates, sums = candidates[keep], sums[keep]
        if len(candidates) < k:
            return None
        chosen = top_k_positions(sums, k, ties=candidates)
        return torch.from_numpy(sums[chosen][None]), torch.from_numpy(candidates[chosen][None])


def _block_scorer(dense: torch.Tensor) -> Callable[[np.ndarray, int, int], torch.Tensor]:
    """A ``topk_items`` scorer over an accumulated block (handed over whole when asked whole)."""

    def scorer(rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        if len(rows) == dense.shape[0] and start == 0 and stop == dense.shape[1]:
            return dense  # fresh and ours: topk_items may mask it in place
        return dense[torch.from_numpy(rows), start:stop]

    return scorer
