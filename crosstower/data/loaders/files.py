"""Finding and reading data files, compressed or not, with errors that name the file.

Releases are often stored compressed (``u.data.xz``) or unpacked; users should not have to care.
Every reader here turns a low-level failure (missing file, bad encoding, truncated archive) into a
one-line :class:`DataError` that names the file, because that is what the CLI shows.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd
from pydantic import BaseModel, ValidationError

from crosstower.errors import DataError, first_error_line

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
HINT = "pass --data-dir"

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def parse_options(model: type[M], options: dict | None, skip: tuple[str, ...] = ()) -> M:
    """Validate a loader's options; the first problem becomes ``dataset.options.<loc>: <msg>``
    (``skip``: the tags of the options' unions, left out of ``<loc>``)."""
    try:
        return model.model_validate(options or {})
    except ValidationError as exc:
        raise DataError(first_error_line(exc, "dataset.options", skip)) from None


def candidates(directory: Path, basename: str) -> list[Path]:
    """The plain file name first, then its compressed variants."""
    return [directory / basename] + [directory / (basename + s) for s in COMPRESSED_SUFFIXES]


def find_optional(directory: Path, basename: str) -> Path | None:
    """The first existing variant of ``basename`` in ``directory``, or None."""
    return next((p for p in candidates(Path(directory), basename) if p.is_file()), None)


def _expected(basename: str) -> str:
    return f"{basename} (or {basename}.gz/.bz2/.xz/.zst/.zip)"


def find_file(directory: Path, basename: str, dataset: str = "dataset") -> Path:
    """Locate ``basename`` (or a compressed copy) in ``directory`` or raise a DataError saying so."""
    directory = Path(directory)
    found = find_optional(directory, basename)
    if found is not None:
        return found
    if not directory.is_dir():
        raise DataError(f"{dataset}: directory {directory} does not exist (expected {_expected(basename)}); {HINT}")
    raise DataError(f"{dataset}: expected {_expected(basename)} in {directory}; {HINT}")


def resolve_dir(path: Path, basename: str, subdirs: tuple[str, ...], dataset: str) -> Path:
    """The directory holding ``basename``: ``path`` itself, or one of the release's usual
    sub-folders of it, so that ``--data-dir`` may name either the data root or the data set."""
    path = Path(path)
    subfolders = [path / s for s in subdirs]
    for directory in (path, *subfolders):
        if find_optional(directory, basename) is not None:
            return directory
    # Name the release's own folder when it exists (it lacks the file), else the given path.
    target = next((d for d in subfolders if d.is_dir()), path)
    find_file(target, basename, dataset)
    return target  # pragma: no cover (find_file raised)


def _guarded(path: Path, read: Callable[[], T]) -> T:
    """Run ``read`` and turn parsing or decompression failures into a DataError naming ``path``."""
    try:
        return read()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {HINT}") from None
    except ImportError as exc:
        raise DataError(f"{path}: cannot decompress ({exc}); decompress it first") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: cannot decode text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, ValueError, OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read ({message})") from None


def read_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv`` with compression inferred from the file name."""
    return _guarded(path, lambda: pd.read_csv(path, compression="infer", **kwargs))


def read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet file as a frame; an outer compression (``x.parquet.gz``) is undone in memory."""

    def read() -> pd.DataFrame:
        if Path(path).suffix.lower() in COMPRESSED_SUFFIXES:
            with open_binary(path) as handle:
                return pd.read_parquet(io.BytesIO(handle.read()), columns=columns)
        return pd.read_parquet(path, columns=columns)

    return _guarded(path, read)


def open_binary(path: Path) -> io.BufferedIOBase:
    """A binary stream of the decompressed content of ``path``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        import zstandard  # optional dependency; ImportError is reported by _guarded

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    if suffix == ".zip":
        archive = zipfile.ZipFile(path)
        members = [n for n in archive.namelist() if not n.endswith("/")]
        if len(members) != 1:
            raise DataError(f"{path}: expected one file in the zip archive, found {len(members)}")
        return archive.open(members[0])
    return open(path, "rb")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The whole decompressed text of ``path``."""

    def read() -> str:
        with open_binary(path) as handle:
            return handle.read().decode(encoding)

    return _guarded(path, read)


def read_json(path: Path) -> Any:
    """A (possibly compressed) JSON document."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def logical_suffix(path: Path) -> str:
    """The format suffix under any compression suffix: ``ratings.csv.gz`` -> ``.csv``."""
    path = Path(path)
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        path = path.with_suffix("")
    return path.suffix.lower()
