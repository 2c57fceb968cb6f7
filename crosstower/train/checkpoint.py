"""Atomic, verifiable checkpoints.

A checkpoint is written to a temporary file and renamed into place, so an interrupted write
never leaves a truncated file; loading checks the file and the model it belongs to and reports
a problem as one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from crosstower.errors import CheckpointError


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model_name: str | None = None) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a crosstower checkpoint (no 'model' entry)")
    if model_name is not None and state.get("model_name") != model_name:
        raise CheckpointError(f"{path}: checkpoint of model '{state.get('model_name')}', expected '{model_name}'")
    return state
