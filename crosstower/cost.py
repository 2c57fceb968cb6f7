"""What a trained model costs to serve: multiply-adds per (user, item) pair and bytes per item.

* **Multiply-adds per pair** are counted, not derived by hand: torch's ``FlopCounterMode`` counts
  the matrix products of the model's own full-ranking scorer (``item_scorer()``, which caches
  whatever the item side allows), for a batch of users against the whole catalogue and against
  half of it; the difference divided by the extra pairs is the marginal cost of one more pair, so
  work done once per user (encoding the user) drops out. Element-wise work (ReLU, softmax, max)
  is not counted: the figure is a lower bound for the interaction models, exact for a dot product.
* **Bytes per item** are what serving stores per catalogue item: the float32 item vector of an
  inner-product model, the float16 token vectors (+ bias) of late interaction, the item heads of
  IntTower, the index bytes per item of SparCode, the float16 token vectors and float32 [CLS]
  state of TRMD's student, and, for the cross encoder, which can
  precompute nothing beyond the item's input tokens, those tokens.

``crosstower run`` records both in ``metrics.json`` (``"cost"``); ``crosstower compare`` reads
them from there, or measures them for a run written before they were recorded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from crosstower.data.batching import eval_user_input
from crosstower.data.splits import EvalUsers
from crosstower.models.base import EmbeddingRecommender, Recommender

USERS = 8  # users scored at once while counting


def counted_macs(model: Recommender, block: EvalUsers, history_length: int) -> float:
    """Marginal multiply-adds of one more (user, item) pair in the model's full-ranking scorer,
    for the first :data:`USERS` users of ``block``."""
    if len(block) == 0:
        raise ValueError("counting the cost of a pair needs at least one user")
    user = eval_user_input(block, np.arange(min(USERS, len(block))), history_length).to(model.device)
    scorer = model.item_scorer()
    half = model.num_items // 2
    counts = []
    for stop in (half, model.num_items):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            scorer(user, 0, stop)
        counts.append(counter.get_total_flops() / 2)
    return (counts[1] - counts[0]) / (len(user) * (model.num_items - half))


def stored_bytes_per_item(model: Recommender, model_name: str, index: dict) -> float | None:
    """What serving keeps per catalogue item (see the module docstring); ``index`` is the run's
    ``metrics.json`` index summary. None for a model with no rule here."""
    if model_name == "sparcode" and "nbytes" in index:
        return index["nbytes"] / model.num_items
    if isinstance(model, EmbeddingRecommender):
        return model.item_vectors(chunk=1024)[:1].shape[1] * 4
    if model_name == "colbert":
        tokens = model.encode_item_tokens(torch.arange(1))
        return int(tokens.mask.sum()) * tokens.tokens.shape[-1] * 2 + 4
    if model_name == "trmd":  # float16 token vectors and the float32 [CLS] state
        item = model.encode_items(torch.arange(1))
        return int(item.tokens.mask.sum()) * item.tokens.tokens.shape[-1] * 2 + item.cls.shape[-1] * 4
    if model_name == "inttower":
        return model.config.heads_item * model.config.head_dim * 4
    if model_name == "cross":
        return model.substrate.item_length * model.config.dim * 4
    if model_name == "alltoall":
        return model.item_tokenizer(torch.arange(1)).numel() * 4  # K_i token vectors of float32
    return None


@torch.no_grad()
def serving_cost(model: Recommender, model_name: str, index: dict, block: EvalUsers, history_length: int) -> dict:
    """``{"macs_per_pair", "bytes_per_item"}`` of a trained model (eval mode)."""
    was_training = model.training
    model.eval()
    macs = counted_macs(model, block, history_length)
    bytes_per_item = stored_bytes_per_item(model, model_name, index)
    model.train(was_training)
    return {"macs_per_pair": round(macs, 1), "bytes_per_item": None if bytes_per_item is None else round(float(bytes_per_item), 1)}
