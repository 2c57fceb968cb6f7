"""The transformer dual encoder (methods.md §0.3 "Towers"): the student that shows its tokens.

Each side's substrate tokens (:class:`~crosstower.nn.tokens.TokenSubstrate`, the very sequences
the cross encoder concatenates) go through that side's transformer; the pooled vectors are
``e_u = W_u h_u[CLS]`` and ``e_i = W_i h_i[CLS]``, scored by their inner product (or cosine over
a temperature), so it is served by MIPS like DSSM. Unlike DSSM it keeps every token state, and
with ``with_states`` its candidate logits return them: what a distiller reads from its student
(ERNIE-Search's late-interaction head over the same tower pass; attention distillation's
queries and keys, layer by layer).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.data.batching import TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.losses import CandidateLogits
from crosstower.models.base import (
    AttentionModelConfig,
    BuildContext,
    EmbeddingRecommender,
    InnerProductIndexConfig,
    item_prior,
)
from crosstower.nn.tokens import TokenSequence, TokenSubstrate
from crosstower.nn.transformer import LayerTrace, TransformerEncoder


class DualEncoderConfig(AttentionModelConfig):
    """Two transformer towers over the substrate's tokens, pooled at [CLS], one inner product."""

    name: Literal["dual"] = "dual"  # selects the transformer dual encoder
    output_dim: int = Field(64, ge=1)  # D, the served vector
    user_layers: int = Field(2, ge=1)  # transformer layers of the user tower
    item_layers: int = Field(1, ge=1)  # transformer layers of the item tower
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields tokenised; None: every item field
    similarity: Literal["cosine", "dot"] = "cosine"  # cosine: L2-normalise both pooled vectors first; dot: as they are
    temperature: float = Field(0.05, gt=0)  # logits = similarity / temperature
    item_bias: bool = False  # add a learned per-item prior to the score (served as one more dimension)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate in the towers' transformers
    index: InnerProductIndexConfig = Field(default_factory=InnerProductIndexConfig)  # how the item vectors are served

    def build(self, dataset: Dataset, context: BuildContext) -> DualEncoder:
        return DualEncoder(dataset, self, context)


class DualEncoder(EmbeddingRecommender):
    def __init__(self, dataset: Dataset, config: DualEncoderConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.substrate = TokenSubstrate(dataset, s.dim, context.history_length,
                                        context.user_fields(s.user_fields, dataset), s.item_fields)
        self.user_encoder = TransformerEncoder(s.dim, s.user_layers, s.heads, s.dropout)
        self.item_encoder = TransformerEncoder(s.dim, s.item_layers, s.heads, s.dropout)
        self.user_head = nn.Linear(s.dim, s.output_dim)
        self.item_head = nn.Linear(s.dim, s.output_dim)
        self.scale = 1.0 / s.temperature
        self.bias = item_prior(dataset.num_items, s.item_bias)

    # ---- token states ------------------------------------------------------------------------
    def user_states(self, user: UserInput) -> TokenSequence:
        """The user tower's final token states ``[B, L_u, dim]`` ([CLS_U] first) and mask."""
        return self._user_pass(user)[0]

    def item_states(self, items: torch.Tensor) -> TokenSequence:
        """The item tower's final token states ``[N, L_i, dim]`` ([CLS_I] first) and mask."""
        return self._item_pass(items)[0]

    def _user_pass(self, user: UserInput) -> tuple[TokenSequence, list[LayerTrace]]:
        """The user tower's states and each layer's attention, queries and keys (kept anyway)."""
        seq = self.substrate.users(user)
        states, traces = self.user_encoder(seq.tokens, seq.mask, return_traces=True)
        return TokenSequence(states, seq.mask), traces

    def _item_pass(self, items: torch.Tensor) -> tuple[TokenSequence, list[LayerTrace]]:
        seq = self.substrate.items(items)
        states, traces = self.item_encoder(seq.tokens, seq.mask, return_traces=True)
        return TokenSequence(states, seq.mask), traces

    def _pool(self, head: nn.Linear, states: TokenSequence) -> torch.Tensor:
        vector = head(states.tokens[:, 0])
        if self.config.similarity == "cosine":
            vector = F.normalize(vector, dim=-1)
        return vector * math.sqrt(self.scale)  # the scale split over both sides: <u, i> = sim / tau

    # ---- the model contract ------------------------------------------------------------------
    def encode_users(self, user: UserInput) -> torch.Tensor:
        return self._user_with_prior(self._pool(self.user_head, self.user_states(user)))

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        return self._item_with_prior(self._pool(self.item_head, self.item_states(items)), items)

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """As every inner-product model's; ``with_states`` adds the token states: ``user_states``
        (a TokenSequence ``[B, L_u, dim]``) and the candidates' ``item_states`` ``[B, 1 + K,
        L_i, dim]`` with ``item_mask``, the positive first; and each tower's per-layer traces
        (attention, queries, keys): ``user_traces`` over the B users, ``item_traces`` over the
        distinct candidates, ``item_rows [B, 1 + K]`` the row of each candidate in them."""
        if not with_states:
            return super().candidate_logits(batch)
        user_seq, user_traces = self._user_pass(batch.user)
        users = self._user_with_prior(self._pool(self.user_head, user_seq))
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        unique, inverse = torch.unique(candidates.reshape(-1), return_inverse=True)
        item_seq, item_traces = self._item_pass(unique)
        vectors = F.embedding(inverse, self._item_with_prior(self._pool(self.item_head, item_seq), unique))
        vectors = vectors.view(*candidates.shape, -1)
        logits = torch.einsum("bd,bcd->bc", users, vectors)
        in_batch = users @ vectors[:, 0].T if batch.in_batch_mask is not None else None
        tokens = F.embedding(inverse, item_seq.tokens.flatten(1)).view(*candidates.shape, *item_seq.tokens.shape[1:])
        states = {"user_vectors": users, "item_vectors": vectors, "user_states": user_seq,
                  "item_states": tokens, "item_mask": item_seq.mask[inverse].view(*candidates.shape, -1),
                  "user_traces": user_traces, "item_traces": item_traces, "item_rows": inverse.view(candidates.shape)}
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch, states)
