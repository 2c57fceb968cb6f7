"""Interaction encoders ``E(token, item)``: score one user token against an item's tokens.

SparCode sums ``ReLU(E(q_k(u), i) + b)`` over a user's (quantised) tokens; these are its
building blocks, kept apart from the model so that other token-level scorers can reuse them. Each
scores every token against every item (or each user's own candidates) without building the
T x N concatenated inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from crosstower.nn.fields import MLP


class InteractionMLP(nn.Module):
    """``E(token, item) = MLP([token; item tokens])``, optionally with a multiplicative term.

    The first layer is split by input part. ``W [t; v] = W_t t + W_v v``: projecting tokens and
    items separately and adding them is the same function as the MLP on the concatenation, but
    scores all T x N pairs without ever building T x N concatenated inputs.

    With ``products``, the first layer also adds ``(A t) * (B v)`` (element-wise): a factorised
    bilinear term. An MLP over a plain concatenation learns multiplicative interactions (a
    similarity, a conjunction such as "the token's cluster is the item's cluster") only slowly
    and approximately (Rendle et al., RecSys 2020); with this term an inner product of the token
    and the item is one layer away, and per pair it costs one more element-wise product of the
    two projections, not a matrix product.
    """

    def __init__(self, dim: int, item_tokens: int, hidden: list[int], dropout: float = 0.0, products: bool = False):
        super().__init__()
        self.token_in = nn.Linear(dim, hidden[0])
        self.item_in = nn.Linear(item_tokens * dim, hidden[0], bias=False)
        self.token_gate = nn.Linear(dim, hidden[0], bias=False) if products else None
        self.item_gate = nn.Linear(item_tokens * dim, hidden[0], bias=False) if products else None
        self.rest = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), MLP([*hidden, 1], dropout))
        # Start every (token, item) score positive: a ReLU'd score that starts <= 0 everywhere
        # has no gradient and never recovers. Training then pushes negatives' scores to exact 0.
        nn.init.constant_(self.rest[-1][-1].bias, 1.0)

    def forward(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``tokens [..., T, D]`` x ``items [..., N, K_i, D]`` -> scores ``[..., T, N]``."""
        items = items.flatten(-2)
        hidden = self.token_in(tokens).unsqueeze(-2) + self.item_in(items).unsqueeze(-3)  # [..., T, N, H]
        if self.token_gate is not None:
            hidden = hidden + self.token_gate(tokens).unsqueeze(-2) * self.item_gate(items).unsqueeze(-3)
        return self.rest(hidden).squeeze(-1)


class InteractionSA(nn.Module):
    """``E(token, item)``: one pre-norm transformer layer over ``[token; item tokens]``, scored
    from the first position.

    Only the first position's output is scored, so only its row of attention is computed: the
    token's query against the keys of the token and of the ``K_i`` item tokens. The result is
    exactly that of a full layer over the ``1 + K_i`` tokens (tested against one), at the cost of
    one attention row per (token, item) pair.
    """

    def __init__(self, dim: int, heads: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.norm_in, self.norm_mid, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden[0]), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden[0], dim))
        self.score_head = nn.Linear(dim, 1)
        nn.init.constant_(self.score_head.bias, 1.0)  # start positive, as in InteractionMLP

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(self.norm_in(x)).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def forward(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T, D]`` x ``items [N, K_i, D]`` or ``[B, N, K_i, D]`` -> ``[B, T, N]``;
        ``tokens [T, D]`` (codes to index) x ``items [N, K_i, D]`` -> ``[T, N]``."""
        if tokens.dim() == 2:
            return self.forward(tokens.unsqueeze(0), items)[0]
        if items.dim() == 3:
            items = items.unsqueeze(0)
        q, k_t, v_t = self._split(tokens)  # [B, T, H, dh]
        _, k_i, v_i = self._split(items)  # [Bi, N, K_i, H, dh]
        scale = self.head_dim**-0.5
        self_logit = (q * k_t).sum(-1)[:, :, None, None, :] * scale  # [B, T, 1, 1, H]
        item_logit = (q[:, :, None, None] * k_i[:, None]).sum(-1) * scale  # [B, T, N, K_i, H]
        weights = torch.softmax(torch.cat([self_logit.expand(-1, -1, item_logit.shape[2], -1, -1), item_logit], 3), 3)
        mixed = weights[..., :1, :, None] * v_t[:, :, None, None] + (weights[..., 1:, :, None] * v_i[:, None]).sum(
            3, keepdim=True
        )  # [B, T, N, 1, H, dh]
        x = tokens[:, :, None] + self.attn_out(mixed.squeeze(3).flatten(-2))  # [B, T, N, D]
        x = x + self.ffn(self.norm_mid(x))
        return self.score_head(self.norm_out(x)).squeeze(-1)


class InteractionMaxSim(nn.Module):
    """``E(token, item) = max_b <token, d_b> / tau``: late interaction's per-token term.

    ColBERT's MaxSim is ``sum_a max_b q_a . d_b``; inside SparCode each user token's max becomes
    one (code, item) score, so ``y(u, i) = sum_a ReLU(max_b q_a . d_b / tau + b)`` is MaxSim with
    the sparsity control. No parameters: the towers learn what the scores say. Not an all-to-all
    encoder (the token meets each item token alone, by one inner product), so it cannot learn
    what the MLP and SA encoders can in principle; it is the scorer under which a user tower
    without the item already beat the towers on the synthetic default (issue 4).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``tokens [..., T, D]`` x ``items [..., N, K_i, D]`` -> ``[..., T, N]`` (leading dims
        broadcast: ``[B, T, D]`` x ``[N, K_i, D]`` scores every item, x ``[B, N, K_i, D]`` each
        user's own candidates; ``[C, D]`` codes x ``[N, K_i, D]`` gives ``[C, N]``)."""
        n, k = items.shape[-3], items.shape[-2]
        similarity = tokens @ items.flatten(-3, -2).transpose(-1, -2)  # [..., T, N * K_i]
        return similarity.unflatten(-1, (n, k)).amax(-1) / self.temperature
