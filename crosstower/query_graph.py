"""A model's query side (``index_query``: a user in, what its index searches with out) as one
ONNX graph, and that graph run by onnxruntime in place of PyTorch when serving.

Why: a batch-1 request through PyTorch's eager mode pays a fixed Python and dispatch cost on
every operator, and a query side is a few dozen small operators, so that fixed cost is most of
its time: SparCode's tokenizer and quantiser at batch 1 took 0.69 ms in eager mode and 0.085 ms
as this graph in onnxruntime, on one thread of this project's 2-core machines (the serving
benchmark's synthetic encoder, measured back to back; docs/notes/2026-12-07-scale.md). The graph
is the one ``crosstower export`` writes, so a compiled query answers what the eager one answers
(codes exactly, vectors to 1e-5: tests).

Inputs ``users`` int64 [B] and ``history`` int64 [B, L] (item rows, most recent last, -1 pads),
with the example age of a serving-time request (0); outputs by model kind (:func:`output_names`).
User feature tables are part of the graph, so a request that replaces them (a history-only
request reads every user field's missing value) goes through PyTorch instead.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.errors import CrosstowerError
from crosstower.index.code_ids import CodeQueries
from crosstower.models.base import EmbeddingRecommender, Recommender
from crosstower.models.late_interaction import LateInteraction
from crosstower.models.sparcode import SparCode
from crosstower.nn.tokens import TokenSequence

log = logging.getLogger("crosstower.query_graph")


class QuerySide(nn.Module):
    """The model's index query (``index_query``) with plain tensors in and out, as the ONNX
    graph's inputs and outputs."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Example age 0: the age of a serving-time request (YouTubeDNN's convention).
        query = self.model.index_query(UserInput(users, history, torch.zeros_like(users, dtype=torch.float32)))
        if isinstance(query, TokenSequence):
            return query.tokens, query.mask
        if isinstance(query, CodeQueries):
            return query.codes, query.vectors
        return (query,)


def output_names(model: Recommender) -> list[str]:
    """The query graph's outputs for ``model``, or a CrosstowerError where it has none."""
    if isinstance(model, EmbeddingRecommender):
        return ["user_vectors"]
    if isinstance(model, LateInteraction):
        return ["user_tokens", "user_token_mask"]
    if isinstance(model, SparCode) and model.quantizer is not None:
        return ["user_codes", "user_code_vectors"]
    name = type(model).__name__
    raise CrosstowerError(f"{name} scores each (user, item) pair with a network, so it has no user tower and item "
                          f"side to export; serve the run with `crosstower serve`")


def export_query_side(model: Recommender, histories: np.ndarray, outputs: list[str], path: Path) -> None:
    """Write ``model``'s query graph to ``path``, traced on the users of ``histories`` (a few
    rows of padded histories) with a dynamic batch size."""
    log.info("exporting the query side to ONNX")
    example = (torch.arange(len(histories)), torch.from_numpy(histories))
    batch = torch.export.Dim("batch")
    for noisy in ("onnx_ir", "onnxscript"):  # a line per graph pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms" and three more: operators no query
    # graph uses, and torchvision is not a dependency.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "axis name batch ... shares the same constraints"
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations, not ours
        torch.onnx.export(QuerySide(model).eval(), example, str(path), dynamo=True,
                          input_names=["users", "history"], output_names=outputs,
                          dynamic_shapes={"users": {0: batch}, "history": {0: batch}}, external_data=False,
                          verbose=False)


class CompiledQueries:
    """``model.index_query`` run by onnxruntime on ``threads`` threads."""

    def __init__(self, model: Recommender, histories: np.ndarray, threads: int = 1) -> None:
        import onnxruntime

        self.outputs = output_names(model)
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            path = Path(folder) / "query.onnx"
            export_query_side(model, histories, self.outputs, path)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, user: UserInput) -> Any:
        outputs = self.session.run(None, {"users": user.users.numpy(), "history": user.history.numpy()})
        tensors = [torch.from_numpy(value) for value in outputs]
        if self.outputs == ["user_vectors"]:
            return tensors[0]
        if self.outputs == ["user_tokens", "user_token_mask"]:
            return TokenSequence(*tensors)
        return CodeQueries(*tensors)


def compiled_queries(model: Recommender, histories: np.ndarray, threads: int = 1) -> CompiledQueries | None:
    """The model's compiled query side, or None for a model that has none (scored pair by pair,
    or a query PyTorch must answer, such as TRMD's two rankers)."""
    try:
        output_names(model)
    except CrosstowerError:
        return None
    try:
        return CompiledQueries(model, histories, threads)
    except Exception as exc:  # noqa: BLE001 - an optimisation: a graph that will not trace leaves PyTorch serving
        log.warning("the query side of %s did not export to ONNX (%s: %s); PyTorch answers its queries",
                    type(model).__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
