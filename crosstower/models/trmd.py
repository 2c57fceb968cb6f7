"""The TRMD student (Choi et al. 2021; methods.md §4): one tower pair, two rankers.

Users and items are encoded apart by the late-interaction towers
(:class:`~crosstower.nn.late_towers.LateTowers`), and two rankers read them:

- ranker 1, the cross encoder's shape: a pseudo-joint [CLS] ``c = W_res m + m`` from the
  element-wise max ``m = max(h_u[CLS], h_i[CLS])`` of the two towers' [CLS] states, scored
  ``s1 = w_1 . dropout(c) + b_1``;
- ranker 2, late interaction's: MaxSim over the projected, L2-normalised token vectors, ``s2``.

The score is ``s1 + s2``. It is not an inner product, so no MIPS index serves it: the model
is served by the late-interaction token index, whose candidates are re-scored with both rankers
exactly (:class:`~crosstower.index.TwoRankerIndex`; ranker 1 folds at inference into
``a . m + c`` with ``a = W_res^T w_1 + w_1``, O(D) per pair), and stores ``L_i x m`` numbers
plus a ``D``-wide [CLS] state per item. Trained alone it is a late-interaction model with a
second head; :mod:`crosstower.distill.trmd` trains it against a cross encoder's [CLS] state and
a late-interaction model's token vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.data.batching import PointwiseBatch, TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.index import TwoRankerIndex, TwoRankerQuery
from crosstower.losses import CandidateLogits, PairLogits
from crosstower.models.base import AttentionModelConfig, BuildContext, ItemRangeScorer, Recommender
from crosstower.models.late_interaction import LateInteractionIndexConfig
from crosstower.nn.late_towers import LateTowers
from crosstower.nn.maxsim import maxsim, maxsim_pairs
from crosstower.nn.tokens import TokenSequence

log = logging.getLogger("crosstower.trmd")

ITEM_SLICE = 512  # items per scoring call in exhaustive ranking: memory grows with B x N x (L_u L_i + D)


class TRMDConfig(AttentionModelConfig):
    """TRMD's student: late-interaction towers read by a [CLS]-max ranker and a MaxSim ranker."""

    name: Literal["trmd"] = "trmd"  # selects the TRMD student (two rankers; served by the token index + exact re-scoring)
    projection_dim: int = Field(32, ge=1)  # m: the stored size of every token vector
    user_layers: int = Field(2, ge=1)  # transformer layers of the user tower
    item_layers: int = Field(1, ge=1)  # transformer layers of the item tower
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields tokenised; None: every item field
    expansion_tokens: int = Field(0, ge=0)  # learned extra user tokens for MaxSim (as late interaction's)
    ranker_dropout: float = Field(0.1, ge=0, lt=1)  # dropout on the pseudo-joint [CLS] before ranker 1
    temperature: float = Field(1.0, gt=0)  # logits = (s1 + s2) / temperature
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate in the towers' transformers
    index: LateInteractionIndexConfig = Field(default_factory=LateInteractionIndexConfig)  # candidate search

    def build(self, dataset: Dataset, context: BuildContext) -> TRMDStudent:
        return TRMDStudent(dataset, self, context)


@dataclass
class Encoded:
    """One side encoded: normalised token vectors (MaxSim) and the [CLS] state ``[N, D]``."""

    tokens: TokenSequence
    cls: torch.Tensor


