"""Building a SparCode table: score chunks of codes with the encoder and keep their entries.

The all-to-all encoder ``E`` depends on the user only through a code, so it can be run offline
for every code that can occur. The codes are sorted by id, scored in chunks (in this process or
in spawned worker processes) and each chunk's kept entries (:mod:`crosstower.index.keep_rules`)
are concatenated into CSR order. Worker functions stay at module level so that spawned
processes can unpickle them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from crosstower.index.base import as_numpy
from crosstower.index.code_ids import check_codes, encode_code_ids
from crosstower.index.keep_rules import KeepRule, keep_entries

ScoreCodes = Callable[[torch.Tensor], torch.Tensor]
"""``score_codes(codes [c, M] int64) -> scores [c, num_items]``: the encoder run on whole codes."""


def sorted_codes(
    codes: torch.Tensor | np.ndarray, code_vectors: torch.Tensor | np.ndarray, codebook_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes, vectors and ids sorted by code id, and the sorting order; a repeated code tuple is
    a ValueError, since two rows for one code would make the index double-count or pick one
    arbitrarily."""
    codes_np = check_codes(codes, codebook_size, "codes")
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
    return keep_entries(scores, rule, limits)


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


def chunk_results(
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


def collect(
    results: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], total: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-chunk (counts, items, scores), with a progress bar over chunks."""
    from tqdm.auto import tqdm

    parts = list(tqdm(results, total=total, desc="indexing codes", unit="chunk", disable=None if progress else True))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]
