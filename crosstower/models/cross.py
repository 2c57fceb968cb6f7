"""The all-to-all cross encoder: one transformer over ``[user tokens; item tokens]``.

Every user token (fields, history items) can attend to every item token and back, so the model can
express any user-item conjunction; the price is one transformer pass per (user, item) pair, which
is why it is a teacher and an upper bound rather than a retriever. The score is read from the
first position, ``s(u, i) = w^T h[CLS_U] + b`` (methods.md §0.3).

Its input is exactly the concatenation of the two towers' token sequences
(:class:`~crosstower.nn.tokens.TokenSubstrate`), so its attention matrix splits into the blocks
user->user, user->item, item->user and item->item with no re-indexing. The blocks can be switched
off one by one (``blocks``), and :meth:`CrossEncoder.forward_pairs` returns every layer's
attention, queries and keys with those blocks addressable: what attention distillation (VIRT,
DiDE, ERNIE-Search) needs from a teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.config import Strict
from crosstower.data.batching import TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.losses import CandidateLogits
from crosstower.models.base import AttentionModelConfig, BuildContext, Recommender
from crosstower.nn.fields import masked_mean
from crosstower.nn.tokens import TokenSequence, TokenSubstrate
from crosstower.nn.transformer import LayerTrace, TransformerEncoder

BLOCKS = ("uu", "ui", "iu", "ii")  # query side then key side: "ui" = user tokens attend to items


class AttentionBlocksConfig(Strict):
    """Which attention blocks of the cross encoder are on: query side then key side."""

    uu: bool = True  # user tokens attend to user tokens
    ui: bool = True  # user tokens attend to item tokens
    iu: bool = True  # item tokens attend to user tokens
    ii: bool = True  # item tokens attend to item tokens


class CrossConfig(AttentionModelConfig):
    """The all-to-all cross encoder: one transformer over [user tokens; item tokens]."""

    name: Literal["cross"] = "cross"  # selects the all-to-all cross encoder (one transformer pass per pair)
    layers: int = Field(2, ge=1)  # transformer layers over [user tokens; item tokens]
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields tokenised; None: every item field
    blocks: AttentionBlocksConfig = Field(default_factory=AttentionBlocksConfig)  # which attention blocks are on
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate in the transformer
    pair_chunk: int = Field(4096, ge=1)  # (user, item) pairs per transformer call in exhaustive scoring

    def build(self, dataset: Dataset, context: BuildContext) -> CrossEncoder:
        return CrossEncoder(dataset, self, context)


@dataclass
class CrossOutput:
    """What one pass over a batch of pairs computed, for scoring and for distillation."""

    scores: torch.Tensor  # [P]
    hidden: torch.Tensor  # [P, L_u + L_i, d] final token states
    mask: torch.Tensor  # [P, L_u + L_i]
    traces: list[LayerTrace] | None  # per layer: attention [P, H, L, L], queries, keys
    user_length: int

    def block(self, attention: torch.Tensor, name: str) -> torch.Tensor:
        """One attention block of a ``[..., L, L]`` map: ``"ui"`` = user queries x item keys."""
        u = self.user_length
        rows = slice(None, u) if name[0] == "u" else slice(u, None)
        cols = slice(None, u) if name[1] == "u" else slice(u, None)
        return attention[..., rows, cols]


def block_mask(user_length: int, item_length: int, blocks: dict[str, bool]) -> torch.Tensor:
    """``[L, L]`` bool: which query position may attend to which key, from the four blocks.

    A position always attends to itself, so a token whose every block is off still has a
    well-defined (identity) attention row.
    """
    side = torch.cat([torch.zeros(user_length, dtype=torch.bool), torch.ones(item_length, dtype=torch.bool)])
    allowed = torch.zeros(len(side), len(side), dtype=torch.bool)
    for name in BLOCKS:
        if blocks.get(name, True):
            query_is_item, key_is_item = name[0] == "i", name[1] == "i"
            allowed |= (side[:, None] == query_is_item) & (side[None, :] == key_is_item)
    return allowed | torch.eye(len(side), dtype=torch.bool)


class CrossEncoder(Recommender):
    def __init__(self, dataset: Dataset, config: CrossConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.substrate = TokenSubstrate(dataset, s.dim, context.history_length, context.user_fields(s.user_fields, dataset),
                                        s.item_fields)
        self.encoder = TransformerEncoder(s.dim, s.layers, s.heads, s.dropout)
        self.head = nn.Linear(s.dim, 1)
        allowed = block_mask(self.substrate.user_length, self.substrate.item_length, s.blocks.model_dump())
        # None when every block is on: the plain (faster) attention path.
        self.register_buffer("allowed", None if bool(allowed.all()) else allowed, persistent=False)

    # ---- pairs -----------------------------------------------------------------------------
    def forward_pairs(
        self, users: TokenSequence, items: TokenSequence, return_traces: bool = False
    ) -> CrossOutput:
        """Score ``P`` pairs given their token sequences ``[P, L_u, d]`` and ``[P, L_i, d]``."""
        tokens = torch.cat([users.tokens, items.tokens], dim=1)
        mask = torch.cat([users.mask, items.mask], dim=1)
        out = self.encoder(tokens, mask, return_traces=return_traces, allowed=self.allowed)
        hidden, traces = out if return_traces else (out, None)
        scores = self.head(hidden[:, 0]).squeeze(-1)
        return CrossOutput(scores, hidden, mask, traces, users.tokens.shape[1])

    def forward_candidates(self, user: UserInput, items: torch.Tensor, return_traces: bool = False) -> CrossOutput:
        """Every user ``b`` against its own candidates ``items [B, C]``: scores ``[B * C]``."""
        b, c = items.shape
        user_seq = self.substrate.users(user)
        unique, inverse = torch.unique(items.reshape(-1), return_inverse=True)
        item_seq = self.substrate.items(unique)
        # Tokenise each distinct item once; F.embedding's backward is cheap where items repeat.
        item_tokens = F.embedding(inverse, item_seq.tokens.flatten(1)).view(b * c, *item_seq.tokens.shape[1:])
        pairs_users = TokenSequence(
            user_seq.tokens.repeat_interleave(c, dim=0), user_seq.mask.repeat_interleave(c, dim=0)
        )
        pairs_items = TokenSequence(item_tokens, item_seq.mask[inverse])
        return self.forward_pairs(pairs_users, pairs_items, return_traces)

    def cross_embeddings(self, user: UserInput, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each pair's user and item embeddings read from the joint encoding (ENDX's
        cross-embeddings): the mean of the final states over the user positions and over the
        item positions, ``[P, d]`` each."""
        out = self.forward_pairs(self.substrate.users(user), self.substrate.items(items))
        u = out.user_length
        return masked_mean(out.hidden[:, :u], out.mask[:, :u]), masked_mean(out.hidden[:, u:], out.mask[:, u:])

    def cross_attention(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Each pair's last-layer attention from the user tokens to the item tokens, averaged over
        heads: ``[P, L_u, L_i]`` (rows sum to the share of attention a user token pays to the
        item side). What ERNIE-Search's token-level term distils."""
        out = self.forward_pairs(self.substrate.users(user), self.substrate.items(items), return_traces=True)
        return out.block(out.traces[-1].attention, "ui").mean(1)

    # ---- the model contract ------------------------------------------------------------------
    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Each row's item is tokenised from ``items`` itself, not deduplicated: a P4 training
        row may read its own item statistics (:func:`crosstower.nn.fields.row_values`)."""
        return self.forward_pairs(self.substrate.users(user), self.substrate.items(items)).scores

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, N]``, ``pair_chunk`` pairs per transformer call (memory grows with pairs)."""
        b, n = len(user), len(items)
        user_seq = self.substrate.users(user)
        item_seq = self.substrate.items(items)
        step = max(1, self.config.pair_chunk // max(b, 1))
        columns = []
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            pairs_users = TokenSequence(
                user_seq.tokens.repeat_interleave(hi - lo, dim=0), user_seq.mask.repeat_interleave(hi - lo, dim=0)
            )
            pairs_items = TokenSequence(item_seq.tokens[lo:hi].repeat(b, 1, 1), item_seq.mask[lo:hi].repeat(b, 1))
            columns.append(self.forward_pairs(pairs_users, pairs_items).scores.view(b, hi - lo))
        return torch.cat(columns, dim=1) if columns else item_seq.tokens.new_zeros(b, 0)

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """One transformer pass per (user, candidate) pair; in-batch negatives cost B x B more.
        With ``with_states``: ``cross``, the :class:`CrossOutput` of the positive and sampled
        pairs (final token states, every layer's attention, queries and keys; pairs in row-major
        order ``[B * (1 + K)]``, the positive first)."""
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        out = self.forward_candidates(batch.user, candidates, return_traces=with_states)
        logits = out.scores.view(candidates.shape)
        in_batch = None
        if batch.in_batch_mask is not None:
            # every user against every row's positive: B x B more transformer passes
            in_batch = self.score(batch.user, batch.positives)
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch, {"cross": out} if with_states else None)
