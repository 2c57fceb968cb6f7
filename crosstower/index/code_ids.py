"""The code codec of SparCode's index: code tuples as int64 ids, and what a query looks like.

SparCode quantises every user token to a code tuple of M entries from codebooks of size N. The
index stores one row per code tuple, sorted by a mixed-radix id (:func:`encode_code_ids`) that
sorts ids as tuples sort lexicographically; :func:`every_code` enumerates the whole code space,
and :class:`CodeQueries` is a batch of users as the index reads them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from crosstower.index.base import as_numpy


class CodeQueries(NamedTuple):
    """What a SparCode user looks like to the index: its K_u code tuples and token vectors.

    ``vectors`` (the quantised or pre-quantisation token vectors) is only read for codes that were
    not indexed; it may be ``None`` when every code of the query is known to be indexed. A code
    tuple of -1 entries is a token the user does not have (a history slot without an item, for a
    tokenizer with one token per history item): it reads no posting list.
    """

    codes: torch.Tensor  # int64 [B, K_u, M]
    vectors: torch.Tensor | None  # float [B, K_u, D]


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


def check_codes(
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
