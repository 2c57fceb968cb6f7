"""ColBERT-style late interaction (methods.md §8) on the two token towers of the substrate.

Each side is encoded alone (so items can be precomputed, as in a two-tower model), every token
state is projected by one shared ``W_c`` and L2-normalised, and the score is MaxSim:

    s(u, i) = sum over user tokens a of  max over item tokens b of  q_a . d_b

Max over item tokens, then sum over user tokens: a sum over all pairs would collapse into one dot
product of the summed vectors and lose the point. Several user tokens (fields, history items,
optional learned expansion tokens) can each match a different item token, which is what lets one
user express several interests that a single vector would average away.

:func:`~crosstower.nn.maxsim.maxsim` and :func:`~crosstower.nn.maxsim.maxsim_pairs` are pure
functions shared by the loss, exhaustive evaluation and the late-interaction index, so the number
trained is the number served.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.config import Strict
from crosstower.data.batching import TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.index import LateInteractionIndex
from crosstower.losses import CandidateLogits
from crosstower.models.base import AttentionModelConfig, BuildContext, ItemRangeScorer, Recommender, item_prior
from crosstower.nn.late_towers import LateTowers
from crosstower.nn.maxsim import maxsim, maxsim_pairs
from crosstower.nn.tokens import TokenSequence

log = logging.getLogger("crosstower.late_interaction")

ITEM_SLICE = 512  # items per MaxSim call in exhaustive scoring: memory grows with B x L_u x N x L_i


class LateInteractionIndexConfig(Strict):
    """How the late-interaction index serves: faiss candidates, then exact MaxSim re-scoring."""

    # A faiss index_factory string; {auto} = 4 sqrt(tokens) lists (at most tokens / 39).
    candidate_index: str = "IVF{auto},Flat"
    # Defaults from benchmarks/late_interaction_index.py on the synthetic default: 99.4% of
    # exhaustive Recall@50 while scoring 10% of the 3,000 items (64 tokens a query: 94.4%).
    tokens_per_query: int = Field(128, ge=1)  # item tokens each user token retrieves
    max_candidates: int = Field(300, ge=1)  # items re-scored exactly per user
    nprobe: int = Field(16, ge=1)  # IVF lists searched per user token
    store: Literal["float16", "residual"] = "float16"  # residual: ColBERTv2 centroid + nbits residual
    nbits: Literal[1, 2, 4, 8] = 4  # residual bits per dimension (store: residual)


class LateInteractionConfig(AttentionModelConfig):
    """ColBERT-style late interaction (MaxSim) on the substrate's two token towers."""

    name: Literal["colbert"] = "colbert"  # selects ColBERT-style late interaction (MaxSim over token vectors)
    projection_dim: int = Field(32, ge=1)  # m: the stored size of every token vector
    user_layers: int = Field(2, ge=1)  # transformer layers of the user tower
    item_layers: int = Field(1, ge=1)  # transformer layers of the item tower
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields tokenised; None: every item field
    expansion_tokens: int = Field(0, ge=0)  # learned extra user tokens (ColBERT's [MASK] augmentation)
    item_cls: bool = False  # whether the item [CLS] token takes part in the max
    temperature: float = Field(1.0, gt=0)  # logits = (MaxSim + item bias) / temperature
    item_bias: bool = False  # a learned per-item term added to MaxSim (popularity)
    index: LateInteractionIndexConfig = Field(default_factory=LateInteractionIndexConfig)  # how the model is served
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate in the towers' transformers

    def build(self, dataset: Dataset, context: BuildContext) -> LateInteraction:
        return LateInteraction(dataset, self, context)


