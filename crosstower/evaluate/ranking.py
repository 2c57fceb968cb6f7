"""Exact full-ranking evaluation: every user is ranked against the whole catalogue.

Scores are produced chunk by chunk (users x items) so that catalogues of millions of items never
materialise a full score matrix. A running top-K is merged across item chunks; ties are broken in
favour of the lower item index at every step, so the ranking (and therefore every metric) is the
same for any ``user_batch`` / ``item_chunk``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.errors import DataError

Scorer = Callable[[np.ndarray, int, int], torch.Tensor]
"""``scorer(rows, start, stop)`` -> float scores ``[len(rows), stop - start]``.

``rows`` are positions of evaluation users (0 .. num_users-1); columns are items start..stop-1.
The returned tensor is masked in place unless it is a view, so return a fresh tensor when you can
(a matmul result is fresh) to spare a copy.
"""

METRICS = ("recall", "ndcg", "precision", "hitrate", "mrr")

# A 256 x 65536 score block is 64 MB of float32: large enough that the matmul and top-k kernels
# dominate the Python overhead, small enough for any machine. On 2 CPU cores
# (benchmarks/bench_evaluate.py) blocks from 32 x 65536 to 1000 x 65536 all time within noise.
DEFAULT_USER_BATCH = 256
DEFAULT_ITEM_CHUNK = 65536


# --------------------------------------------------------------------------------------------
# validation


def _check_ragged(name: str, table: Ragged, num_users: int, num_items: int) -> None:
    """Fail early with a readable message instead of an index error deep inside a chunk."""
    if table.num_rows != num_users:
        raise ValueError(f"{name} has {table.num_rows} rows, expected num_users={num_users}")
    values = np.asarray(table.values)
    if values.size and (values.min() < 0 or values.max() >= num_items):
        raise ValueError(
            f"{name} holds item ids outside [0, {num_items}): "
            f"min {values.min()}, max {values.max()}"
        )


def _check_sizes(num_users: int, num_items: int, k: int, user_batch: int, item_chunk: int) -> None:
    if num_users < 0 or num_items < 1:
        raise ValueError(f"need num_users >= 0 and num_items >= 1, got {num_users}, {num_items}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if user_batch < 1 or item_chunk < 1:
        raise ValueError(f"user_batch and item_chunk must be >= 1, got {user_batch}, {item_chunk}")


# --------------------------------------------------------------------------------------------
# exclusion masks


class _BatchExclusions:
    """The excluded (local row, item) pairs of one user batch, sorted by item.

    Sorting once per batch lets every item chunk find its own pairs with two binary searches
    instead of scanning all pairs of the batch.
    """

    def __init__(self, exclude: Ragged, rows: np.ndarray) -> None:
        sub = exclude.take(rows)
        local = np.repeat(np.arange(len(rows), dtype=np.int64), sub.lengths)
        items = np.asarray(sub.values, dtype=np.int64)
        order = np.argsort(items, kind="stable")
        self.items = items[order]
        self.local = local[order]
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(self, scores: torch.Tensor, start: int, stop: int) -> None:
        """Set the excluded entries of the chunk ``[start, stop)`` to -inf, in place."""
        lo, hi = np.searchsorted(self.items, [start, stop])
        if lo == hi:
            return
        local, items = self._on(scores.device)
        scores[local[lo:hi], items[lo:hi] - start] = -math.inf

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = (
                torch.from_numpy(self.local).to(device),
                torch.from_numpy(self.items).to(device),
            )
        return self._cache[device]


# --------------------------------------------------------------------------------------------
# top-k with deterministic ties


def _check_nan(scores: torch.Tensor) -> None:
    if torch.isnan(scores).any():
        raise ValueError("the scorer returned NaN scores")


def _chunk_candidates(scores: torch.Tensor, start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` of one chunk as (scores, item ids), equal scores in ascending item order.

    ``torch.topk`` is fast but picks arbitrarily among ties at the k-th place. Taking k+1 values
    tells which rows have such a boundary tie; only those rows pay for a full stable sort.
    """
    b, width = scores.shape
    if width <= k:  # the whole chunk is a candidate, already in index order
        _check_nan(scores)
        cols = torch.arange(width, device=scores.device).expand(b, width)
        return scores, cols + start
    vals, cols = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True)
    _check_nan(vals)  # topk ranks NaN above everything, so any NaN of a row shows up here
    tied = (vals[:, k] == vals[:, k - 1]).nonzero().flatten()
    vals, cols = vals[:, :k], cols[:, :k]
    if len(tied):
        vals, cols = vals.clone(), cols.clone()
        tvals, tcols = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        vals[tied], cols[tied] = tvals[:, :k], tcols[:, :k]
    # Inside the candidate set, put equal scores in index order: the merge's stable sort keeps it.
    cols, order = torch.sort(cols, dim=1)
    return vals.gather(1, order), cols + start


