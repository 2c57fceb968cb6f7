"""Sequence files of the SASRec / S3-Rec releases (Amazon Beauty, Sports, Toys, Games, Yelp, LastFM).

Two layouts exist: one user per line (``user item1 item2 ...``, S3-Rec) and one interaction per
line (``user item``, SASRec). Neither has time stamps; the order in the file is the time order,
so rows are kept in file order and :func:`build_dataset` numbers them within each user.
S3-Rec also ships ``<name>_item2attributes.json`` (item -> attribute ids), loaded as the
multi-categorical item field ``attributes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field as PydanticField

from crosstower.data.dataset import Dataset, FieldSpec, build_dataset
from crosstower.data.loaders.files import (
    COMPRESSED_SUFFIXES,
    HINT,
    find_file,
    find_optional,
    parse_options,
    read_json,
    read_text,
)
from crosstower.data.schema import FieldKind
from crosstower.errors import DataError

NAME = "sequences"


class SequenceOptions(BaseModel):
    """``file`` names the sequence file in the folder (needed when it holds several)."""

    model_config = ConfigDict(extra="forbid")

    file: str | None = None
    format: Literal["auto", "per_user_line", "per_interaction_line"] = "auto"
    # None or True: use <stem>_item2attributes.json when it exists; False: none; a name: that file.
    attributes: str | bool | None = None
    max_attributes: int | None = PydanticField(None, ge=1)  # None: the longest list, no truncation


def parse_sequences(text: str, source: str, fmt: str = "auto") -> pd.DataFrame:
    """``user_id``/``item_id`` rows in file order from either layout.

    A ``user item`` line is the same thing in both layouts (a user with one item), so one parser
    reads both; ``fmt`` only makes the stricter layout check its lines.
    """
    users: list[str] = []
    counts: list[int] = []
    items: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if fmt == "per_interaction_line" and len(tokens) != 2:
            raise DataError(f"{source}: line {number} has {len(tokens)} fields; expected 'user item'")
        users.append(tokens[0])
        counts.append(len(tokens) - 1)
        items.extend(tokens[1:])
    if not items:
        raise DataError(f"{source}: no interactions")
    user_ids = _as_ids(np.array(users, dtype=object))
    return pd.DataFrame(
        {"user_id": np.repeat(user_ids, counts), "item_id": _as_ids(np.array(items, dtype=object))}
    )


def _as_ids(tokens: np.ndarray) -> np.ndarray:
    """Integer ids where every token is an integer (so they sort numerically), else strings."""
    try:
        return tokens.astype(np.int64)
    except ValueError:
        return tokens.astype(str)


def read_item_attributes(path: Path, integer_ids: bool) -> pd.DataFrame:
    """``{"item": [attr, ...]}`` as a frame with one list per item, its ids typed like the
    sequence file's (JSON keys are always strings)."""
    mapping = read_json(path)
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected a JSON object mapping item ids to attribute lists")
    keys = np.array(list(mapping.keys()), dtype=object)
    try:
        index = keys.astype(np.int64) if integer_ids else keys.astype(str)
    except ValueError:
        raise DataError(f"{path}: item ids {list(keys[:3])} do not match the sequence file's ids") from None
    values = [v if isinstance(v, list) else [v] for v in mapping.values()]
    return pd.DataFrame({"attributes": values}, index=pd.Index(index, name="item_id"))


def _sequence_file(directory: Path, name: str | None) -> Path:
    if name is not None:
        return find_file(directory, name, NAME)
    if not directory.is_dir():
        raise DataError(f"{NAME}: directory {directory} does not exist; {HINT}")
    found = sorted(
        p for p in directory.iterdir()
        if _strip_compression(p.name).endswith(".txt") and not _strip_compression(p.name).endswith("_sample.txt")
    )  # fmt: skip
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise DataError(f"{NAME}: set dataset.options.file to one sequence file in {directory} (found: {listed})")
    return found[0]


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _attributes_file(directory: Path, sequence_file: Path, choice: str | bool | None) -> Path | None:
    if choice is False:
        return None
    if isinstance(choice, str):
        return find_file(directory, choice, NAME)
    stem = Path(_strip_compression(sequence_file.name)).stem
    return find_optional(directory, f"{stem}_item2attributes.json")


def load_sequences(path: Path, options: dict | None = None) -> Dataset:
    """Load a SASRec / S3-Rec sequence file from the folder ``path``."""
    opts = parse_options(SequenceOptions, options)
    directory = Path(path)
    file = _sequence_file(directory, opts.file)
    interactions = parse_sequences(read_text(file), str(file), opts.format)
    attributes_path = _attributes_file(directory, file, opts.attributes)
    items, specs = None, ()
    if attributes_path is not None:
        items = read_item_attributes(attributes_path, pd.api.types.is_integer_dtype(interactions["item_id"]))
        longest = int(items["attributes"].map(len).max()) if len(items) else 1
        max_len = opts.max_attributes or max(1, longest)
        specs = (FieldSpec("attributes", FieldKind.MULTI_CATEGORICAL, max_len=max_len),)
    name = Path(_strip_compression(file.name)).stem
    dataset = build_dataset(name, interactions, item_features=items, item_specs=specs, source=str(file))
    dataset.metadata.update({"source": str(file), "attributes": str(attributes_path) if attributes_path else None})
    return dataset
