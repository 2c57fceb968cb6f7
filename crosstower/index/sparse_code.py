"""SparCode's inverted index: per query code, a posting list of (item, precomputed score).

SparCode scores a user as ``sum_k E(code_k(user), item)``: every user token is quantised to a code
tuple of M entries from codebooks of size N, and the all-to-all encoder ``E`` depends on the user
only through that code. So ``E`` can be run offline for every code that can occur, and serving
is a lookup: read the posting lists of the user's K_u codes, add the scores per item, take the
top-k. The encoder's scores pass through ReLU, so most are exactly 0 and need not be stored;
keeping only the positive (or the top-L) scores is what makes the table small.

Storage, one CSR table sorted by code id (see :func:`encode_code_ids`):

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
  It lets a size budget be shared among the codes by use (:class:`UsageBudget`).

Score semantics at search time: an item absent from all of a user's posting lists scores exactly
its prior (0 without one), not -inf. That is the true (kept) score, since dropped entries are
those at or below the keep rule and ReLU makes the rest 0; it also means such items still fill
the top-k (by prior, then in ascending item order, the evaluation tie rule) rather than leaving
holes. Excluded items score -inf, as in evaluation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.evaluate.ranking import topk_items
from crosstower.index.base import Index, Timer, as_numpy, as_tensor, check_exclude

ScoreCodes = Callable[[torch.Tensor], torch.Tensor]
"""``score_codes(codes [c, M] int64) -> scores [c, num_items]``: the encoder run on whole codes."""


@dataclass(frozen=True)
class UsageBudget:
    """Keep about ``share`` of the (code x item) table, shared among the codes by their use.

    Code ``c`` keeps its top ``L_c = floor(share * C * N * w_c / sum(w))`` positive scores, with
    ``w_c = usage_c ** exponent`` (``usage_c``: how many indexing tokens took code ``c``). Why:
    a uniform top-L gives a code that one token took as long a posting list as a code that
    thousands took, while the served accuracy is an average over users. Measured on the synthetic
    default (docs/results.md), at 1% kept, exponent 0.5 served a clearly higher Recall@50 than
    the uniform top-L. Exponent 0 is the uniform top-L (``L = floor(share * N)``); the kept share
    never exceeds ``share`` (the floors and the cap at ``N`` may leave it a little under).
    """

    share: float
    exponent: float = 0.5

    def as_dict(self) -> dict[str, float]:
        return {"share": self.share, "usage_exponent": self.exponent}


Keep = Union[str, int, float, UsageBudget, Mapping[str, float]]
"""``"nonzero"`` (scores > 0), an int L (top-L positive scores per code), a float t >= 0
(scores > t), or a :class:`UsageBudget` (also as its ``as_dict()`` mapping, as saved)."""


class KeepRule(NamedTuple):
    """A parsed keep rule: ``mode`` is "threshold" (``value`` t), "top" (``value`` L) or
    "budget" (``value`` the share, ``exponent`` the usage exponent)."""

    mode: str
    value: float
    exponent: float = 0.0


FLOAT16_MAX = float(np.finfo(np.float16).max)

# Dense accumulation block: users per block x catalogue <= 2^24 floats (64 MB of float32).
DENSE_BLOCK = 1 << 24
# Nearest-code fallback block: unseen tokens per block x indexed codes <= 2^22 floats.
NEAREST_BLOCK = 1 << 22


class CodeQueries(NamedTuple):
    """What a SparCode user looks like to the index: its K_u code tuples and token vectors.

    ``vectors`` (the quantised or pre-quantisation token vectors) is only read for codes that were
    not indexed; it may be ``None`` when every code of the query is known to be indexed. A code
    tuple of -1 entries is a token the user does not have (a history slot without an item, for a
    tokenizer with one token per history item): it reads no posting list.
    """

    codes: torch.Tensor  # int64 [B, K_u, M]
    vectors: torch.Tensor | None  # float [B, K_u, D]


# ------------------------------------------------------------------------------------ codes


def encode_code_ids(codes: np.ndarray | torch.Tensor, codebook_size: int) -> np.ndarray:
    """One int64 per code tuple: ``sum_m codes[m] * N^(M-1-m)`` (mixed radix, first entry most
    significant), so sorting ids sorts tuples lexicographically and all ``N^M`` tuples map to
    ``0 .. N^M - 1``."""
    codes = np.asarray(codes, dtype=np.int64)
    ids = np.zeros(codes.shape[:-1], dtype=np.int64)
    for m in range(codes.shape[-1]):  # M is a handful of codebooks
        ids = ids * codebook_size + codes[..., m]
    return ids


def every_code(codebook_size: int, num_codebooks: int) -> torch.Tensor:
    """All ``N^M`` code tuples ``[N^M, M]`` in id order (row ``j`` has id ``j`` under
    :func:`encode_code_ids`): what indexing the whole code space scores."""
    return torch.cartesian_prod(*[torch.arange(codebook_size)] * num_codebooks).reshape(-1, num_codebooks)


ABSENT_ROW = -1
"""The index row of an absent token (a query code tuple of -1 entries): an empty posting list."""


def _check_codes(
    codes: np.ndarray | torch.Tensor, codebook_size: int, what: str, absent: bool = False
) -> np.ndarray:
    """Codes as int64 with every entry in ``[0, N)`` and ``N^M`` representable in int64."""
    codes = as_numpy(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got {codes.dtype}")
    codes = codes.astype(np.int64, copy=False)
    if codes.ndim < 2 or codes.shape[-1] < 1:
        raise ValueError(f"{what} must end in a code-tuple axis of length M >= 1, got shape {codes.shape}")
    if codebook_size < 1 or codebook_size ** codes.shape[-1] >= 2**63:
        raise ValueError(f"codebook_size={codebook_size} with M={codes.shape[-1]} does not fit int64 ids")
    present = codes
    if absent and codes.size:  # absent tokens are whole tuples of -1; a partial -1 is an error
        present = codes[~(codes == -1).all(-1)]
    if present.size and (present.min() < 0 or present.max() >= codebook_size):
        raise ValueError(f"{what} hold entries outside [0, {codebook_size}): min {present.min()}, max {present.max()}")
    return codes


def _parse_keep(keep: Keep) -> KeepRule:
    """The rule ``keep`` names; ``"nonzero"`` is the threshold 0."""
    what = "keep must be 'nonzero', an int L, a float threshold or a usage budget"
    if isinstance(keep, Mapping):
        if set(keep) != {"share", "usage_exponent"}:
            raise ValueError(f"{what}: a budget mapping needs exactly 'share' and 'usage_exponent', got {sorted(keep)}")
        keep = UsageBudget(float(keep["share"]), float(keep["usage_exponent"]))
    if isinstance(keep, UsageBudget):
        if not 0 < keep.share <= 1 or not 0 <= keep.exponent < math.inf:
            raise ValueError(f"a usage budget needs 0 < share <= 1 and a finite exponent >= 0, got {keep}")
        return KeepRule("budget", float(keep.share), float(keep.exponent))
    if isinstance(keep, str):
        if keep != "nonzero":
            raise ValueError(f"{what}, got '{keep}'")
        return KeepRule("threshold", 0.0)
    if isinstance(keep, bool):
        raise ValueError(f"{what}, got a bool")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep=L needs L >= 1, got {keep}")
        return KeepRule("top", int(keep))
    if isinstance(keep, numbers.Real):
        # A negative threshold would store negative scores, which would then rank below the
        # implicit 0 of the items that are not stored: the index would contradict itself.
        if not math.isfinite(keep) or keep < 0:
            raise ValueError(f"keep threshold must be finite and >= 0, got {keep}")
        return KeepRule("threshold", float(keep))
    raise ValueError(f"{what}, got {type(keep).__name__}")


def _canonical_keep(keep: Keep) -> Keep:
    """``keep`` in a JSON-friendly form (no numpy scalars; a budget as a mapping), as
    ``meta()["keep"]`` holds it."""
    rule = _parse_keep(keep)
    if isinstance(keep, str):
        return keep
    if rule.mode == "budget":
        return UsageBudget(rule.value, rule.exponent).as_dict()
    return int(rule.value) if rule.mode == "top" else rule.value


def usage_allocation(usage: np.ndarray, share: float, exponent: float, num_items: int) -> np.ndarray:
    """Entries per code under a :class:`UsageBudget`: ``floor(share * C * N * w_c / sum(w))`` with
    ``w = usage ** exponent``, at most ``N`` (int64 ``[C]``)."""
    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 1 or len(usage) == 0 or (usage < 0).any():
        raise ValueError(f"code usage must be a non-empty vector of counts >= 0, got shape {usage.shape}")
    weights = usage**exponent
    if weights.sum() <= 0:
        raise ValueError("a usage budget needs some code with usage > 0")
    budget = share * len(usage) * num_items
    # The small tolerance keeps an exact product (e.g. 0.01 * 3000 = 30) from flooring to 29.
    return np.minimum(np.floor(budget * weights / weights.sum() + 1e-9), num_items).astype(np.int64)


# ------------------------------------------------------------------------------------ build


def _top_l(scores: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest entries per row, ties at the boundary going to the lower item index.

    ``torch.topk`` picks arbitrarily among ties; taking one extra value shows which rows have a
    tie at the boundary that matters (a positive one), and only those pay for a stable sort.
    """
    width = scores.shape[1]
    if top >= width:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    vals, cols = torch.topk(scores, top + 1, dim=1, sorted=True)
    tied = ((vals[:, top] == vals[:, top - 1]) & (vals[:, top - 1] > 0)).nonzero().flatten()
    vals, cols = vals[:, :top].clone(), cols[:, :top].clone()
    if len(tied):
        tvals, tcols = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        vals[tied], cols[tied] = tvals[:, :top], tcols[:, :top]
    return vals, cols