class LateInteraction(Recommender):
    def __init__(self, dataset: Dataset, config: LateInteractionConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.towers = LateTowers(
            dataset, s.dim, s.projection_dim, context.history_length, s.user_layers, s.item_layers, s.heads, s.dropout,
            context.user_fields(s.user_fields, dataset), s.item_fields, s.expansion_tokens, s.item_cls,
        )
        # MaxSim of unit vectors is bounded, so "popular with everyone" is hard to express
        # through the tokens alone; a per-item bias carries it, as in YouTubeDNN's item bias.
        self.bias = item_prior(self.num_items, s.item_bias)
        self.register_load_state_dict_pre_hook(_towers_from_flat_names)

    # ---- token vectors -----------------------------------------------------------------------
    def encode_user_tokens(self, user: UserInput) -> TokenSequence:
        """Normalised user token vectors ``[B, L_u (+ expansion), m]`` and their mask."""
        return self.towers.users(user)

    def encode_item_tokens(self, items: torch.Tensor) -> TokenSequence:
        """Normalised item token vectors ``[N, L_i, m]`` (the [CLS] dropped unless ``item_cls``)."""
        return self.towers.items(items)

    @torch.no_grad()
    def catalogue_tokens(self, chunk: int = 8192) -> TokenSequence:
        """The whole catalogue's item token vectors, encoded in chunks (what an index stores)."""
        parts = [self.encode_item_tokens(c) for c in torch.arange(self.num_items, device=self.device).split(chunk)]
        return TokenSequence(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))

    @torch.no_grad()
    def build_index(self, training_users: UserInput | None = None) -> LateInteractionIndex:
        """The late-interaction index of the catalogue (stored tokens, faiss candidates), as
        ``index`` configures."""
        settings = self.config.index
        log.info("building the late-interaction index (%s)", settings.candidate_index)
        return self.build_token_index(settings.candidate_index, settings.tokens_per_query, settings.max_candidates,
                                      settings.nprobe, settings.store, settings.nbits)

    @torch.no_grad()
    def build_token_index(self, spec: str = "IVF{auto},Flat", tokens_per_query: int = 128, max_candidates: int = 300,
                          nprobe: int = 16, store: str = "float16", nbits: int = 4) -> LateInteractionIndex:
        """The late-interaction index of the catalogue with these settings."""
        self.eval()
        bias = self.item_bias(torch.arange(self.num_items, device=self.device))
        return LateInteractionIndex.build(self.catalogue_tokens(), bias, spec, store=store, nbits=nbits,
                                          tokens_per_query=tokens_per_query, max_candidates=max_candidates,
                                          nprobe=nprobe)

    @torch.no_grad()
    def index_query(self, user: UserInput) -> TokenSequence:
        """The user token vectors the index retrieves and re-scores with."""
        return self.encode_user_tokens(user)

    # ---- the model contract ------------------------------------------------------------------
    def item_bias(self, items: torch.Tensor) -> torch.Tensor:
        """The per-item term added to MaxSim (zeros without ``item_bias``), shaped like ``items``."""
        if self.bias is None:
            return torch.zeros(items.shape, device=items.device)
        return self.bias(items).squeeze(-1)

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return _sliced_maxsim(self.encode_user_tokens(user), self.encode_item_tokens(items)) + self.item_bias(items)

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        item_seq = self.encode_item_tokens(items)
        pairs = TokenSequence(item_seq.tokens[:, None], item_seq.mask[:, None])
        return maxsim_pairs(self.encode_user_tokens(user), pairs)[:, 0] + self.item_bias(items)

    def item_scorer(self) -> ItemRangeScorer:
        """Encodes the catalogue's tokens once; each call runs MaxSim against a range of it."""
        catalogue = self.catalogue_tokens()
        with torch.no_grad():
            bias = self.item_bias(torch.arange(self.num_items, device=self.device))

        def scorer(user: UserInput, start: int, stop: int) -> torch.Tensor:
            items = TokenSequence(catalogue.tokens[start:stop], catalogue.mask[start:stop])
            return _sliced_maxsim(self.encode_user_tokens(user), items) + bias[start:stop]

        return scorer

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """MaxSim (plus the item bias) over temperature ``tau`` of each row's candidates. With
        ``with_states``: the ``user_tokens`` (a TokenSequence) and the candidates'
        ``item_tokens [B, 1 + K, L_i, m]`` with their ``item_mask``."""
        users = self.encode_user_tokens(batch.user)
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        unique, inverse = torch.unique(candidates.reshape(-1), return_inverse=True)
        item_seq = self.encode_item_tokens(unique)
        tokens = F.embedding(inverse, item_seq.tokens.flatten(1)).view(*candidates.shape, *item_seq.tokens.shape[1:])
        item_mask = item_seq.mask[inverse].view(*candidates.shape, -1)
        logits = maxsim_pairs(users, TokenSequence(tokens, item_mask))
        logits = logits + self.item_bias(candidates)
        in_batch = None
        if batch.in_batch_mask is not None:
            positives = TokenSequence(tokens[:, 0], item_mask[:, 0])
            in_batch = (maxsim(users, positives) + self.item_bias(batch.positives)) / self.config.temperature
        logits = logits / self.config.temperature
        states = {"user_tokens": users, "item_tokens": tokens, "item_mask": item_mask} if with_states else None
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch, states)


def _sliced_maxsim(users: TokenSequence, items: TokenSequence) -> torch.Tensor:
    n = items.tokens.shape[0]
    return torch.cat(
        [
            maxsim(users, TokenSequence(items.tokens[lo : lo + ITEM_SLICE], items.mask[lo : lo + ITEM_SLICE]))
            for lo in range(0, n, ITEM_SLICE)
        ]
        or [users.tokens.new_zeros(users.tokens.shape[0], 0)],
        dim=1,
    )


_TOWER_PARTS = ("substrate.", "user_encoder.", "item_encoder.", "expansion", "projection.")


def _towers_from_flat_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loading a checkpoint saved before the towers were their own module: its tower entries
    (``substrate.*``, ``projection.weight``, ...) move under ``towers.``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix):].startswith(_TOWER_PARTS):
            state_dict[prefix + "towers." + key[len(prefix):]] = state_dict.pop(key)
