"""The transformer dual encoder (methods.md §0.3 "Towers"): the student that shows its tokens.

Each side's substrate tokens (:class:`~crosstower.nn.tokens.TokenSubstrate`, the very sequences
the cross encoder concatenates) go through that side's transformer; the pooled vectors are
``e_u = W_u h_u[CLS]`` and ``e_i = W_i h_i[CLS]``, scored by their inner product (or cosine over
a temperature), so it is served by MIPS like DSSM. Unlike DSSM it keeps every token state, and
with ``with_states`` its candidate logits return them: what a distiller reads from its student
(ERNIE-Search's late-interaction head over the same tower pass; attention distillation's
queries and keys, layer by layer).

With ``adapted_interaction`` (VIRT's adapted interaction, methods.md §5) a pair is scored after
one light exchange: each side's [CLS] attends to the other side's final token states through the
last layer's virtual cross attention (its own queries against the other tower's keys, averaged
over heads), ``h~_u = A_ui[CLS] H_i`` and ``h~_i = A_iu[CLS] H_u``, and the score is the inner
product of ``W'_u [h_u ; h~_u]`` and ``W'_i [h_i ; h~_i]``. The item side then depends on the
user, so nothing can be indexed: it is a pre-ranking scorer (protocol P4) that stores each
item's final token states and costs ``O(L_u L_i dim)`` per pair; VIRT distils the very attention
it reads.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.data.batching import PointwiseBatch, TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.losses import CandidateLogits, PairLogits
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
    # VIRT's adapted interaction: [CLS] of each side attends to the other's final states before
    # the score (a pre-ranking scorer, protocol p4 only: nothing can be indexed)
    adapted_interaction: bool = False

    def check_run(self, run) -> None:
        if self.adapted_interaction and run.split.protocol != "p4":
            raise ValueError("model.adapted_interaction: each pair is scored through the other side's token "
                             "states, which no index can serve; it is for pre-ranking (split.protocol: p4)")

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
        if s.adapted_interaction:
            self.adapted_user_head = nn.Linear(2 * s.dim, s.output_dim)
            self.adapted_item_head = nn.Linear(2 * s.dim, s.output_dim)

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
        return self._scaled(head(states.tokens[:, 0]))

    def _scaled(self, vector: torch.Tensor) -> torch.Tensor:
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
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        states = self._candidate_states(batch.user, candidates)
        users, vectors = states["user_vectors"], states["item_vectors"]
        logits = torch.einsum("bd,bcd->bc", users, vectors)
        in_batch = users @ vectors[:, 0].T if batch.in_batch_mask is not None else None
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch, states)

    def _candidate_states(self, user: UserInput, candidates: torch.Tensor) -> dict:
        """Both towers' passes over each user and its candidates ``[B, C]`` (each distinct item
        once), or its one item ``[B]`` (the states then say ``C = 1``): the pooled vectors, the token states and the per-layer traces (see
        :meth:`candidate_logits`)."""
        user_seq, user_traces = self._user_pass(user)
        users = self._user_with_prior(self._pool(self.user_head, user_seq))
        if candidates.dim() == 1:  # one item per row, encoded from this very tensor: P4's per-row values follow it
            unique, inverse = candidates, torch.arange(len(candidates), device=candidates.device)
            candidates = candidates[:, None]
        else:
            unique, inverse = torch.unique(candidates.reshape(-1), return_inverse=True)
        item_seq, item_traces = self._item_pass(unique)
        vectors = F.embedding(inverse, self._item_with_prior(self._pool(self.item_head, item_seq), unique))
        tokens = F.embedding(inverse, item_seq.tokens.flatten(1)).view(*candidates.shape, *item_seq.tokens.shape[1:])
        return {"user_vectors": users, "item_vectors": vectors.view(*candidates.shape, -1), "user_states": user_seq,
                "item_states": tokens, "item_mask": item_seq.mask[inverse].view(*candidates.shape, -1),
                "user_traces": user_traces, "item_traces": item_traces, "item_rows": inverse.view(candidates.shape),
                "candidates": candidates}

    # ---- pre-ranking (P4) ----------------------------------------------------------------------
    def pair_logits(self, batch: PointwiseBatch, with_states: bool = False) -> PairLogits:
        """Each labelled row's logit (adapted when ``adapted_interaction``); ``with_states`` adds
        the states of :meth:`candidate_logits` with one candidate per row, the row's item."""
        if not (with_states or self.config.adapted_interaction):
            return super().pair_logits(batch)
        states = self._candidate_states(batch.user, batch.items)
        if self.config.adapted_interaction:
            logits = self._adapted_scores(states)
        else:
            logits = (states["user_vectors"] * states["item_vectors"][:, 0]).sum(-1)
        return PairLogits(logits, states if with_states else {})

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        if not self.config.adapted_interaction:
            return super().score_pairs(user, items)
        return self._adapted_scores(self._candidate_states(user, items))

    def _adapted_scores(self, states: dict) -> torch.Tensor:
        """VIRT's adapted interaction on the one candidate per row of ``states``: each [CLS]
        reads the other side's final states through the last layer's virtual cross attention."""
        user_seq, rows = states["user_states"], states["item_rows"][:, 0]
        item_tokens, item_mask = states["item_states"][:, 0], states["item_mask"][:, 0]
        user_trace, item_trace = states["user_traces"][-1], states["item_traces"][-1]
        user_reads = _cls_attention(user_trace.queries, item_trace.keys[rows], item_mask)  # [B, L_i]
        item_reads = _cls_attention(item_trace.queries[rows], user_trace.keys, user_seq.mask)  # [B, L_u]
        user_cls, item_cls = user_seq.tokens[:, 0], item_tokens[:, 0]
        user = torch.cat([user_cls, torch.einsum("bj,bjd->bd", user_reads, item_tokens)], dim=-1)
        item = torch.cat([item_cls, torch.einsum("bj,bjd->bd", item_reads, user_seq.tokens)], dim=-1)
        logits = (self._scaled(self.adapted_user_head(user)) * self._scaled(self.adapted_item_head(item))).sum(-1)
        return logits if self.bias is None else logits + self.bias(states["candidates"][:, 0]).squeeze(-1)


def _cls_attention(queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The [CLS] query's attention over the other side's tokens, averaged over heads: ``queries
    [B, H, L_q, d_h]`` (position 0 is [CLS]) against ``keys [B, H, L_k, d_h]``, padded keys
    (``key_mask [B, L_k]`` False) at probability 0 -> ``[B, L_k]``. [CLS] keys are always real."""
    logits = torch.einsum("bhd,bhkd->bhk", queries[:, :, 0], keys) / queries.shape[-1] ** 0.5
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=1)