def _keep_entries(scores: torch.Tensor, rule: KeepRule, limits: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Kept entries of a chunk of code rows as (counts per row, items, scores) in CSR order.

    Under "top" and "budget" row ``r`` keeps its ``limits[r]`` best positive scores
    (:func:`_row_limits`); a threshold needs no limits."""
    if rule.mode == "threshold":
        rows, cols = (scores > rule.value).nonzero(as_tuple=True)  # row-major: rows, then items, ascending
        vals = scores[rows, cols]
    else:
        width = scores.shape[1]
        per_row = torch.from_numpy(limits)
        top = int(per_row.max()) if len(per_row) else 0
        if top == 0:
            vals, cols = scores[:, :0], torch.zeros(scores.shape[0], 0, dtype=torch.int64)
        else:
            vals, cols = _top_l(scores, top)
        kept = (vals > 0) & (torch.arange(vals.shape[1]) < per_row.unsqueeze(1))
        cols = torch.where(kept, cols, width)  # dropped entries sort last, then are cut
        cols, order = torch.sort(cols, dim=1)
        vals = vals.gather(1, order)
        rows, pos = (cols < width).nonzero(as_tuple=True)
        cols, vals = cols[rows, pos], vals[rows, pos]
    counts = torch.bincount(rows, minlength=scores.shape[0])
    if len(vals) and float(vals.max()) > FLOAT16_MAX:
        raise ValueError(f"a kept score {float(vals.max()):.4g} exceeds the float16 range ({FLOAT16_MAX}); "
                         "rescale the scores")
    return counts.numpy().astype(np.int64), cols.numpy().astype(np.int32), vals.numpy().astype(np.float16)


def _score_and_keep(
    score_codes: ScoreCodes, codes: np.ndarray, num_items: int, rule: KeepRule, limits: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the encoder on one chunk of codes and keep its entries (one unit of build work)."""
    with torch.no_grad():
        scores = score_codes(torch.from_numpy(codes))
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float32)
    if tuple(scores.shape) != (len(codes), num_items):
        raise ValueError(f"score_codes returned shape {tuple(scores.shape)} for {len(codes)} codes; "
                         f"expected {(len(codes), num_items)}")
    if torch.isnan(scores).any():
        raise ValueError("score_codes returned NaN scores")
    return _keep_entries(scores, rule, limits)


