"""A transformer encoder that can show its work.

Interaction models and attention distillation (VIRT, DiDE, ERNIE-Search) need each layer's
attention map, queries and keys, so attention is written out here rather than taken from
``nn.MultiheadAttention``, which hides them. Pre-layer-norm blocks, padding masks throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LayerTrace:
    """What one block computed: attention ``[B, H, L, L]``, queries and keys ``[B, H, L, d_h]``."""

    attention: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerTrace]:
        """``x [B, L, d]``; ``mask [B, L]`` True for real tokens (padding keys get no weight);
        ``allowed [L, L]`` True where query position ``a`` may attend to key position ``b``."""
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / self.head_dim**0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        attention = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no real key -> zeros
        mixed = (self.dropout(attention) @ v).transpose(1, 2).reshape(b, length, -1)
        return self.out(mixed), LayerTrace(attention, q, k)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden or 4 * dim), nn.GELU(), nn.Linear(hidden or 4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerTrace]:
        attended, trace = self.attention(self.norm1(x), mask, allowed)
        x = x + self.dropout(attended)
        return x + self.dropout(self.mlp(self.norm2(x))), trace


class TransformerEncoder(nn.Module):
    """``layers`` blocks and a final layer norm; optionally returns every layer's trace."""

    def __init__(self, dim: int, layers: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, return_traces: bool = False,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[LayerTrace]]:
        """``allowed [L, L]``: which positions may attend to which (default: all)."""
        traces = []
        for block in self.blocks:
            x, trace = block(x, mask, allowed)
            traces.append(trace)
        x = self.norm(x)
        return (x, traces) if return_traces else x
