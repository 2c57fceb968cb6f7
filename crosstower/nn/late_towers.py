"""The late-interaction token towers (methods.md §8): each side encoded alone, one vector per token.

Each side's substrate tokens (:class:`~crosstower.nn.tokens.TokenSubstrate`) go through that
side's transformer; every output state is projected by one shared map ``W_c`` and L2-normalised.
The user side may append learned expansion tokens (ColBERT's [MASK] augmentation); the item
side drops its [CLS] unless asked to keep it.

Two models read these towers: ColBERT-style late interaction scores them with MaxSim
(:mod:`crosstower.models.late_interaction`), and SparCode's ``late`` tokenizer quantises the user
side's vectors into codes (:mod:`crosstower.models.sparcode`). One module, so that both train
exactly the same token vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.nn.tokens import TokenSequence, TokenSubstrate
from crosstower.nn.transformer import TransformerEncoder


class LateTowers(nn.Module):
    def __init__(
        self, dataset: Dataset, dim: int, projection_dim: int, max_history: int, user_layers: int, item_layers: int,
        heads: int, dropout: float = 0.0, user_fields: list[str] | None = None, item_fields: list[str] | None = None,
        expansion_tokens: int = 0, item_cls: bool = False,
    ):
        super().__init__()
        self.item_cls = item_cls
        self.substrate = TokenSubstrate(dataset, dim, max_history, user_fields, item_fields)
        self.user_encoder = TransformerEncoder(dim, user_layers, heads, dropout)
        self.item_encoder = TransformerEncoder(dim, item_layers, heads, dropout)
        self.expansion = nn.Parameter(torch.randn(expansion_tokens, dim) * 0.02)
        self.projection = nn.Linear(dim, projection_dim, bias=False)

    @property
    def user_length(self) -> int:
        """Vectors per user: the substrate's user sequence and the expansion tokens."""
        return self.substrate.user_length + self.expansion.shape[0]

    def users(self, user: UserInput) -> TokenSequence:
        """Normalised user token vectors ``[B, L_u (+ expansion), m]`` and their mask."""
        return self.encode_users(user)[1]

    def items(self, items: torch.Tensor) -> TokenSequence:
        """Normalised item token vectors ``[N, L_i, m]`` (the [CLS] dropped unless ``item_cls``)."""
        return self.encode_items(items)[1]

    def encode_users(self, user: UserInput) -> tuple[torch.Tensor, TokenSequence]:
        """The user tower's final states ``[B, L_u (+ expansion), dim]`` ([CLS_U] first) and the
        normalised token vectors of :meth:`users`."""
        seq = self.substrate.users(user)
        tokens, mask = seq.tokens, seq.mask
        expansion = self.expansion.shape[0]
        if expansion:
            b = user.users.shape[0]  # a tensor size, not len(): the graph exports with any batch
            tokens = torch.cat([tokens, self.expansion.expand(b, -1, -1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, expansion)], dim=1)
        hidden = self.user_encoder(tokens, mask)
        return hidden, TokenSequence(F.normalize(self.projection(hidden), dim=-1), mask)

    def encode_items(self, items: torch.Tensor) -> tuple[torch.Tensor, TokenSequence]:
        """The item tower's final states ``[N, L_i, dim]`` ([CLS_I] first) and the normalised
        token vectors of :meth:`items`."""
        seq = self.substrate.items(items)
        hidden = self.item_encoder(seq.tokens, seq.mask)
        start = 0 if self.item_cls else 1
        return hidden, TokenSequence(F.normalize(self.projection(hidden[:, start:]), dim=-1), seq.mask[:, start:])


class LateUserTokenizer(nn.Module):
    """The user tower as a SparCode tokenizer: ``tokenize`` gives the token vectors and the mask
    of the real ones (padding history slots are not real)."""

    def __init__(self, towers: LateTowers):
        super().__init__()
        self.towers = towers

    def forward(self, user: UserInput) -> torch.Tensor:
        return self.tokenize(user)[0]

    def tokenize(self, user: UserInput) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.towers.users(user)
        return seq.tokens, seq.mask


class LateItemTokenizer(nn.Module):
    """The item tower as a SparCode item tokenizer: ``[N, L_i, m]`` (items have no padding)."""

    def __init__(self, towers: LateTowers):
        super().__init__()
        self.towers = towers

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.towers.items(items).tokens
