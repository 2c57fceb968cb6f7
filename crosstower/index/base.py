"""The one protocol every index follows: search, save, load, nbytes, describe.

An index is a set of named numpy arrays (the served data structure) plus a few JSON scalars. That
single shape is what makes saving, loading, memory-mapping and byte accounting generic: a
subclass only says which arrays it serves (:meth:`Index.arrays`), which scalars describe it
(:meth:`Index.meta`) and how to rebuild itself from both (:meth:`Index.from_arrays`).

On disk an index is a folder: one ``NAME.npy`` per array and ``index.json`` naming the kind, the
scalars and each array's dtype and shape. The folder is written under a temporary name and
renamed into place, so an interrupted save never leaves a half-written index where a reader looks.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from crosstower.data.ragged import Ragged
from crosstower.errors import CheckpointError
from crosstower.files import replace_dir

HEADER = "index.json"
FORMAT = "crosstower-index"
VERSION = 1


class Index(ABC):
    """Base class of every index; subclasses register themselves under their ``kind``.

    ``Index.load(path)`` therefore opens any saved index without the caller knowing its class,
    while ``SomeIndex.load(path)`` additionally checks that the folder holds that kind.
    """

    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Index]]] = {}

    build_seconds: float = 0.0
    exact: ClassVar[bool] = False
    """Whether :meth:`search` returns exactly the exhaustive top-k of the model's scores (an
    approximate index may miss items, or round the scores it stores)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Index._registry[cls.kind] = cls

    # ---------------------------------------------------------------------------- the protocol

    @abstractmethod
    def search(
        self, queries: Any, k: int, exclude: Ragged | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores [B, k] float32, items [B, k] int64)`` of every query.

        Ties rank the lower item index first and excluded items score -inf, exactly as in
        :func:`crosstower.evaluate.ranking.topk_items`, so served and exhaustive rankings can be
        compared item for item. ``exclude`` has one row per query (``None``: nothing excluded).
        """

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The served arrays by name; saved as ``NAME.npy`` and counted by :meth:`nbytes`."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON scalars needed to rebuild the index from its arrays (sizes, settings)."""

    @classmethod
    @abstractmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Index:
        """Rebuild from saved arrays and :meth:`meta`; raise ValueError if they disagree."""

    # ---------------------------------------------------------------------------- generic parts

    def nbytes(self) -> int:
        """Bytes of the served data structure (all arrays; memory-mapped ones count too)."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    def describe(self) -> dict[str, Any]:
        """A summary for a run's ``metrics.json`` ``"index"`` entry (kind, sizes, bytes, time)."""
        return {
            "kind": self.kind,
            **self.meta(),
            "nbytes": self.nbytes(),
            "bytes_per_part": {name: int(a.nbytes) for name, a in self.arrays().items()},
            "build_seconds": round(float(self.build_seconds), 3),
        }

    def save(self, path: Path | str) -> None:
        """Write the index folder atomically (temporary folder, then rename over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            arrays = self.arrays()
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            header = {
                "format": FORMAT,
                "version": VERSION,
                "kind": self.kind,
                "meta": self.meta(),
                "build_seconds": float(self.build_seconds),
                "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()},
            }
            (tmp / HEADER).write_text(json.dumps(header, indent=2))
            replace_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: Path | str, mmap: bool = True) -> Index:
        """Open a saved index; ``mmap`` maps the arrays read-only instead of reading them.

        A missing, incomplete or corrupt folder raises :class:`CheckpointError` with one line
        naming the path, never a numpy or JSON traceback.
        """
        path = Path(path)
        header = _read_header(path)
        target = Index._registry.get(header["kind"])
        if target is None:
            raise CheckpointError(f"{path}: unknown index kind '{header['kind']}'")
        if cls is not Index and not issubclass(target, cls):
            raise CheckpointError(f"{path}: holds a '{header['kind']}' index, expected '{cls.kind}'")
        arrays = {name: _read_array(path, name, spec, mmap) for name, spec in header["arrays"].items()}
        try:
            index = target.from_arrays(arrays, header["meta"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: inconsistent index ({exc})") from None
        index.build_seconds = float(header.get("build_seconds", 0.0))
        return index


# -------------------------------------------------------------------------------- helpers


def no_exclusions(num_rows: int) -> Ragged:
    """An empty exclusion table of ``num_rows`` rows (what ``exclude=None`` means)."""
    return Ragged(np.zeros(num_rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))


def check_exclude(exclude: Ragged | None, num_rows: int) -> Ragged:
    """``exclude`` itself, or an empty table; a row-count mismatch is a caller bug worth naming."""
    if exclude is None:
        return no_exclusions(num_rows)
    if exclude.num_rows != num_rows:
        raise ValueError(f"exclude has {exclude.num_rows} rows for {num_rows} queries")
    return exclude


def as_numpy(values: torch.Tensor | np.ndarray, dtype: type | None = None) -> np.ndarray:
    """``values`` as a numpy array (a tensor leaves the autograd graph and the device first);
    ``dtype`` None or equal keeps the array itself, so a memory map stays one (no copy)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asanyarray(values, dtype=dtype)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, also for read-only memory maps.

    torch warns about non-writable arrays because writing through the tensor would fault; the
    indexes only ever read these tensors, so the warning is silenced rather than paying a copy.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def excluded(exclude: Ragged, items: np.ndarray) -> np.ndarray:
    """Boolean ``items.shape``: is ``items[row, j]`` in row ``row`` of ``exclude``."""
    width = int(max(items.max(initial=0), exclude.values.max(initial=0))) + 1
    keys = np.sort(exclude.pair_keys(width))
    query = np.arange(len(items))[:, None] * width + items
    if len(keys) == 0:
        return np.zeros(items.shape, dtype=bool)
    pos = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    return (keys[pos] == query) & (items >= 0)