_WORKER_SCORER: ScoreCodes | None = None


def _init_worker(score_codes: ScoreCodes, threads: int) -> None:
    """Receive the encoder once per worker process (not once per chunk) and share the cores."""
    global _WORKER_SCORER
    _WORKER_SCORER = score_codes
    torch.set_num_threads(threads)


def _worker_chunk(work: tuple[np.ndarray, np.ndarray | None], num_items: int, rule: KeepRule) -> tuple[np.ndarray, ...]:
    assert _WORKER_SCORER is not None
    codes, limits = work
    return _score_and_keep(_WORKER_SCORER, codes, num_items, rule, limits)


def _chunk_results(
    score_codes: ScoreCodes, codes: np.ndarray, num_items: int, rule: KeepRule, limits: np.ndarray | None,
    code_chunk: int, workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per code chunk, in code order: in this process, or in ``workers`` spawned processes."""
    chunks = [
        (codes[lo : lo + code_chunk], None if limits is None else limits[lo : lo + code_chunk])
        for lo in range(0, len(codes), code_chunk)
    ]
    if workers <= 1:
        for chunk, chunk_limits in chunks:
            yield _score_and_keep(score_codes, chunk, num_items, rule, chunk_limits)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    threads = max(1, torch.get_num_threads() // workers)
    # "spawn": fork is unsafe once torch (OpenMP, CUDA) threads exist in the parent.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(score_codes, threads),
    ) as pool:
        yield from pool.map(partial(_worker_chunk, num_items=num_items, rule=rule), chunks)


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
        self.keep: Keep = _canonical_keep(keep)
        self._item_prior = None if item_prior is None else np.asanyarray(item_prior, dtype=np.float32)
        self._code_usage = None if code_usage is None else np.asanyarray(code_usage, dtype=np.int64)
        self._prior_order: np.ndarray | None = None  # items by descending prior, computed on demand
        self._nearest_cache: tuple[torch.Tensor, torch.Tensor] | None = None
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
        :class:`UsageBudget` needs it, and the index keeps it for later pruning.
        """
        if code_chunk < 1 or workers < 1 or num_items < 1:
            raise ValueError(f"need code_chunk, workers, num_items >= 1, got {code_chunk}, {workers}, {num_items}")
        with Timer() as timer:
            codes_np, vectors, ids, order = _sorted_codes(codes, code_vectors, codebook_size)
            usage = None if code_usage is None else as_numpy(code_usage, np.int64)
            if usage is not None:
                if usage.shape != (len(codes_np),):
                    raise ValueError(f"code_usage must be [{len(codes_np)}], got shape {usage.shape}")
                usage = usage[order]
            rule = _parse_keep(keep)
            limits = _row_limits(rule, usage, num_items, len(codes_np))
            counts, items, scores = _collect(
                _chunk_results(score_codes, codes_np, num_items, rule, limits, code_chunk, workers),
                total=math.ceil(len(codes_np) / code_chunk), progress=progress,
            )
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            prior = None if item_prior is None else as_numpy(item_prior, np.float32)
            index = cls(indptr, items, scores, ids, codes_np, vectors, num_items, codebook_size, keep, prior, usage)
        index.build_seconds = timer.seconds
        return index

    def pruned(self, keep: Keep) -> SparseCodeIndex:
        """A sparser index from this one's stored entries: the top-L per code, the scores above a
        threshold, or a :class:`UsageBudget` (which needs ``code_usage``); ties at the boundary go
        to the lower item index (as in :meth:`build`).

        This is how the accuracy / size trade-off is measured without running the encoder again;
        it equals building with ``keep`` whenever this index kept every entry the new rule keeps
        (e.g. it was built with ``"nonzero"``), up to the float16 rounding of the stored scores.
        """
        rule = _parse_keep(keep)
        rows = np.repeat(np.arange(self.num_codes), np.diff(self._indptr))
        scores = np.asarray(self._scores)
        if rule.mode == "threshold":
            kept = np.flatnonzero(scores > rule.value)
        else:
            limits = _row_limits(rule, self._code_usage, self.num_items, self.num_codes)
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
        codes_np = _check_codes(codes, self.codebook_size, "codes")
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
        codes_np = _check_codes(codes, self.codebook_size, "query codes", absent=True)
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


def _sorted_codes(
    codes: torch.Tensor | np.ndarray, code_vectors: torch.Tensor | np.ndarray, codebook_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes, vectors and ids sorted by code id, and the sorting order; a repeated code tuple is
    a ValueError, since two rows for one code would make the index double-count or pick one
    arbitrarily."""
    codes_np = _check_codes(codes, codebook_size, "codes")
    if codes_np.ndim != 2 or len(codes_np) == 0:
        raise ValueError(f"codes must be a non-empty [C, M] matrix, got shape {codes_np.shape}")
    vectors = as_numpy(code_vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) != len(codes_np):
        raise ValueError(f"code_vectors must be [{len(codes_np)}, D], got shape {vectors.shape}")
    ids = encode_code_ids(codes_np, codebook_size)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if len(dup):
        raise ValueError(f"codes holds {len(dup)} repeated code tuples, e.g. {codes_np[order[dup[0]]].tolist()}")
    return codes_np[order], vectors[order], ids, order


def _row_limits(rule: KeepRule, usage: np.ndarray | None, num_items: int, num_codes: int) -> np.ndarray | None:
    """Entries each code row may keep under a "top" or "budget" rule (None for a threshold)."""
    if rule.mode == "threshold":
        return None
    if rule.mode == "top":
        return np.full(num_codes, int(rule.value), dtype=np.int64)
    if usage is None:
        raise ValueError("a usage budget needs the codes' usage (code_usage), and this index has none")
    return usage_allocation(usage, rule.value, rule.exponent, num_items)


def _collect(
    results: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], total: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-chunk (counts, items, scores), with a progress bar over chunks."""
    from tqdm.auto import tqdm

    parts = list(tqdm(results, total=total, desc="indexing codes", unit="chunk", disable=None if progress else True))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


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


def _block_scorer(dense: torch.Tensor) -> Callable[[np.ndarray, int, int], torch.Tensor]:
    """A ``topk_items`` scorer over an accumulated block (handed over whole when asked whole)."""

    def scorer(rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        if len(rows) == dense.shape[0] and start == 0 and stop == dense.shape[1]:
            return dense  # fresh and ours: topk_items may mask it in place
        return dense[torch.from_numpy(rows), start:stop]

    return scorer
