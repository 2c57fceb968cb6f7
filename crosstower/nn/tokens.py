"""The shared token substrate (methods.md §0.3): every field and history item becomes a token.

A user becomes ``[CLS_U, user field tokens..., history item tokens...]`` and an item
``[CLS_I, item field tokens...]``. Each token is its content embedding plus a learned position
(one per field, one per history slot) plus a learned side segment (``s_U`` or ``s_I``), so a
transformer over the concatenation ``[user; item]`` still knows which side and which field every
token came from. Padding (missing history) is carried by boolean masks, True for real tokens.

The cross encoder reads the concatenation, the late-interaction towers read each side alone;
building both from one substrate is what makes their token sequences, and the cross encoder's
attention blocks (user->user, user->item, item->user, item->item), line up without re-indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.nn.fields import FieldEmbedder
from crosstower.nn.tokenizers import embed_history


@dataclass
class TokenSequence:
    """Token vectors ``[..., L, d]`` and their mask ``[..., L]`` (True = a real token)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[-2]


class TokenSubstrate(nn.Module):
    """Users and items -> token sequences with positions, segments, [CLS] tokens and masks.

    History items are embedded as the sum of their item-field embeddings (the same table the item
    side uses), so a held-out user's history (protocol P2) is made of trained item tokens.
    """

    def __init__(
        self, dataset: Dataset, dim: int, max_history: int,
        user_fields: list[str] | None = None, item_fields: list[str] | None = None,
    ):
        super().__init__()
        self.dim, self.max_history = dim, max_history
        user_table = dataset.users.select(user_fields)
        self.user_fields = FieldEmbedder(user_table, dim) if user_table.fields else None
        self.item_fields = FieldEmbedder(dataset.items.select(item_fields), dim)
        self.num_user_fields = self.user_fields.num_fields if self.user_fields is not None else 0
        self.num_item_fields = self.item_fields.num_fields
        self.cls = nn.Parameter(torch.randn(2, dim) * 0.02)  # [CLS_U], [CLS_I]
        self.segments = nn.Parameter(torch.randn(2, dim) * 0.02)  # s_U, s_I
        self.user_positions = nn.Parameter(torch.randn(1 + self.num_user_fields + max_history, dim) * 0.02)
        self.item_positions = nn.Parameter(torch.randn(1 + self.num_item_fields, dim) * 0.02)

    @property
    def user_length(self) -> int:
        """Tokens per user sequence: [CLS_U], the user fields and ``max_history`` history slots."""
        return 1 + self.num_user_fields + self.max_history

    @property
    def item_length(self) -> int:
        return 1 + self.num_item_fields

    def users(self, user: UserInput) -> TokenSequence:
        """``[B, 1 + F_u + max_history]`` tokens; a shorter history is left-padded (masked)."""
        b, length = user.history.shape
        if length > self.max_history:
            raise ValueError(f"history of length {length} exceeds the substrate's max_history {self.max_history}")
        parts = [self.cls[0].expand(b, 1, -1)]
        if self.user_fields is not None:
            parts.append(self.user_fields(user.users))
        history = user.history
        if length < self.max_history:  # left-pad so the most recent item keeps its position
            history = torch.cat([history.new_full((b, self.max_history - length), -1), history], dim=1)
        mask = history >= 0
        parts.append(embed_history(self.item_fields, history) * mask.unsqueeze(-1))
        tokens = torch.cat(parts, dim=1) + self.user_positions + self.segments[0]
        full_mask = torch.cat([mask.new_ones(b, 1 + self.num_user_fields), mask], dim=1)
        return TokenSequence(tokens, full_mask)

    def items(self, items: torch.Tensor) -> TokenSequence:
        """``[N, 1 + F_i]`` tokens of the items ``items [N]``; items have no padding."""
        n = len(items)
        tokens = torch.cat([self.cls[1].expand(n, 1, -1), self.item_fields(items)], dim=1)
        tokens = tokens + self.item_positions + self.segments[1]
        return TokenSequence(tokens, torch.ones(n, self.item_length, dtype=torch.bool, device=tokens.device))