class TRMDStudent(Recommender):
    def __init__(self, dataset: Dataset, config: TRMDConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.towers = LateTowers(dataset, s.dim, s.projection_dim, context.history_length, s.user_layers,
                                 s.item_layers, s.heads, s.dropout, context.user_fields(s.user_fields, dataset),
                                 s.item_fields, s.expansion_tokens)
        self.residual = nn.Linear(s.dim, s.dim)  # W_res
        self.ranker = nn.Linear(s.dim, 1)  # w_1, b_1
        self.ranker_dropout = nn.Dropout(s.ranker_dropout)

    # ---- the two sides -----------------------------------------------------------------------
    def encode_users(self, user: UserInput) -> Encoded:
        hidden, tokens = self.towers.encode_users(user)
        return Encoded(tokens, hidden[:, 0])

    def encode_items(self, items: torch.Tensor) -> Encoded:
        hidden, tokens = self.towers.encode_items(items)
        return Encoded(tokens, hidden[:, 0])

    def pseudo_cls(self, user_cls: torch.Tensor, item_cls: torch.Tensor) -> torch.Tensor:
        """``c = W_res m + m``, ``m = max(h_u, h_i)`` element-wise (shapes broadcast)."""
        joint = torch.maximum(user_cls, item_cls)
        return self.residual(joint) + joint

    def first_ranker(self, pseudo_cls: torch.Tensor) -> torch.Tensor:
        return self.ranker(self.ranker_dropout(pseudo_cls)).squeeze(-1)

    def folded_ranker(self) -> torch.Tensor:
        """``[a; c]`` with ``s1 = a . m + c`` at inference (no dropout): ``a = W_res^T w_1 + w_1``,
        ``c = w_1 . b_res + b_1``."""
        w = self.ranker.weight[0]
        a = self.residual.weight.T @ w + w
        return torch.cat([a, (w @ self.residual.bias)[None] + self.ranker.bias])

    # ---- the model contract ------------------------------------------------------------------
    def _scores(self, user: Encoded, items: Encoded) -> torch.Tensor:
        """``[B, N]`` every user against every item; out of training, ranker 1 folded (one
        ``D``-wide product per pair instead of ``W_res``'s ``D x D``)."""
        joint_shape = (user.cls[:, None, :], items.cls[None, :, :])
        if self.training:
            first = self.first_ranker(self.pseudo_cls(*joint_shape))
        else:
            folded = self.folded_ranker()
            first = torch.maximum(*joint_shape) @ folded[:-1] + folded[-1]
        return first + maxsim(user.tokens, items.tokens)

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        encoded = self.encode_users(user)
        return torch.cat([self._scores(encoded, self.encode_items(part)) for part in items.split(ITEM_SLICE)]
                         or [encoded.cls.new_zeros(len(user), 0)], dim=1)

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        users, encoded = self.encode_users(user), self.encode_items(items)
        pairs = TokenSequence(encoded.tokens.tokens[:, None], encoded.tokens.mask[:, None])
        return self.first_ranker(self.pseudo_cls(users.cls, encoded.cls)) + maxsim_pairs(users.tokens, pairs)[:, 0]

    def pair_logits(self, batch: PointwiseBatch, with_states: bool = False) -> PairLogits:
        """``s1 + s2`` of each labelled row (as :meth:`score_pairs`); ``with_states`` adds the
        states of :meth:`candidate_logits` with the row's item as the one candidate."""
        users, items = self.encode_users(batch.user), self.encode_items(batch.items)
        pairs = TokenSequence(items.tokens.tokens[:, None], items.tokens.mask[:, None])
        pseudo = self.pseudo_cls(users.cls, items.cls)
        logits = self.first_ranker(pseudo) + maxsim_pairs(users.tokens, pairs)[:, 0]
        states = {}
        if with_states:
            states = {"user_tokens": users.tokens, "item_tokens": pairs.tokens, "item_mask": pairs.mask,
                      "pseudo_cls": pseudo[:, None]}
        return PairLogits(logits, states)

    @torch.no_grad()
    def catalogue(self, chunk: int = 8192) -> Encoded:
        """The whole catalogue encoded, in chunks (what the index stores)."""
        parts = [self.encode_items(c) for c in torch.arange(self.num_items, device=self.device).split(chunk)]
        return Encoded(TokenSequence(torch.cat([p.tokens.tokens for p in parts]), torch.cat([p.tokens.mask for p in parts])),
                       torch.cat([p.cls for p in parts]))

    def item_scorer(self) -> ItemRangeScorer:
        """Encodes the catalogue once; each call scores a range of it."""
        catalogue = self.catalogue()

        def scorer(user: UserInput, start: int, stop: int) -> torch.Tensor:
            part = Encoded(TokenSequence(catalogue.tokens.tokens[start:stop], catalogue.tokens.mask[start:stop]),
                           catalogue.cls[start:stop])
            encoded = self.encode_users(user)
            return torch.cat([self._scores(encoded, _slice(part, lo, lo + ITEM_SLICE))
                              for lo in range(0, stop - start, ITEM_SLICE)] or [encoded.cls.new_zeros(len(user), 0)], dim=1)

        return scorer

    @torch.no_grad()
    def build_index(self, training_users: UserInput | None = None) -> TwoRankerIndex:
        """The token index of the catalogue (candidates) with each item's [CLS] state and the
        folded first ranker (exact re-scoring)."""
        self.eval()
        settings = self.config.index
        log.info("building the two-ranker index (%s candidates)", settings.candidate_index)
        catalogue = self.catalogue()
        return TwoRankerIndex.build_two_rankers(
            catalogue.tokens, catalogue.cls, self.folded_ranker(), spec=settings.candidate_index, store=settings.store,
            nbits=settings.nbits, tokens_per_query=settings.tokens_per_query, max_candidates=settings.max_candidates,
            nprobe=settings.nprobe)

    @torch.no_grad()
    def index_query(self, user: UserInput) -> TwoRankerQuery:
        encoded = self.encode_users(user)
        return TwoRankerQuery(encoded.tokens, encoded.cls)

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """``(s1 + s2) / temperature`` of each row's candidates (and, with in-batch negatives,
        every row's positive). With ``with_states``: ``user_tokens`` (TokenSequence),
        ``item_tokens [B, 1 + K, L_i, m]`` with ``item_mask``, and ``pseudo_cls [B, 1 + K, D]``."""
        users = self.encode_users(batch.user)
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        unique, inverse = torch.unique(candidates.reshape(-1), return_inverse=True)
        items = self.encode_items(unique)
        tokens = F.embedding(inverse, items.tokens.tokens.flatten(1)).view(*candidates.shape, *items.tokens.tokens.shape[1:])
        item_mask = items.tokens.mask[inverse].view(*candidates.shape, -1)
        item_cls = F.embedding(inverse, items.cls).view(*candidates.shape, -1)
        pseudo = self.pseudo_cls(users.cls[:, None, :], item_cls)
        logits = self.first_ranker(pseudo) + maxsim_pairs(users.tokens, TokenSequence(tokens, item_mask))
        in_batch = None
        if batch.in_batch_mask is not None:
            positives = Encoded(TokenSequence(tokens[:, 0], item_mask[:, 0]), item_cls[:, 0])
            in_batch = self._scores(users, positives) / self.config.temperature
        logits = logits / self.config.temperature
        states = None
        if with_states:
            states = {"user_tokens": users.tokens, "item_tokens": tokens, "item_mask": item_mask, "pseudo_cls": pseudo}
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch, states)


def _slice(encoded: Encoded, lo: int, hi: int) -> Encoded:
    return Encoded(TokenSequence(encoded.tokens.tokens[lo:hi], encoded.tokens.mask[lo:hi]), encoded.cls[lo:hi])
