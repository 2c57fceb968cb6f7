"""``crosstower export DIR --format onnx``: a run's inner-product model as files that a service
without crosstower (or PyTorch) can serve.

::

    OUT/
      user_tower.onnx     users int64 [B], history int64 [B, L] -> user_vectors float32 [B, D]
      item_vectors.npy    float32 [N, D]: row i is item i; score = <user vector, item vector>
      items.faiss         an exact inner-product faiss index (IndexFlatIP) of those rows
      user_histories.npy  int64 [U, L]: each known user's last L items (-1 pads on the left)
      ids.json            {"users": [...], "items": [...]}: the raw id of each row index
      manifest.json       the model, the shapes, how to build the inputs and how to score

A user the run knows is row ``u`` of ``ids.json["users"]``: feed ``users=[u]`` and
``history=user_histories[u:u+1]``. A new user is any known row (its features are read from the
graph's tables) with a history of item rows, most recent last. The user tower holds the user
feature tables, so user features need no further file. Exported with PyTorch's ONNX exporter
(torch.export); the tests check onnxruntime against PyTorch to 1e-5.

Only models whose score is one inner product are exported (the towers, YouTubeDNN, the
distilled students, the dual encoder); the others need their own serving code
(``crosstower serve``).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.errors import CrosstowerError
from crosstower.files import replace_dir
from crosstower.models.base import EmbeddingRecommender
from crosstower.recommend import Retriever

log = logging.getLogger("crosstower.export")

FORMATS = ("onnx",)
USER_TOWER, ITEM_VECTORS, ITEM_INDEX, HISTORIES, IDS, MANIFEST = (
    "user_tower.onnx", "item_vectors.npy", "items.faiss", "user_histories.npy", "ids.json", "manifest.json")


class UserTower(nn.Module):
    """``encode_users`` with plain tensors in and out, as the ONNX graph's inputs and output."""

    def __init__(self, model: EmbeddingRecommender):
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        # Example age 0: the age of a serving-time request (YouTubeDNN's convention).
        return self.model.encode_users(UserInput(users, history, torch.zeros_like(users, dtype=torch.float32)))


def export_run(retriever: Retriever, out: Path, format: str = "onnx") -> Path:
    """Write the export of ``retriever``'s run into ``out`` (atomically: a temporary folder
    beside it, renamed into place)."""
    if format not in FORMATS:
        raise CrosstowerError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    model, run = retriever.model, retriever.run
    if not isinstance(model, EmbeddingRecommender):
        raise CrosstowerError(f"{run.folder.path}: {run.config.model.name} does not score by one inner product, so "
                              f"it has no user tower and item vectors to export; serve it with `crosstower serve`")
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists():
        raise CrosstowerError(f"--out {out}: exists and is not a crosstower export; choose another --out")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write(retriever, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_dir(partial, out)
    return out


@torch.no_grad()
def _write(retriever: Retriever, folder: Path) -> None:
    import faiss

    model, run = retriever.model, retriever.run
    length = run.config.train.history_length
    histories = retriever.seen.padded_tail(length).astype(np.int64)
    example = (torch.arange(min(2, run.dataset.num_users)), torch.from_numpy(histories[:2]))
    log.info("exporting the user tower to ONNX")
    batch = torch.export.Dim("batch")
    for noisy in ("onnx_ir", "onnxscript"):  # a line per graph pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "axis name batch ... shares the same constraints"
        torch.onnx.export(UserTower(model).eval(), example, str(folder / USER_TOWER), dynamo=True,
                          input_names=["users", "history"], output_names=["user_vectors"],
                          dynamic_shapes={"users": {0: batch}, "history": {0: batch}}, external_data=False,
                          verbose=False)
    items = model.item_vectors().float().numpy()
    np.save(folder / ITEM_VECTORS, items)
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items))
    faiss.write_index(index, str(folder / ITEM_INDEX))
    np.save(folder / HISTORIES, histories)
    ids = {"users": [_plain(v) for v in run.dataset.user_ids], "items": [_plain(v) for v in run.dataset.item_ids]}
    (folder / IDS).write_text(json.dumps(ids))
    manifest = {
        "format": "crosstower-export", "version": 1, "run": str(run.folder.path),
        "model": run.config.model.name, "dataset": run.dataset.name, "protocol": run.split.protocol,
        "users": run.dataset.num_users, "items": run.dataset.num_items, "dim": int(items.shape[1]),
        "history_length": length, "history_padding": -1,
        "inputs": {"users": "int64 [batch]: user row (ids.json users)",
                   "history": f"int64 [batch, {length}]: item rows, most recent last, -1 pads on the left"},
        "output": "user_vectors float32 [batch, dim]",
        "score": "inner product of a user vector and a row of item_vectors.npy (items.faiss searches it)",
        "metrics": run.metrics.get("metrics", {}),
        "files": [USER_TOWER, ITEM_VECTORS, ITEM_INDEX, HISTORIES, IDS],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _plain(raw: object) -> object:
    return raw.item() if isinstance(raw, np.generic) else raw
