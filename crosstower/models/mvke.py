"""MVKE: Mixture of Virtual-Kernel Experts (Xu et al., KDD 2022), as a retrieval model.

The user side is a set of field tokens: one per user field, plus one for the history (the masked
mean of the history items' embeddings, each the sum of its item-field embeddings, shared with the
item tower) so that P2 users, known only by features and history, are represented.

* Virtual kernels ``VK [K, d]`` query the fields: ``q_k = W_Q VK_k``, ``k_f = W_K e_f``,
  ``v_f = W_V e_f``, ``alpha_{f,k} = softmax_f(k_f . q_k / sqrt(d))`` and
  ``h_{f,k} = LayerNorm(alpha_{f,k} v_f + e_f)``: each kernel gets its own re-weighted copy of
  every field, not pooled.
* Expert ``k`` (its own MLP, not shared) reads the flattened ``{h_{f,k}}_f`` and gives
  ``E_k [d]``.
* The item tower (an MLP over the item field embeddings) gives ``t [d]``; the item gates the
  experts with ``beta = softmax_k(t . VK_k)`` on the *raw* kernels.
* ``s(u, i) = sum_k beta_k(i) <E_k(u), t(i)>``.

Because the gate depends on the item alone, the score is one inner product of
``[E_1; ...; E_K]`` with ``[beta_1 t; ...; beta_K t]``: MVKE is an :class:`EmbeddingRecommender`
that trains with the inherited sampled softmax and serves through the exact (or any MIPS) index,
at ``K x`` the vector size of a two-tower model. :meth:`MVKE.mixture_score` computes the score
the paper's way (gate the experts per item, then one dot product) to check the factorisation.

Choices where the sources leave room (see ``reference/sparcode_inttower_mvke.md`` section 3):
one ``dim`` for the field tokens, the kernels and the tower outputs, because the gate dots the
item vector with the raw kernels (so ``d == d'`` by construction, no extra map); the LayerNorm
normalises the last axis (``mvke_ops.py``; the TF1 snippet's flattened LN is the other release)
with the usual unit/zero initialisation; a single objective uses all ``K`` kernels; the score
is a dot product (the code's choice, not the paper's cosine).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from crosstower.config import ModelConfig
from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.models.base import BuildContext, EmbeddingRecommender, InnerProductIndexConfig
from crosstower.nn.fields import MLP, FieldEmbedder
from crosstower.nn.tokenizers import user_field_tokens

KERNEL_INIT_STD = 0.01  # the released code's N(0, 0.01) for the kernels and the Q/K/V maps


class MVKEConfig(ModelConfig):
    """MVKE: K virtual kernels attend over the user fields, one expert per kernel, item-gated.

    One ``dim`` serves the field tokens, the kernels and both towers' outputs: the item gate
    dots the item vector with the raw kernels, so the two must have the same size.
    """

    name: Literal["mvke"] = "mvke"  # selects MVKE (mixture of virtual-kernel experts)
    kernels: int = Field(3, ge=1)  # K: virtual kernels, one expert each (served vectors are K x dim wide)
    dim: int = Field(64, ge=1)  # width of the field tokens, the kernels and both towers' outputs
    expert_hidden: list[int] = Field(default_factory=lambda: [128])  # hidden layer widths of each expert's MLP
    item_hidden: list[int] = Field(default_factory=lambda: [128])  # hidden layer widths of the item tower's MLP
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields to embed; None: every item field
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate after each hidden layer of the experts and the item tower
    index: InnerProductIndexConfig = Field(default_factory=InnerProductIndexConfig)  # how the item vectors are served

    def build(self, dataset: Dataset, context: BuildContext) -> MVKE:
        return MVKE(dataset, self, context)


class KernelAttention(nn.Module):
    """The VKE bottom layer: ``[B, F, d]`` field tokens -> ``[B, F, K, d]`` per-kernel tokens."""

    def __init__(self, num_kernels: int, dim: int):
        super().__init__()
        self.kernels = nn.Parameter(torch.randn(num_kernels, dim) * KERNEL_INIT_STD)
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, std=KERNEL_INIT_STD)
            nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(dim)

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """``alpha [B, F, K]``: for each kernel, a softmax over the fields."""
        queries = self.query(self.kernels)  # [K, d]
        logits = torch.einsum("bfd,kd->bfk", self.key(tokens), queries) / math.sqrt(tokens.shape[-1])
        return logits.softmax(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        alpha = self.weights(tokens)
        mixed = alpha.unsqueeze(-1) * self.value(tokens).unsqueeze(2)  # [B, F, K, d]
        return self.norm(mixed + tokens.unsqueeze(2))


class MVKE(EmbeddingRecommender):
    def __init__(self, dataset: Dataset, config: MVKEConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.use_history = context.users_have_history  # False under P3 (the evaluated users have none)
        self.item_fields = FieldEmbedder(dataset.items.select(s.item_fields), s.dim)
        user_table = dataset.users.select(context.user_fields(s.user_fields, dataset))
        self.user_fields = FieldEmbedder(user_table, s.dim) if user_table.fields else None
        num_fields = (self.user_fields.num_fields if self.user_fields else 0) + int(self.use_history)
        if num_fields == 0:
            raise ConfigError("model: MVKE's user side has no field (no history and no user field besides user_id)")
        self.attention = KernelAttention(s.kernels, s.dim)
        self.experts = nn.ModuleList(
            MLP([num_fields * s.dim, *s.expert_hidden, s.dim], s.dropout) for _ in range(s.kernels)
        )
        self.item_tower = MLP([self.item_fields.num_fields * s.dim, *s.item_hidden, s.dim], s.dropout)

    # ---------------------------------------------------------------------------- user side

    def user_tokens(self, user: UserInput) -> torch.Tensor:
        """``[B, F, d]``: the user field tokens, then the mean-history token (zeros if empty)."""
        return user_field_tokens(self.user_fields, self.item_fields, user, self.use_history, self.config.dim)

    def expert_vectors(self, user: UserInput) -> torch.Tensor:
        """``[B, K, d]``: expert ``k`` reads kernel ``k``'s re-weighted copy of every field."""
        hidden = self.attention(self.user_tokens(user))  # [B, F, K, d]
        return torch.stack([expert(hidden[:, :, k].flatten(1)) for k, expert in enumerate(self.experts)], dim=1)

    # ---------------------------------------------------------------------------- item side

    def item_vector(self, items: torch.Tensor) -> torch.Tensor:
        """``t [N, d]``: the item tower's output, which both gates and scores."""
        return self.item_tower(self.item_fields(items).flatten(1))

    def gate(self, item_vector: torch.Tensor) -> torch.Tensor:
        """``beta [N, K]``: softmax over kernels of ``t . VK_k`` (raw kernels, no projection)."""
        return (item_vector @ self.attention.kernels.T).softmax(dim=-1)

    # ---------------------------------------------------------------------------- scores

    def encode_users(self, user: UserInput) -> torch.Tensor:
        """``[B, K * d]``: the experts' vectors side by side."""
        return self.expert_vectors(user).flatten(1)

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        """``[N, K * d]``: ``[beta_1 t; ...; beta_K t]``, so one inner product is the mixture."""
        t = self.item_vector(items)
        return (self.gate(t).unsqueeze(-1) * t.unsqueeze(1)).flatten(1)

    def mixture_score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` the paper's way: per item, ``u = sum_k beta_k E_k``, then ``<u, t>``.

        Materialises one gated user vector per (user, item) pair, so it is for checking the
        factorised :meth:`score` on small inputs, not for ranking a catalogue.
        """
        experts = self.expert_vectors(user)  # [B, K, d]
        t = self.item_vector(items)  # [N, d]
        gated_users = torch.einsum("nk,bkd->bnd", self.gate(t), experts)
        return (gated_users * t.unsqueeze(0)).sum(-1)
