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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crosstower.data.batching import TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.losses import sampled_softmax
from crosstower.models.base import ItemRangeScorer, Recommender, item_prior
from crosstower.nn.late_towers import LateTowers
from crosstower.nn.maxsim import maxsim, maxsim_pairs
from crosstower.nn.tokens import TokenSequence

ITEM_SLICE = 512  # items per MaxSim call in exhaustive scoring: memory grows with B x L_u x N x L_i


@dataclass
class LateInteractionSettings:
    dim: int = 64
    projection_dim: int = 32  # m: the stored size of every token vector
    user_layers: int = 2
    item_layers: int = 1
    heads: int = 2
    max_history: int = 20
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    expansion_tokens: int = 0  # learned extra user tokens (ColBERT's [MASK] augmentation)
    item_cls: bool = False  # whether the item [CLS] token takes part in the max
    temperature: float = 1.0
    item_bias: bool = False  # a learned per-item term added to MaxSim (popularity)
    dropout: float = 0.0


class LateInteraction(Recommender):
    def __init__(self, dataset: Dataset, settings: LateInteractionSettings):
        super().__init__(dataset.num_items)
        s = self.settings = settings
        self.towers = LateTowers(
            dataset, s.dim, s.projection_dim, s.max_history, s.user_layers, s.item_layers, s.heads, s.dropout,
            s.user_fields, s.item_fields, s.expansion_tokens, s.item_cls,
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
    def build_index(self, spec: str = "IVF{auto},Flat", tokens_per_query: int = 128, max_candidates: int = 300,
                    nprobe: int = 16, store: str = "float16", nbits: int = 4):
        """The late-interaction index of the catalogue (stored tokens, faiss candidates)."""
        from crosstower.index import LateInteractionIndex

        self.eval()
        bias = self.item_bias(torch.arange(self.num_items, device=self.device))
        return LateInteractionIndex.build(self.catalogue_tokens(), bias, spec, store=store, nbits=nbits,
                                          tokens_per_query=tokens_per_query, max_candidates=max_candidates,
                                          nprobe=nprobe)

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

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Listwise softmax (temperature ``tau``) over sampled and, optionally, in-batch negatives."""
        users = self.encode_user_tokens(batch.user)
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        unique, inverse = torch.unique(candidates.reshape(-1), return_inverse=True)
        item_seq = self.encode_item_tokens(unique)
        tokens = F.embedding(inverse, item_seq.tokens.flatten(1)).view(*candidates.shape, *item_seq.tokens.shape[1:])
        logits = maxsim_pairs(users, TokenSequence(tokens, item_seq.mask[inverse].view(*candidates.shape, -1)))
        logits = logits + self.item_bias(candidates)
        in_batch = None
        if batch.in_batch_mask is not None:
            positives = TokenSequence(tokens[:, 0], item_seq.mask[inverse].view(*candidates.shape, -1)[:, 0])
            in_batch = (maxsim(users, positives) + self.item_bias(batch.positives)) / self.settings.temperature
        logits = logits / self.settings.temperature
        negative_logits, mask, log_q = batch.candidate_logits(logits[:, 0], logits[:, 1:], in_batch)
        total = sampled_softmax(logits[:, 0], negative_logits, mask, batch.positive_log_q, log_q)
        return total, {"softmax": float(total.detach())}


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