def _merge(
    run_vals: torch.Tensor, run_items: torch.Tensor, vals: torch.Tensor, items: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the running top-k (lower item ids) with a later chunk's candidates.

    The running candidates come first and the sort is stable, so among equal scores the lower
    item index wins, exactly as one global stable sort would decide.
    """
    all_vals = torch.cat([run_vals, vals], dim=1)
    all_items = torch.cat([run_items, items], dim=1)
    all_vals, order = torch.sort(all_vals, dim=1, descending=True, stable=True)
    return all_vals[:, :k], all_items.gather(1, order[:, :k])


def _score_chunk(scorer: Scorer, rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Call the scorer and check its output, copying it only when masking would alter a view."""
    scores = scorer(rows, start, stop)
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if tuple(scores.shape) != (len(rows), stop - start):
        raise ValueError(
            f"scorer returned shape {tuple(scores.shape)} for {len(rows)} users and items "
            f"{start}..{stop - 1}; expected {(len(rows), stop - start)}"
        )
    if not scores.is_floating_point():
        return scores.float()
    if scores._base is not None or not scores.is_contiguous():
        return scores.clone()
    return scores


def _batch_topk(
    scorer: Scorer,
    rows: np.ndarray,
    num_items: int,
    exclusions: _BatchExclusions,
    k: int,
    item_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one user batch over all items, padded to width k with (-inf, -1)."""
    run_vals: torch.Tensor | None = None
    run_items: torch.Tensor | None = None
    for start in range(0, num_items, item_chunk):
        stop = min(start + item_chunk, num_items)
        scores = _score_chunk(scorer, rows, start, stop)
        exclusions.apply(scores, start, stop)
        vals, items = _chunk_candidates(scores, start, k)
        if run_vals is None or run_items is None:  # merging with nothing sorts the first chunk
            run_vals, run_items = vals[:, :0], items[:, :0]
        run_vals, run_items = _merge(run_vals, run_items, vals, items, k)
    assert run_vals is not None and run_items is not None  # num_items >= 1
    if run_vals.shape[1] < k:  # catalogue smaller than k
        pad = k - run_vals.shape[1]
        run_vals = torch.nn.functional.pad(run_vals, (0, pad), value=-math.inf)
        run_items = torch.nn.functional.pad(run_items, (0, pad), value=-1)
    return run_vals, run_items.to(torch.int64)


def _iter_topk(
    scorer: Scorer,
    rows: np.ndarray,
    num_items: int,
    exclude: Ragged,
    k: int,
    user_batch: int,
    item_chunk: int,
    progress: bool,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield (rows, top-k scores, top-k items) per user batch of ``rows``."""
    starts = range(0, len(rows), user_batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="ranking", unit="batch", disable=None)
    with torch.no_grad():
        for lo in starts:
            batch = rows[lo : lo + user_batch]
            exclusions = _BatchExclusions(exclude, batch)
            vals, items = _batch_topk(scorer, batch, num_items, exclusions, k, item_chunk)
            yield batch, vals, items


def topk_items(
    scorer: Scorer,
    num_users: int,
    num_items: int,
    exclude: Ragged,
    k: int,
    user_batch: int = DEFAULT_USER_BATCH,
    item_chunk: int = DEFAULT_ITEM_CHUNK,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` items of every user over the full catalogue, excluded items removed.

    Returns ``(scores [num_users, k], items [num_users, k] int64)`` sorted by descending score,
    ties broken by lower item index. Excluded items score -inf, so they only appear (after every
    other item) when fewer than ``k`` items remain; slots beyond the catalogue hold item -1.
    """
    _check_sizes(num_users, num_items, k, user_batch, item_chunk)
    _check_ragged("exclude", exclude, num_users, num_items)
    rows = np.arange(num_users, dtype=np.int64)
    parts = list(_iter_topk(scorer, rows, num_items, exclude, k, user_batch, item_chunk, progress))
    if not parts:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.int64)
    return torch.cat([p[1].cpu() for p in parts]), torch.cat([p[2].cpu() for p in parts])


# --------------------------------------------------------------------------------------------
# metrics


def _clean_targets(targets: Ragged, exclude: Ragged, num_items: int) -> np.ndarray:
    """Sorted unique keys ``row * num_items + item`` of the targets that are not excluded.

    One flat sorted array makes hit counting a single binary search for the whole batch.
    """
    t_keys = np.unique(targets.pair_keys(num_items))
    return t_keys[~np.isin(t_keys, exclude.pair_keys(num_items))]


def _hits(keys: np.ndarray, rows: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """Boolean ``[len(rows), k]``: is the ranked item a (clean) target of its user."""
    query = rows[:, None] * num_items + items
    if len(keys) == 0:
        return np.zeros(query.shape, dtype=bool)
    pos = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    return (keys[pos] == query) & (items >= 0)


def _metrics_at(hits: np.ndarray, num_targets: np.ndarray, k: int) -> dict[str, float]:
    """All metrics at cut-off ``k`` from the hit matrix of the users that have targets."""
    h = hits[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    n_hit = h.sum(axis=1).astype(np.float64)
    dcg = (h * discount).sum(axis=1)
    idcg = np.cumsum(discount)[np.minimum(num_targets, k) - 1]
    first = h.argmax(axis=1)
    rr = np.where(n_hit > 0, 1.0 / (first + 1.0), 0.0)
    return {
        f"recall@{k}": float(np.mean(n_hit / num_targets)),
        f"ndcg@{k}": float(np.mean(dcg / idcg)),
        f"precision@{k}": float(np.mean(n_hit / k)),
        f"hitrate@{k}": float(np.mean(n_hit > 0)),
        f"mrr@{k}": float(np.mean(rr)),
    }


def evaluate_ranking(
    scorer: Scorer,
    num_users: int,
    num_items: int,
    exclude: Ragged,
    targets: Ragged,
    ks: Sequence[int] = (20, 50),
    user_batch: int = DEFAULT_USER_BATCH,
    item_chunk: int = DEFAULT_ITEM_CHUNK,
    progress: bool = False,
) -> dict[str, float]:
    """Full-ranking Recall, NDCG, Precision, HitRate and MRR at every cut-off in ``ks``.

    Targets are a set per user (duplicates dropped, excluded targets ignored). Metrics average over
    users with at least one remaining target; only those users are scored at all. The returned
    ``"num_users"`` counts them. Hits are integers and the averages are taken once over all users
    at the end, so the result is bit-identical for any ``user_batch`` / ``item_chunk``.
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must name at least one cut-off")
    k_max = max(ks)
    _check_sizes(num_users, num_items, min(ks), user_batch, item_chunk)
    _check_ragged("exclude", exclude, num_users, num_items)
    _check_ragged("targets", targets, num_users, num_items)

    keys, counts, rows = _evaluated_users(targets, exclude, num_users, num_items)
    hits = np.zeros((len(rows), k_max), dtype=bool)
    done = 0
    for batch, _, items in _iter_topk(
        scorer, rows, num_items, exclude, k_max, user_batch, item_chunk, progress
    ):
        hits[done : done + len(batch)] = _hits(keys, batch, items.cpu().numpy(), num_items)
        done += len(batch)
    return _summary(hits, counts[rows], ks)


def evaluate_retrieved(
    retrieve: Callable[[np.ndarray], torch.Tensor],
    num_users: int,
    num_items: int,
    exclude: Ragged,
    targets: Ragged,
    ks: Sequence[int] = (20, 50),
    user_batch: int = DEFAULT_USER_BATCH,
) -> dict[str, float]:
    """The metrics of :func:`evaluate_ranking` for top-k lists that an index returns.

    ``retrieve(rows)`` gives the ranked items ``[len(rows), max(ks)]`` of those users (item -1 for
    an empty slot, which never counts as a hit), e.g. from an approximate index whose candidates
    are not the whole catalogue. Same target cleaning, same users, same averages.
    """
    ks = [int(k) for k in ks]
    _check_ragged("exclude", exclude, num_users, num_items)
    _check_ragged("targets", targets, num_users, num_items)
    keys, counts, rows = _evaluated_users(targets, exclude, num_users, num_items)
    hits = np.concatenate([
        _hits(keys, batch, np.asarray(retrieve(batch))[:, : max(ks)], num_items)
        for batch in np.array_split(rows, -(-len(rows) // user_batch))
    ])
    return _summary(hits, counts[rows], ks)


def _evaluated_users(
    targets: Ragged, exclude: Ragged, num_users: int, num_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clean target keys, targets per user, and the users that have any (the evaluated ones)."""
    keys = _clean_targets(targets, exclude, num_items)
    counts = np.bincount(keys // num_items, minlength=num_users)
    rows = np.flatnonzero(counts > 0).astype(np.int64)
    if len(rows) == 0:
        raise DataError("no evaluation user has a target left after removing excluded items")
    return keys, counts, rows


def _summary(hits: np.ndarray, num_targets: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    result: dict[str, float] = {}
    for k in ks:
        result.update(_metrics_at(hits, num_targets, k))
    result["num_users"] = len(num_targets)
    return result
