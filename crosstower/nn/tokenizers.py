"""Tokenizers: a user (side features + history) or an item (side features) -> a few token vectors.

SparCode scores ``sum_k E(T_k(user), item)``: the user side must become ``K_u`` token vectors
that are later quantised into codes, and the item side ``K_i`` tokens that the interaction
encoder reads. Two user tokenizers follow the paper's variants:

* :class:`DNNTokenizer`: masked mean of the history's item embeddings, concatenated with the
  user field embeddings, through an MLP, then ``K_u`` linear heads.
* :class:`SATokenizer`: a transformer over ``K_u`` query tokens, one token per user field and one
  per history item (with positions); the query tokens' outputs are the user tokens. Each query
  token is a learned vector plus a linear map of the DNN tokenizer's input (the field tokens and
  the mean history token): measured on the synthetic default, learned queries alone left the
  tokenizer at popularity level (val Recall@50 0.18 after 800 steps, 0.27 with the summary).

Both take ``from_history``: instead of ``K_u`` tokens that summarise the whole user, emit one
token per recent history item (the last ``K_u`` of them), each read in the context of the user:
the DNN tokenizer maps [user fields; mean history; that item] through its MLP, the SA tokenizer
returns its encoder's output at that item's position. Why: a user's interests are several
distinct groups of items; with one token per history item the interaction encoder can score an
item against each of them separately, as a cross encoder's item attends to each history item,
while each token still carries only (user context, one item) and so quantises into few codes.
Users with a shorter history have fewer tokens: :meth:`tokenize` returns the mask of the real
ones, and a user without history has none (every score 0). Measured on the synthetic default
(docs/results.md): history tokens help the DNN tokenizer (all-to-all test Recall@50 0.4155, 1.15x
its two-tower model) but not the SA tokenizer, whose outputs at history positions learned worse
than its query tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.nn.fields import MLP, FieldEmbedder, masked_mean
from crosstower.nn.transformer import TransformerEncoder


def embed_history(items: FieldEmbedder, history: torch.Tensor) -> torch.Tensor:
    """History item tokens ``[B, L, d]`` (sum of each item's field embeddings).

    Each distinct item is embedded once and gathered with ``F.embedding``, whose backward is much
    cheaper than advanced indexing when histories repeat items.
    """
    unique, inverse = torch.unique(history.clamp_min(0), return_inverse=True)
    return F.embedding(inverse, items(unique).sum(-2))


def recent_history_mask(user: UserInput, num_tokens: int) -> torch.Tensor:
    """``[B, num_tokens]``: whether each of the last ``num_tokens`` history slots holds an item
    (histories are right-aligned, so padding is on the left)."""
    mask = user.history_mask[:, -num_tokens:]
    return F.pad(mask, (num_tokens - mask.shape[1], 0), value=False)


def recent_history_slots(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The last ``num_tokens`` positions of ``tokens [B, L, d]``, left-padded with zeros when ``L``
    is shorter (aligned with :func:`recent_history_mask`)."""
    tail = tokens[:, -num_tokens:] if tokens.shape[1] else tokens
    return F.pad(tail, (0, 0, num_tokens - tail.shape[1], 0))


def user_field_tokens(
    user_fields: FieldEmbedder | None, item_fields: FieldEmbedder, user: UserInput, use_history: bool, dim: int
) -> torch.Tensor:
    """``[B, F_u (+ 1), dim]``: one token per user field, then (``use_history``) the masked mean of
    the history items' embeddings, so a user known only by features and history (P2) is
    represented. An empty or zero-length history gives a zero token (the field embedder cannot
    embed an empty index, e.g. with ``train.history_length: 0``)."""
    tokens = [user_fields(user.users)] if user_fields is not None else []
    if use_history:
        if user.history.shape[1] == 0:
            tokens.append(torch.zeros(user.users.shape[0], 1, dim, device=user.users.device))
        else:
            tokens.append(masked_mean(embed_history(item_fields, user.history), user.history_mask).unsqueeze(1))
    return torch.cat(tokens, dim=1)


class DNNTokenizer(nn.Module):
    def __init__(
        self, user_fields: FieldEmbedder | None, item_fields: FieldEmbedder, dim: int,
        num_tokens: int, hidden: list[int], dropout: float = 0.0, from_history: bool = False,
    ):
        super().__init__()
        self.user_fields, self.item_fields, self.num_tokens, self.dim = user_fields, item_fields, num_tokens, dim
        self.from_history = from_history
        in_dim = (user_fields.num_fields * dim if user_fields is not None else 0) + dim
        # The last layer is the K_u heads: one linear map to K_u * dim, viewed as K_u tokens;
        # from the history, one token per item, from [user; the item].
        self.mlp = MLP([in_dim + dim, *hidden, dim] if from_history else [in_dim, *hidden, num_tokens * dim], dropout)

    def forward(self, user: UserInput) -> torch.Tensor:
        """``[B, K_u, dim]`` user tokens."""
        return self.tokenize(user)[0]

    def tokenize(self, user: UserInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """User tokens ``[B, K_u, dim]`` and, from the history, which of them are real ``[B, K_u]``."""
        history = embed_history(self.item_fields, user.history)
        parts = [masked_mean(history, user.history_mask)]
        if self.user_fields is not None:
            parts.insert(0, self.user_fields(user.users).flatten(1))
        summary = torch.cat(parts, dim=-1)
        if not self.from_history:
            return self.mlp(summary).view(-1, self.num_tokens, self.dim), None
        items = recent_history_slots(history, self.num_tokens)
        context = summary.unsqueeze(1).expand(-1, self.num_tokens, -1)
        return self.mlp(torch.cat([context, items], dim=-1)), recent_history_mask(user, self.num_tokens)


class SATokenizer(nn.Module):
    def __init__(
        self, user_fields: FieldEmbedder | None, item_fields: FieldEmbedder, dim: int, num_tokens: int,
        max_history: int, layers: int = 2, heads: int = 2, dropout: float = 0.0, from_history: bool = False,
    ):
        super().__init__()
        self.user_fields, self.item_fields, self.num_tokens = user_fields, item_fields, num_tokens
        self.from_history = from_history
        # From the history, one summary query stays in the sequence: it is the position every
        # user has, so attention never sees a row of padding only.
        self.queries = nn.Parameter(torch.randn(1 if from_history else num_tokens, dim) * 0.02)
        num_fields = user_fields.num_fields if user_fields is not None else 0
        self.field_positions = nn.Parameter(torch.randn(max(num_fields, 1), dim) * 0.02)
        self.history_positions = nn.Parameter(torch.randn(max(max_history, 1), dim) * 0.02)
        self.encoder = TransformerEncoder(dim, layers, heads, dropout)
        # The query tokens start from a pooled summary of the user (field tokens and the mean
        # history token, as the DNN tokenizer reads them), so attention refines a useful
        # representation instead of having to find one from near-uniform weights.
        self.summary = nn.Linear(num_fields * dim + dim, dim)

    def forward(self, user: UserInput) -> torch.Tensor:
        """``[B, K_u, dim]`` user tokens."""
        return self.tokenize(user)[0]

    def tokenize(self, user: UserInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """User tokens ``[B, K_u, dim]``: the encoder's outputs at the query positions, or (from
        the history) at the last ``K_u`` history positions with the mask of the real ones."""
        b, length = user.history.shape
        num_queries = self.queries.shape[0]
        tokens, masks, summary = [], [torch.ones(b, num_queries, dtype=torch.bool, device=user.users.device)], []
        if self.user_fields is not None:
            fields = self.user_fields(user.users)
            tokens.append(fields + self.field_positions)
            masks.append(torch.ones(b, self.user_fields.num_fields, dtype=torch.bool, device=user.users.device))
            summary.append(fields.flatten(1))
        if length:
            history = embed_history(self.item_fields, user.history)
            tokens.append(history + self.history_positions[-length:])
            masks.append(user.history_mask)
            summary.append(masked_mean(history, user.history_mask))
        else:
            summary.append(self.queries.new_zeros(b, self.queries.shape[1]))
        queries = self.queries + self.summary(torch.cat(summary, dim=1)).unsqueeze(1)
        hidden = self.encoder(torch.cat([queries, *tokens], dim=1), torch.cat(masks, dim=1))
        if not self.from_history:
            return hidden[:, : self.num_tokens], None
        history_part = hidden[:, hidden.shape[1] - length :]
        return recent_history_slots(history_part, self.num_tokens), recent_history_mask(user, self.num_tokens)


class ItemTokenizer(nn.Module):
    """Item fields -> MLP -> ``K_i`` linear projections: ``[N, K_i, dim]`` item tokens."""

    def __init__(self, item_fields: FieldEmbedder, dim: int, num_tokens: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.item_fields, self.num_tokens, self.dim = item_fields, num_tokens, dim
        self.mlp = MLP([item_fields.num_fields * dim, *hidden, num_tokens * dim], dropout)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.item_fields(items).flatten(1)).view(len(items), self.num_tokens, self.dim)
