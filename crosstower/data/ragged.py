"""Ragged integer rows in CSR layout (per-user histories, targets, exclusions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """Rows of varying length: row ``r`` is ``values[indptr[r]:indptr[r + 1]]``."""

    indptr: np.ndarray  # int64 [num_rows + 1]
    values: np.ndarray  # int64 [nnz]

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row(self, r: int) -> np.ndarray:
        return self.values[self.indptr[r] : self.indptr[r + 1]]

    def pair_keys(self, width: int) -> np.ndarray:
        """``row * width + value`` for every entry: one int64 per (row, value) pair, so set
        operations over whole tables (dedup, exclusion) are single numpy calls."""
        rows = np.repeat(np.arange(self.num_rows, dtype=np.int64), self.lengths)
        return rows * width + np.asarray(self.values, dtype=np.int64)

    def take(self, rows: np.ndarray) -> "Ragged":
        """The sub-table of ``rows`` (vectorised; no Python loop over rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, lengths = self.indptr[rows], self.lengths[rows]
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        offsets = np.repeat(starts - indptr[:-1], lengths)
        return Ragged(indptr, self.values[np.arange(indptr[-1]) + offsets])

    def padded_tail(self, max_len: int, pad: int = -1) -> np.ndarray:
        """The last ``max_len`` values of every row, right-aligned, ``[num_rows, max_len]``."""
        out = np.full((self.num_rows, max_len), pad, dtype=np.int64)
        if max_len == 0:
            return out
        lengths = np.minimum(self.lengths, max_len)
        row = np.repeat(np.arange(self.num_rows), lengths)
        # position within the kept tail: 0 .. length-1, placed at max_len-length .. max_len-1
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        src = np.repeat(self.indptr[1:] - lengths, lengths) + within
        out[row, max_len - np.repeat(lengths, lengths) + within] = self.values[src]
        return out

    @staticmethod
    def from_groups(groups: np.ndarray, values: np.ndarray, num_rows: int) -> "Ragged":
        """Rows from (group, value) pairs already sorted by group (stable order within a group)."""
        counts = np.bincount(groups, minlength=num_rows)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Ragged(indptr, np.asarray(values, dtype=np.int64))

    @staticmethod
    def concat_rows(a: "Ragged", b: "Ragged") -> "Ragged":
        """Row-wise concatenation: row r is ``a.row(r)`` followed by ``b.row(r)``."""
        if a.num_rows != b.num_rows:
            raise ValueError("concat_rows needs the same number of rows")
        lengths = a.lengths + b.lengths
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.empty(indptr[-1], dtype=np.int64)
        a_pos = np.arange(a.indptr[-1]) + np.repeat(indptr[:-1] - a.indptr[:-1], a.lengths)
        b_pos = np.arange(b.indptr[-1]) + np.repeat(indptr[:-1] + a.lengths - b.indptr[:-1], b.lengths)
        values[a_pos] = a.values
        values[b_pos] = b.values
        return Ragged(indptr, values)

    def save(self, path_prefix: str) -> dict[str, np.ndarray]:
        return {f"{path_prefix}_indptr": self.indptr, f"{path_prefix}_values": self.values}
