"""Data-parallel training over several processes, on ``torch.distributed`` (``torchrun``).

Every rank draws the same global batch (the epoch's order and the sampled negatives come from
the run's seed, exactly as in one process) and trains on its contiguous share of the rows; the
gradients are summed with each rank's weighted by its share of the global batch, so a step on
``N`` ranks with global batch ``B`` is the step of one process with batch ``B`` for any loss that
is a mean over rows. Two things differ by design: in-batch negatives are the rank's own rows'
positives (``B / N`` of them, not ``B``), and the rank-local randomness (dropout) is seeded per
rank. Validation, checkpoints, the index and the run folder are rank 0's; its validation value
and clock are broadcast so that every rank takes the same early-stopping and learning-rate
decisions.

Why not ``torch.nn.parallel.DistributedDataParallel``: it reduces gradients through hooks on
``forward``, while crosstower's models train through ``loss(batch)`` (and a distiller around
them), and the last batch of an epoch splits unevenly, so each rank's gradient needs its own
weight for the step to stay equal to one process's. One flat ``all_reduce`` per step does both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from crosstower.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank validates and writes (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.world > 1

    def shard(self, size: int) -> slice:
        """This rank's contiguous rows of a global batch of ``size`` rows; the first
        ``size % world`` ranks take one row more."""
        base, extra = divmod(size, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Ranks()


def start_ranks(device: str) -> Ranks:
    """The ranks ``torchrun`` set up in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), with the process group started: gloo on the CPU, nccl on GPUs (one per local
    rank). Without torchrun: one process, nothing started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    gpu = device.startswith("cuda")
    if gpu:
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: '{device}' under torchrun, but torch sees no CUDA device; use 'cpu'")
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return ranks


def stop_ranks() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> str:
    """Under several ranks on GPUs, each rank trains on its own (``cuda:LOCAL_RANK``)."""
    if ranks.active and device.startswith("cuda"):
        return f"cuda:{ranks.local_rank}"
    return device


def several_ranks() -> bool:
    """Whether this process trains among others (a process group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(*tensors: torch.Tensor) -> None:
    """Sum tensors in place over the ranks (nothing with one process): batch statistics that a
    model accumulates itself (SparCode's codebook EMA) become those of the global batch. Every
    rank must call it at the same step."""
    if several_ranks():
        for tensor in tensors:
            dist.all_reduce(tensor)


def reduce_gradients(model: nn.Module, weight: float) -> None:
    """Replace each gradient by the sum over ranks of ``weight`` x the rank's gradient
    (``weight``: the rank's share of the global batch). A parameter that no rank gave a gradient
    keeps none, so the optimiser skips it as one process would."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() * weight
                      for p in params] + [had])
    dist.all_reduce(flat)
    given, offset = flat[-len(params):].tolist(), 0
    for p, any_grad in zip(params, given):
        values = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = values if any_grad > 0 else None


def broadcast_model(model: nn.Module) -> None:
    """Rank 0's weights and buffers onto every rank."""
    broadcast([*model.parameters(), *(b for b in model.buffers() if b is not None)])


def learned_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers of the state dict: what training steps may update (codebooks
    and their moving averages), not the constant tables a model keeps as buffers."""
    persistent = set(model.state_dict(keep_vars=True))
    return [b for name, b in model.named_buffers() if b is not None and b.is_floating_point() and name in persistent]


def broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place."""
    for tensor in tensors:
        dist.broadcast(tensor.data, 0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a time budget ends the epoch on all at once)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def from_main(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (its validation metric and clock)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return tensor.tolist()


def summed(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (an epoch's loss totals and row counts)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
