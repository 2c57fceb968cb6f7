"""Writing result files and folders so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, via a temporary file renamed into place.

    Benchmarks write their numbers with it: an interrupted run leaves the previous file (or
    none), never a truncated one that a results table would then read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an existing ``dst`` is swapped out by two
    renames and then removed, so a reader sees the old folder or the new one, never a mix.
    Every folder crosstower writes (a run, an index, a synthetic data set, a prepared split)
    is written beside its destination and moved into place by this."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