def ranked(scores: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` by score, ties to the lower item index; missing slots item -1, score -inf."""
    b, width = scores.shape
    if width < k:
        scores = torch.cat([scores, scores.new_full((b, k - width), float("-inf"))], dim=1)
        items = torch.cat([items, items.new_full((b, k - width), -1)], dim=1)
    by_item = torch.argsort(torch.where(items >= 0, items, torch.iinfo(torch.int64).max), dim=1, stable=True)
    scores, items = scores.gather(1, by_item), items.gather(1, by_item)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    top_scores, top_items = scores.gather(1, order), items.gather(1, order)
    return top_scores, torch.where(torch.isinf(top_scores) & (top_scores < 0), torch.full_like(top_items, -1), top_items)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``: build times for :meth:`Index.describe`."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def _read_header(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: index folder not found")
    try:
        header = json.loads((path / HEADER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not an index folder (no {HEADER})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt {HEADER} ({type(exc).__name__})") from None
    ok = (
        isinstance(header, dict)
        and header.get("format") == FORMAT
        and isinstance(header.get("kind"), str)
        and isinstance(header.get("meta"), dict)
        and isinstance(header.get("arrays"), dict)
    )
    if not ok:
        raise CheckpointError(f"{path}: {HEADER} is not a crosstower index header")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: index format version {header.get('version')}, expected {VERSION}")
    return header


def _read_array(path: Path, name: str, spec: Any, mmap: bool) -> np.ndarray:
    """Load one array and check it against the header, so truncation is caught at load time."""
    file = path / f"{name}.npy"
    try:
        array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {file.name}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt {file.name} ({type(exc).__name__})") from None
    try:
        expected = (np.dtype(spec["dtype"]), tuple(spec["shape"]))
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: {HEADER} has a bad entry for {name}") from None
    if (array.dtype, array.shape) != expected:
        raise CheckpointError(
            f"{path}: {file.name} is {array.dtype}{list(array.shape)}, header says "
            f"{expected[0]}{list(expected[1])}"
        )
    return array
