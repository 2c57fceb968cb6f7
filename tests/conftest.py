"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real data sets live outside the repository (never committed); see shared/data/SOURCES.md.
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA = Path(os.environ.get("CROSSTOWER_DATA_DIR", DEFAULT_DATA))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real data sets; tests that need it skip (with the reason) where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (set CROSSTOWER_DATA_DIR)")
    return SHARED_DATA
