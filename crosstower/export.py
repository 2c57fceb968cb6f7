"""``crosstower export DIR --format onnx``: a run's model as files that a service without
crosstower (or PyTorch) can serve.

Every export holds the **user tower** as ONNX, ``user_tower.onnx``: inputs ``users`` int64 [B]
and ``history`` int64 [B, L] (item rows, most recent last, -1 pads on the left); its outputs are
what the model's index searches with. Beside it, the item side:

* **inner-product models** (the towers, YouTubeDNN, MVKE, the distilled students, the dual
  encoder): output ``user_vectors`` float32 [B, D]; ``item_vectors.npy`` float32 [N, D] (row i is
  item i) and ``items.faiss``, an exact inner-product faiss index (IndexFlatIP) of those rows.
  Score = <user vector, item vector>.
* **late interaction**: outputs ``user_tokens`` float32 [B, T, m] and ``user_token_mask`` bool
  [B, T]; ``index/`` is the run's late-interaction index: ``item_tokens.npy`` (float16 [N, L, m])
  with ``item_mask.npy`` and ``item_bias.npy``, and ``candidate_index.npy``, a serialised faiss
  index (``faiss.deserialize_index``) of the real item tokens in (item, token) order. Score =
  sum over the user's real tokens of the max over the item's real tokens of their dot product,
  plus the item's bias; candidates = the items of each user token's nearest item tokens.
* **SparCode**: outputs ``user_codes`` int64 [B, T, M] (each token's code tuple, -1 entries for a
  token the user does not have) and ``user_code_vectors`` float32 [B, T, D] (its quantised vector,
  0 for an absent token); ``index/`` is the run's sparse code index, a CSR table over code tuples
  (``indptr``, ``items``, ``scores`` float16, ``code_ids`` mixed-radix ids with the first entry
  most significant, ``code_vectors``, optionally ``item_prior``). Score = the item's prior plus,
  for each real token, the item's score in the posting list of its code's row (a code that was
  not indexed reads the row whose code vector is nearest to the token's vector).

Always: ``user_histories.npy`` int64 [U, L] (each known user's last L items, -1 pads on the
left), ``ids.json`` (``{"users": [...], "items": [...]}``: the raw id of each row) and
``manifest.json`` (the model, shapes, inputs, outputs, how to score, the run's metrics). A user
the run knows is row ``u`` of ``ids.json["users"]``: feed ``users=[u]`` and
``history=user_histories[u:u+1]``; a new user is any known row with a history of item rows (the
user tower holds the user feature tables, so user features need no further file). Exported with
PyTorch's ONNX exporter (torch.export); the tests check onnxruntime against PyTorch to 1e-5.

Models that score each pair with a network (the cross encoder, IntTower, the all-to-all model)
have no user tower to export: serve those with ``crosstower serve``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from crosstower.errors import CrosstowerError
from crosstower.files import replace_dir
from crosstower.models.base import EmbeddingRecommender
from crosstower.query_graph import export_query_side, output_names
from crosstower.recommend import Retriever
from crosstower.run_dir import INDEX

FORMATS = ("onnx",)
USER_TOWER, ITEM_VECTORS, ITEM_INDEX, HISTORIES, IDS, MANIFEST = (
    "user_tower.onnx", "item_vectors.npy", "items.faiss", "user_histories.npy", "ids.json", "manifest.json")


# How a service scores with the index folder an export copies, by index kind.
SCORES = {
    "late_interaction": (
        "sum over the user's real tokens of the max over the item's real tokens of their dot product, plus "
        "item_bias; candidates: the items of each user token's nearest item tokens in index/candidate_index.npy "
        "(faiss.deserialize_index), item tokens in index/item_tokens.npy"),
    "sparse_code": (
        "item_prior (index/item_prior.npy, 0 without it) plus, for each real user token, the item's score in the "
        "posting list of its code: row r of index/code_ids.npy with code_ids[r] = sum_m user_codes[m] * N^(M-1-m) "
        "(else the row whose index/code_vectors.npy is nearest to user_code_vectors), entries "
        "index/indptr.npy[r]:[r+1] of index/items.npy and index/scores.npy; an item in no list scores its prior"),
}


def export_run(retriever: Retriever, out: Path, format: str = "onnx") -> Path:
    """Write the export of ``retriever``'s run into ``out`` (atomically: a temporary folder
    beside it, renamed into place)."""
    if format not in FORMATS:
        raise CrosstowerError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    output_names(retriever.model)  # refuse what cannot be exported before writing anything
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
    model, run = retriever.model, retriever.run
    length = run.config.train.history_length
    histories = retriever.seen.padded_tail(length).astype(np.int64)
    outputs = output_names(model)
    export_query_side(model, histories[:2], outputs, folder / USER_TOWER)
    files = [USER_TOWER, HISTORIES, IDS]
    if isinstance(model, EmbeddingRecommender):
        dim = _write_item_vectors(model, folder)
        files += [ITEM_VECTORS, ITEM_INDEX]
        score = "inner product of a user vector and a row of item_vectors.npy (items.faiss searches it)"
    else:
        dim = int(retriever.index.meta()["dim"])
        shutil.copytree(run.folder.file(INDEX), folder / INDEX)
        files.append(INDEX + "/")
        score = SCORES[retriever.index.kind]
    np.save(folder / HISTORIES, histories)
    ids = {"users": [_plain(v) for v in run.dataset.user_ids], "items": [_plain(v) for v in run.dataset.item_ids]}
    (folder / IDS).write_text(json.dumps(ids))
    manifest = {
        "format": "crosstower-export", "version": 1, "run": str(run.folder.path),
        "model": run.config.model.name, "dataset": run.dataset.name, "protocol": run.split.protocol,
        "users": run.dataset.num_users, "items": run.dataset.num_items, "dim": dim, "history_length": length,
        "history_padding": -1,
        "inputs": {"users": "int64 [batch]: user row (ids.json users)",
                   "history": f"int64 [batch, {length}]: item rows, most recent last, -1 pads on the left"},
        "outputs": outputs, "score": score, "metrics": run.metrics.get("metrics", {}), "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _write_item_vectors(model: EmbeddingRecommender, folder: Path) -> int:
    """Write the item vectors and their exact faiss index; return the vectors' width."""
    import faiss

    items = model.item_vectors().float().numpy()
    np.save(folder / ITEM_VECTORS, items)
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items))
    faiss.write_index(index, str(folder / ITEM_INDEX))
    return int(items.shape[1])


def _plain(raw: object) -> object:
    return raw.item() if isinstance(raw, np.generic) else raw
