"""Plain-text tables for the terminal: what the CLI prints after a run and for recommendations."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, ``|`` between them, a rule under the header."""
    lines = [[str(v) for v in header], *([str(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [" | ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(text)
