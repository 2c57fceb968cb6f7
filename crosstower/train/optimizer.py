"""The optimiser of a training run: Adam, or with ``train.sparse_embeddings`` Adam for the dense
parameters and a lazy Adam for the embedding tables.

Why sparse embeddings: dense Adam reads and writes every row of every table at every step, and an
embedding's dense gradient is a zeroed copy of its whole table. With a million items that is the
step: YouTubeDNN at 984,588 items (batch 1,024) spent 1.0 of its 1.2 s a step in the embedding
backward and Adam's update, 0.16 s in the forward. With sparse gradients a step costs the rows the
batch touched. torch's ``SparseAdam`` is lazy Adam (a row's moments decay only at the steps that
use it, and its eps is added before the second moment's bias correction), a different
optimisation from dense Adam, so this is an option, off by default.

Why a class of our own: torch has no optimiser that takes dense and sparse gradients together,
and the trainer's schedule (``ReduceLROnPlateau``), checkpoints and log need one optimiser. This
one holds ``Adam`` and ``SparseAdam`` and shares their parameter groups, so a learning-rate change
reaches both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crosstower.config import TrainConfig
from crosstower.errors import TrainingError


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over ``model``'s parameters; with ``cfg.sparse_embeddings`` every ``nn.Embedding`` of
    the model is switched to sparse gradients and its table stepped by ``SparseAdam``."""
    if not cfg.sparse_embeddings:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tables: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            module.sparse = True
            tables[id(module.weight)] = f"{name}.weight"
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in tables]
    sparse = [p for p in model.parameters() if id(p) in tables]
    return DenseAndSparseAdam(dense, sparse, tables, lr=cfg.lr, weight_decay=cfg.weight_decay)


class DenseAndSparseAdam(torch.optim.Optimizer):
    """``Adam`` over ``dense`` (with ``weight_decay``) and ``SparseAdam`` over ``sparse`` (the
    embedding tables, no weight decay: lazy Adam has none) stepped together."""

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter], names: dict[int, str],
                 lr: float, weight_decay: float = 0.0):
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if dense:
            self.parts["dense"] = torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay)
        if sparse:
            self.parts["sparse"] = torch.optim.SparseAdam(sparse, lr=lr)
        self.names = names
        super().__init__([*dense, *sparse], {"lr": lr})
        # The parts' own group dicts: a scheduler that sets a group's lr sets it for the part.
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: ARG002 - no closure: Adam needs none
        sparse = self.parts.get("sparse")
        if sparse is not None:
            for p in sparse.param_groups[0]["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    raise TrainingError(
                        f"train.sparse_embeddings: {self.names[id(p)]} received a dense gradient (the model reads "
                        f"that table other than by lookup); train this model with train.sparse_embeddings false")
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):
            raise TrainingError(f"optimizer state holds {sorted(state_dict)}, expected {sorted(self.parts)}")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
