"""An exponential moving average of a model's parameters (Polyak averaging), for validation and
the saved model.

Why: when a model's validation metric swings from epoch to epoch while its training loss keeps
falling (late interaction on the synthetic default moves by +-0.03 Recall@50 between epochs),
the weights wander around a good region; their running average sits nearer its middle and the
epoch selected on validation depends less on where one step happened to land.

Why not ``torch.optim.swa_utils.AveragedModel``: it keeps a second copy of the whole module and
either averages its buffers too or leaves them at their value when it was copied, while here the
buffers must stay the live ones (SparCode's codebooks and code-usage counts are buffers that
training itself updates by EMA; averaging them again would blur the codes the index is built
from). Averaging only the parameters and swapping them in for evaluation takes a few lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """``average <- decay * average + (1 - decay) * weight`` after every optimiser step.

    Starts at the model's current weights (no zero initialisation, so no bias correction is
    needed); :meth:`swapped_in` lends the averaged weights to the model for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.average = {name: p.detach().clone() for name, p in self._parameters()}

    def _parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.model.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self._parameters():
            self.average[name].lerp_(p.detach(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged parameters inside the block and its own ones after it."""
        live = {name: p.detach().clone() for name, p in self._parameters()}
        self._copy_into_model(self.average)
        try:
            yield
        finally:
            self._copy_into_model(live)

    @torch.no_grad()
    def _copy_into_model(self, values: dict[str, torch.Tensor]) -> None:
        for name, p in self._parameters():
            p.copy_(values[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.average.keys():
            raise KeyError(f"averaged weights for {sorted(set(state) ^ set(self.average))[:3]} ... do not match the model")
        self.average = {name: t.to(self.average[name].device).clone() for name, t in state.items()}
