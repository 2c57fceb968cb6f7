"""An exponential moving average of a model's parameters (Polyak averaging), for validation and
the saved model.

Why: when a model's validation metric swings from epoch to epoch while its training loss keeps
falling (late interaction on the synthetic default moves by +-0.03 Recall@50 between epochs),
the weights wander around a good region; their running average sits nearer its middle and the
epoch selected on validation depends less on where one step happened to land.

Why not ``torch.optim.swa_utils.AveragedModel``: it keeps a second copy of the whole module and
either averages all its buffers or none, while here most buffers must stay the live ones
(SparCode's EMA codebook sums and code-usage counts are updated by training itself; averaging
them again would blur them) and only a named few must follow the weights.

Which: SparCode's codebooks, when the model asks (``model.average_codebooks``). They are what its
users' tokens are snapped to, and the scores pair those code vectors with the item tower, so with
averaged towers and live codebooks the two sides lag each other by the average's horizon. On late
interaction's towers, whose normalised vectors can turn together on the sphere without changing
a live score, that mismatch took validation Recall@50 from 0.417 (live weights) to 0.200
(averaged towers, live codebooks) on the synthetic default. A model names such buffers
(:meth:`~crosstower.models.base.Recommender.averaged_buffers`); they are averaged like the
weights, from their value after the first step on (codebooks are set by the first batch or by
k-means as an epoch begins, so an average started earlier would remember placeholders).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """``average <- decay * average + (1 - decay) * weight`` after every optimiser step.

    Starts at the model's current weights (no zero initialisation, so no bias correction is
    needed) and, for the named ``buffers``, at their value after the first step;
    :meth:`swapped_in` lends the averages to the model for evaluation.
    """

    def __init__(self, model: nn.Module, decay: float, buffers: Sequence[str] = ()):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.average = {name: p.detach().clone() for name, p in self._parameters()}
        missing = [name for name in buffers if name not in dict(model.named_buffers())]
        if missing:
            raise KeyError(f"the model has no buffer {missing[0]} to average")
        self.buffer_names = list(buffers)
        self.buffer_average: dict[str, torch.Tensor] = {}  # filled by the first update

    def _parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.model.named_parameters() if p.requires_grad)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors that have an average: the trainable weights and the started buffers."""
        buffers = dict(self.model.named_buffers())
        return {**dict(self._parameters()), **{name: buffers[name] for name in self.buffer_average}}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self._parameters():
            self.average[name].lerp_(p.detach(), 1.0 - self.decay)
        if not self.buffer_names:  # every step: skip walking the module tree when nothing is named
            return
        buffers = dict(self.model.named_buffers())
        for name in self.buffer_names:
            if name in self.buffer_average:
                self.buffer_average[name].lerp_(buffers[name], 1.0 - self.decay)
            else:
                self.buffer_average[name] = buffers[name].detach().clone()

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averages inside the block and its own values after it."""
        live = {name: t.detach().clone() for name, t in self._tensors().items()}
        self._copy_into_model(self.state_dict())
        try:
            yield
        finally:
            self._copy_into_model(live)

    @torch.no_grad()
    def _copy_into_model(self, values: dict[str, torch.Tensor]) -> None:
        for name, t in self._tensors().items():
            t.copy_(values[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in {**self.average, **self.buffer_average}.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint's averages; a named buffer without one starts again at the next step."""
        weights = {name: t for name, t in state.items() if name not in self.buffer_names}
        if weights.keys() != self.average.keys():
            raise KeyError(f"averaged weights for {sorted(set(weights) ^ set(self.average))[:3]} ... do not match the model")
        self.average = {name: t.to(self.average[name].device).clone() for name, t in weights.items()}
        buffers = dict(self.model.named_buffers())
        self.buffer_average = {name: state[name].to(buffers[name].device).clone()
                               for name in self.buffer_names if name in state}
