"""IntTower (Li et al., CIKM 2022; methods.md §9, reference/sparcode_inttower_mvke.md §2): a
two-tower pre-ranker whose towers interact only at the top, through a MaxSim over projection heads.

* **Field tokens.** The user side is one token per user field plus one for the history (the
  masked mean of the history items' embeddings, each the sum of its item-field embeddings, shared
  with the item tower), so that P2 users, known only by features and history, are represented.
  The item side is one token per item field. Every token has ``embedding_dim`` entries.
* **Light-SE** (one per tower): ``z_f = mean_k E[f, k]``, ``a = softmax_f(W z)`` with
  ``W [F, F]`` and no bias, ``E' = E + a * E`` (a residual re-weighting of the fields).
* **Towers.** MLPs over the flattened ``E'``: each layer is Linear, BatchNorm, ReLU, dropout.
* **FE-Block.** For each user layer ``l`` a linear head maps that layer's *input* to ``H_u``
  heads of ``d_h`` entries, ``P^u_l [H_u, d_h]`` (layer 1's head reads ``E'`` itself); one item
  head maps the item tower's *last* hidden output to ``P^i [H_i, d_h]``. The score is

      s(u, i) = sum_l sum_a max_b <P^u_l[a], P^i[b]> + bias  (+ p_i with ``item_bias``)

  (dot products, max over item heads, sum over user heads and layers). Read as token sets, the
  ``L * H_u`` user heads against the ``H_i`` item heads, this is ColBERT's MaxSim without the
  normalisation. Because heads read layer *inputs*, the output of the user tower's last layer
  would feed nothing, so that layer is not built: ``user_hidden`` gives the number of FE layers
  and the widths of the hidden layers before the last; its last entry sets no size.
* **CIR** (contrastive interaction regularisation, optional: ``cir_weight`` 0 turns it off).
  ``z_u`` is the mean over heads of the last user FE layer ``P^u_L``, ``z_i`` the mean over heads
  of ``P^i``, both L2-normalised (both ``d_h``-long, whatever ``H_u`` and ``H_i``). Over the
  batch's positive pairs ``r`` (rows with label 1 in pointwise training, every row's positive in
  listwise training; :meth:`IntTower.extra_losses`),

      CIR = mean_r -log softmax_j( cos(z_u^r, z_i^j) / tau )[r]

  with ``j`` over the same positive pairs; a column whose item equals row ``r``'s item (an
  accidental hit, ``j != r``) is dropped. Fewer than two positive pairs give 0.
  *Code vs paper:* the paper describes an in-batch contrastive loss between the users' and items'
  FE representations. The released code first used the flattened last FE projections with tau =
  0.001 and a batch-mean "all minus positive" expression (not a per-row InfoNCE); a later commit
  switched to a tau = 0.07 InfoNCE that indexes the positive column by the 0/1 label (not the
  row); the next commit removed CIR, and HEAD trains without it. This module writes the paper's
  definition as a per-row InfoNCE with tau = 0.07 by default; the pooling over heads (instead of
  flattening, which needs ``H_u == H_i`` and pairs head ``a`` with head ``a`` although MaxSim does
  not order heads) is our choice. The reference adds CIR with weight 1 to a *summed* BCE; here
  the BCE is averaged over the batch (the contract's default), so ``cir_weight`` is relative to
  a mean.

Training: :meth:`IntTower.loss` is the listwise sampled softmax (logQ, sampled and optional
in-batch negatives) used for retrieval protocols P1/P2/P3; :meth:`IntTower.pointwise_loss` is the
paper's pointwise BCE (protocol P4) plus CIR. The paper's L2 on embeddings (1e-5) is not part of
the model; ``train.weight_decay`` is the nearest knob.

BatchNorm: in training mode a row's score depends on the rest of its batch (batch statistics),
so scores are only comparable across calls in eval mode; the evaluator switches to eval mode
(``model.eval()``), and so must any other caller that scores. Candidates ``[B, C]`` are scored
by flattening them (each distinct item encoded once), so BatchNorm always sees 2-D inputs; the
pairs of P4 encode each row's item (a training row may read its own item statistics). A
one-row batch in training mode (the last batch of an epoch can be one row) is normalised with
the running statistics instead of failing.

Serving cost: the catalogue stores ``H_i * d_h`` floats per item, and a pair costs
``L * H_u * H_i * d_h`` multiply-adds; not servable by MIPS (it is a pre-ranker), so evaluation
is exhaustive over cached item heads (:meth:`IntTower.item_scorer`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.config import ModelConfig
from crosstower.data.batching import PointwiseBatch, TrainBatch, UserInput
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.losses import CandidateLogits, PairLogits, info_nce
from crosstower.models.base import BuildContext, ItemRangeScorer, LossTerms, Recommender, item_prior
from crosstower.nn.fields import FieldEmbedder
from crosstower.nn.tokenizers import user_field_tokens

ITEM_SLICE = 512  # items per FE-score call in exhaustive scoring: memory grows with B x N x A x H_i
# The FE heads start at N(0, 0.01) with zero bias, so that initial scores are near zero and the
# softmax starts near uniform: with PyTorch's default init the synthetic default's first scores
# have std ~14 and the first sampled-softmax loss is ~29 (ln 31 = 3.4 is uniform). The towers keep
# the default init, BatchNorm follows each of their linear maps.
HEAD_INIT_STD = 0.01


class IntTowerConfig(ModelConfig):
    """IntTower: Light-SE field re-weighting, BatchNorm MLP towers, FE-Block MaxSim over heads.

    ``user_hidden`` sets the number of user FE layers (one head per layer, on its input) and the
    widths before the last; ``item_hidden`` the item tower, whose last output feeds the item
    head. Heads default to 4 x 64 (the MindSpore port's FE size) rather than the ML-1M script's
    32 x 64: a pair costs ``len(user_hidden) * heads_user * heads_item * head_dim`` multiply-adds,
    64x fewer, which keeps listwise training with tens to hundreds of negatives affordable on CPU.
    ``cir_weight`` 0 turns CIR off (as the released code at HEAD).
    """

    name: Literal["inttower"] = "inttower"  # selects IntTower (towers that interact through FE-Block heads)
    embedding_dim: int = Field(32, ge=1)  # width of every field token
    # One user FE layer per entry (a head reads each layer's input); the entries before the last are
    # the hidden widths, the last sets no size.
    user_hidden: list[int] = Field(default_factory=lambda: [300, 300, 128], min_length=1)
    # Hidden widths of the item tower; its last layer's output feeds the item head.
    item_hidden: list[int] = Field(default_factory=lambda: [300, 300, 128], min_length=1)
    heads_user: int = Field(4, ge=1)  # H_u: FE heads per user layer
    heads_item: int = Field(4, ge=1)  # H_i: FE heads on the item tower's output
    head_dim: int = Field(64, ge=1)  # d_h: the width of every FE head
    light_se: bool = True  # re-weight each tower's fields with Light-SE before its MLP
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields to embed; None: every item field
    dropout: float = Field(0.3, ge=0, lt=1)  # dropout rate after each tower layer
    cir_weight: float = Field(0.0, ge=0)  # weight of the contrastive interaction regulariser CIR (0: off)
    cir_temperature: float = Field(0.07, gt=0)  # tau of CIR's InfoNCE over the batch's positive pairs
    item_bias: bool = False  # a learned per-item prior beside the FE score (the towers' item bias)

    def build(self, dataset: Dataset, context: BuildContext) -> IntTower:
        return IntTower(dataset, self, context)


# ------------------------------------------------------------------------------------ pieces


class LightSE(nn.Module):
    """``[B, F, d]`` -> ``[B, F, d]``: ``E + softmax_f(W mean_k E) * E`` with ``W [F, F]``, no bias."""

    def __init__(self, num_fields: int):
        super().__init__()
        self.weight = nn.Linear(num_fields, num_fields, bias=False)

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """``a [B, F]``: the softmax over fields of ``W z``."""
        return self.weight(tokens.mean(-1)).softmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.attention(tokens).unsqueeze(-1) * tokens


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that normalises a one-row training batch with its running statistics (batch
    statistics of one row are undefined), so the last, short batch of an epoch trains."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def tower_layer(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear, BatchNorm, ReLU (and dropout): one hidden layer of an IntTower tower."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim), BatchNorm(out_dim), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def fe_score(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
    """Every user ``[B, A, d_h]`` against every item ``[N, H_i, d_h]``: ``[B, N]``, the sum over
    user heads ``a`` (all layers' heads, stacked) of the max over item heads of the dot product."""
    return torch.einsum("bad,nkd->bnak", user_heads, item_heads).amax(-1).sum(-1)


def fe_score_pairs(user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
    """User ``b`` ``[B, A, d_h]`` against its own candidates ``[B, C, H_i, d_h]``: ``[B, C]``."""
    return torch.einsum("bad,bckd->bcak", user_heads, item_heads).amax(-1).sum(-1)


# ------------------------------------------------------------------------------------ model


class IntTower(Recommender):
    def __init__(self, dataset: Dataset, config: IntTowerConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.use_history = context.users_have_history  # False under P3 (the evaluated users have none)
        d = s.embedding_dim
        if not s.user_hidden or not s.item_hidden:
            raise ConfigError("model: IntTower needs at least one hidden layer per tower (user_hidden, item_hidden)")
        self.item_fields = FieldEmbedder(dataset.items.select(s.item_fields), d)
        user_table = dataset.users.select(context.user_fields(s.user_fields, dataset))
        self.user_fields = FieldEmbedder(user_table, d) if user_table.fields else None
        num_user_fields = (self.user_fields.num_fields if self.user_fields else 0) + int(self.use_history)
        if num_user_fields == 0:
            raise ConfigError("model: IntTower's user side has no field (no history and no user field besides user_id)")
        num_item_fields = self.item_fields.num_fields
        self.user_se = LightSE(num_user_fields) if s.light_se else None
        self.item_se = LightSE(num_item_fields) if s.light_se else None

        # User tower: heads read the input of each of the len(user_hidden) layers; the last
        # layer's output would feed nothing, so only the layers before it are built.
        user_inputs = [num_user_fields * d, *s.user_hidden[:-1]]
        self.user_layers = nn.ModuleList(
            tower_layer(a, b, s.dropout) for a, b in zip(user_inputs[:-1], user_inputs[1:])
        )
        self.user_heads = nn.ModuleList(nn.Linear(width, s.heads_user * s.head_dim) for width in user_inputs)
        item_sizes = [num_item_fields * d, *s.item_hidden]
        self.item_tower = nn.Sequential(*(tower_layer(a, b, s.dropout) for a, b in zip(item_sizes[:-1], item_sizes[1:])))
        self.item_head = nn.Linear(item_sizes[-1], s.heads_item * s.head_dim)
        for head in (*self.user_heads, self.item_head):
            nn.init.normal_(head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(head.bias)
        self.bias = nn.Parameter(torch.zeros(()))
        # The FE score has no term that is the same for every user, so an item's base rate must
        # pass through the heads (and their BatchNorm); the two-tower baseline has this prior.
        self.item_prior = item_prior(self.num_items, s.item_bias)

    @property
    def num_user_layers(self) -> int:
        return len(self.user_heads)

    # ---------------------------------------------------------------------------- user side

    def user_tokens(self, user: UserInput) -> torch.Tensor:
        """``[B, F_u, d]``: the user field tokens, then the mean-history token (zeros if empty)."""
        return user_field_tokens(self.user_fields, self.item_fields, user, self.use_history, self.config.embedding_dim)

    def user_layer_heads(self, user: UserInput) -> torch.Tensor:
        """``P^u [B, L, H_u, d_h]``: layer ``l``'s heads, read from that layer's input."""
        s = self.config
        tokens = self.user_tokens(user)
        if self.user_se is not None:
            tokens = self.user_se(tokens)
        hidden, heads = tokens.flatten(1), []
        for l, head in enumerate(self.user_heads):
            heads.append(head(hidden).view(len(user), s.heads_user, s.head_dim))
            if l < len(self.user_layers):
                hidden = self.user_layers[l](hidden)
        return torch.stack(heads, dim=1)

    def encode_user_heads(self, user: UserInput) -> torch.Tensor:
        """``[B, L * H_u, d_h]``: every layer's heads as one set of user vectors."""
        return self.user_layer_heads(user).flatten(1, 2)

    # ---------------------------------------------------------------------------- item side

    def encode_item_heads(self, items: torch.Tensor) -> torch.Tensor:
        """``P^i [N, H_i, d_h]`` of items ``[N]``: one head on the item tower's last hidden layer."""
        s = self.config
        tokens = self.item_fields(items)
        if self.item_se is not None:
            tokens = self.item_se(tokens)
        return self.item_head(self.item_tower(tokens.flatten(1))).view(len(items), s.heads_item, s.head_dim)

    @torch.no_grad()
    def catalogue_heads(self, chunk: int = 8192) -> torch.Tensor:
        """The whole catalogue's item heads ``[num_items, H_i, d_h]`` (what a pre-ranker stores)."""
        return torch.cat([self.encode_item_heads(c) for c in torch.arange(self.num_items, device=self.device).split(chunk)])

    def _candidate_heads(self, items: torch.Tensor) -> torch.Tensor:
        """Item heads of ``items`` (any shape S) -> ``[*S, H_i, d_h]``, each distinct item
        encoded once (so BatchNorm sees a flat batch of distinct items)."""
        unique, inverse = torch.unique(items.reshape(-1), return_inverse=True)
        heads = self.encode_item_heads(unique)
        return F.embedding(inverse, heads.flatten(1)).view(*items.shape, *heads.shape[1:])

    # ---------------------------------------------------------------------------- scores

    def _prior(self, items: torch.Tensor) -> torch.Tensor:
        """The item prior of ``items`` (any shape; zeros without one), to add to their scores
        (a ``[N]`` prior broadcasts over a ``[B, N]`` score matrix's rows)."""
        if self.item_prior is None:
            return torch.zeros(items.shape, device=items.device)
        return self.item_prior(items).squeeze(-1)

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """``[B, N]``; call in eval mode (see the module docstring on BatchNorm)."""
        return self._sliced_score(self.encode_user_heads(user), self.encode_item_heads(items)) + self._prior(items)

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self._pairs(user, items)[0]

    def item_scorer(self) -> ItemRangeScorer:
        """Encodes the catalogue's item heads once; each call scores a range of them."""
        catalogue = self.catalogue_heads()
        prior = self._prior(torch.arange(self.num_items, device=self.device)).detach()
        return lambda user, start, stop: (
            self._sliced_score(self.encode_user_heads(user), catalogue[start:stop]) + prior[start:stop]
        )

    def _sliced_score(self, user_heads: torch.Tensor, item_heads: torch.Tensor) -> torch.Tensor:
        n = item_heads.shape[0]
        columns = [fe_score(user_heads, item_heads[lo : lo + ITEM_SLICE]) for lo in range(0, n, ITEM_SLICE)]
        return (torch.cat(columns, dim=1) if columns else user_heads.new_zeros(user_heads.shape[0], 0)) + self.bias

    def _pairs(self, user: UserInput, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``[B]`` of user ``b`` with item ``items[b]``, and the CIR vectors ``z_u``, ``z_i``.

        Each row's item is encoded from ``items`` itself, not deduplicated: a P4 training row
        may read its own item statistics (:func:`crosstower.nn.fields.row_values`)."""
        layer_heads = self.user_layer_heads(user)
        item_heads = self.encode_item_heads(items)
        logits = fe_score_pairs(layer_heads.flatten(1, 2), item_heads[:, None])[:, 0] + self.bias + self._prior(items)
        return logits, *self.cir_vectors(layer_heads, item_heads)

    # ---------------------------------------------------------------------------- losses

    @staticmethod
    def cir_vectors(layer_heads: torch.Tensor, item_heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z_u [B, d_h]``: the mean over heads of the last user FE layer ``[B, L, H_u, d_h]``;
        ``z_i [.., d_h]``: the mean over heads of the item heads ``[.., H_i, d_h]`` (not normalised;
        :func:`info_nce` normalises)."""
        return layer_heads[:, -1].mean(1), item_heads.mean(-2)

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """FE scores of each row's candidates (plus bias and item prior). States (always: CIR
        reads them): ``cir_users`` and ``cir_items``, the CIR vectors of the rows' positive pairs;
        with ``with_states`` also ``user_heads [B, L * H_u, d_h]`` and the candidates'
        ``item_heads [B, 1 + K, H_i, d_h]``."""
        layer_heads = self.user_layer_heads(batch.user)
        user_heads = layer_heads.flatten(1, 2)
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
        item_heads = self._candidate_heads(candidates)  # [B, 1 + K, H_i, d_h]
        logits = fe_score_pairs(user_heads, item_heads) + self.bias + self._prior(candidates)
        in_batch = None
        if batch.in_batch_mask is not None:
            in_batch = fe_score(user_heads, item_heads[:, 0]) + self.bias + self._prior(batch.positives)
        z_users, z_items = self.cir_vectors(layer_heads, item_heads[:, 0])
        states = {"cir_users": z_users, "cir_items": z_items}
        if with_states:
            states.update(user_heads=user_heads, item_heads=item_heads)
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch, states)

    def pair_logits(self, batch: PointwiseBatch, with_states: bool = False) -> PairLogits:
        """The pair logits, with the CIR vectors ``cir_users`` / ``cir_items`` of every row."""
        logits, z_users, z_items = self._pairs(batch.user, batch.items)
        return PairLogits(logits, {"cir_users": z_users, "cir_items": z_items})

    def extra_losses(self, batch: TrainBatch | PointwiseBatch, logits: CandidateLogits | PairLogits) -> LossTerms:
        """``cir_weight`` times CIR over the batch's positive pairs: every row's positive in
        listwise training, the rows labelled 1 in pointwise training (none with weight 0)."""
        if self.config.cir_weight <= 0:
            return {}
        z_users, z_items = logits.states["cir_users"], logits.states["cir_items"]
        if isinstance(batch, PointwiseBatch):
            positive = batch.labels > 0.5
            z_users, z_items, items = z_users[positive], z_items[positive], batch.items[positive]
        else:
            items = batch.positives
        return {"cir": (info_nce(z_users, z_items, items, self.config.cir_temperature), self.config.cir_weight)}
