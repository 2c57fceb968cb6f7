"""SparCode (Su et al., SIGIR 2023): all-to-all interaction made retrievable.

The user becomes ``K_u`` tokens (:mod:`crosstower.nn.tokenizers`); each token is product-
quantised into a code (codebooks shared by all tokens); one interaction encoder ``E`` scores a
(quantised token, item tokens) pair; the user-item score is

    y(u, i) = sum_k ReLU(E(q_k(u), i) + b)

The bias ``b`` and the ReLU are the sparsity control: a (code, item) score pushed to <= 0 is
exactly zero and need not be stored, so the index of (code -> item, score) is sparse. Because
``E`` only ever sees a code, every score the model can produce is precomputable per code: serving
sums the posting lists of the user's ``K_u`` codes (:mod:`crosstower.index.sparse_code`).

Tokenizers: DNN and SA (:mod:`crosstower.nn.tokenizers`) emit ``K_u`` tokens for an MLP or
self-attention encoder ``E`` (:mod:`crosstower.nn.interaction`); ``late`` is late interaction's user tower
(:mod:`crosstower.nn.late_towers`), one normalised vector per user field, history item and
expansion token, scored by :class:`~crosstower.nn.interaction.InteractionMaxSim` (``E(q, i) = max_b q . d_b / tau``), which
makes ``y`` ColBERT's MaxSim with the sparsity control and quantised user vectors.

With ``name: alltoall`` the same tokenizer and encoder, unquantised and scored exhaustively,
give the all-to-all upper bound the index is measured against. With ``item_bias`` a learned
per-item prior ``p_i`` is added outside the sum, ``y(u, i) = p_i + sum_k ReLU(...)``, and served
as one dense vector beside the posting lists (not in the paper; see ``__init__`` for why).

Training: sampled softmax over the candidates (plus in-batch negatives with logQ, optionally),
the quantiser's commitment loss and, with ``sparsity.weight``, an L1 penalty on the sampled
negatives' per-token scores (once quantised, its weight optionally grown over
``sparsity.ramp_steps``) that drives the score table towards exact zeros. With
``quantizer.warmup_epochs`` the model first trains unquantised (the all-to-all model), then
:meth:`begin_epoch` sets the codebooks by k-means on the tokens it has learned and quantisation
starts; seeding the codebooks from the first batch of an untrained tokenizer instead collapsed to
3 of 256 entries in use on the synthetic default.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field, model_validator

from crosstower.config import ModelConfig, Strict
from crosstower.data.batching import TrainBatch, TrainExamples, UserInput
from crosstower.data.dataset import Dataset
from crosstower.index import CodeQueries, SparseCodeIndex, encode_code_ids, every_code
from crosstower.losses import CandidateLogits
from crosstower.models.base import BuildContext, LossTerms, Recommender, item_prior
from crosstower.nn.fields import FieldEmbedder
from crosstower.nn.interaction import InteractionMaxSim, InteractionMLP, InteractionSA
from crosstower.nn.quantizer import ProductQuantizer, ResidualQuantizer
from crosstower.nn.late_towers import LateItemTokenizer, LateTowers, LateUserTokenizer
from crosstower.nn.tokenizers import DNNTokenizer, ItemTokenizer, SATokenizer


log = logging.getLogger("crosstower.sparcode")

SCORE_SLICE = 256  # items per encoder call in exhaustive scoring


# The most codes ``index.codes: all`` enumerates (2^26 = 8,192^2, about 406^3): a product
# quantiser's id space grows as N^M, and beyond this its code table alone takes gigabytes.
MAX_ENUMERATED_CODES = 2**26


class TokenizerConfig(ModelConfig):
    """What the tokenizer-based models (SparCode, all-to-all, tokenizer two-tower) share."""

    # "dnn", "sa" or (SparCode and all-to-all only) "late": late interaction's user tower, one
    # normalised ``projection_dim`` vector per user field, history item and expansion token.
    tokenizer: Literal["dnn", "sa", "late"] = "dnn"
    dim: int = Field(64, ge=1)  # width of every field embedding and token (late: of its towers' states)
    user_fields: list[str] | None = None  # None: every user field (P2/P3: all but user_id); []: none, the history alone
    item_fields: list[str] | None = None  # item fields to embed; None: every item field
    tokenizer_hidden: list[int] = Field(default_factory=lambda: [256])  # hidden widths of the dnn tokenizer's MLP
    item_hidden: list[int] = Field(default_factory=lambda: [128])  # hidden widths of the item tokenizer's MLP (dnn, sa)
    sa_layers: int = Field(2, ge=1)  # transformer layers of the sa tokenizer (late: of the user tower)
    sa_heads: int = Field(2, ge=1)  # attention heads of the sa tokenizer, the late towers and the sa interaction
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout rate in the tokenizers and the interaction encoder
    # A learned per-item prior added to every score. SparCode serves it as a dense vector beside
    # the posting lists, so popularity need not fill every code's posting list; the two-tower
    # model serves it as one more item-vector dimension (against a constant 1 on the user side).
    item_bias: bool = False


class IndexBudget(Strict):
    """A sparse code index's size budget, shared among the codes by use (``UsageBudget``)."""

    share: float = Field(gt=0, le=1)  # fraction of the whole (code x item) score table to keep
    usage_exponent: float = Field(0.5, ge=0)  # a code's part of the budget grows as its usage^this (0: equal parts)


class QuantizerConfig(Strict):
    """How user tokens become codes."""

    # "product": each codebook snaps its own dim / num_codebooks slice of a token; "residual":
    # each codebook snaps the whole token's residual after the codebooks before it.
    kind: Literal["product", "residual"] = "product"
    num_codebooks: int = Field(2, ge=1)  # M: codebooks, so a code is an M-tuple of entries
    codebook_size: int = Field(256, ge=2)  # N: entries per codebook (N^M possible codes)
    commitment: float = Field(0.25, ge=0)  # weight of ||token - sg(code)||^2, which keeps tokens near their codes
    weight: float = Field(1.0, ge=0)  # of the quantiser's loss in the total
    # Epochs trained unquantised before the codebooks are set by k-means on the learned tokens
    # (of ``kmeans_examples`` training examples) and quantisation starts; 0 quantises from the
    # first batch. Warm-up epochs are never selected as the best epoch.
    warmup_epochs: int = Field(0, ge=0)
    kmeans_examples: int = Field(8192, ge=1)  # training examples whose tokens k-means clusters after the warm-up
    # A codebook entry whose EMA count (sub-vectors assigned per batch) falls below this is moved
    # onto a random token of the batch. 0.1 restarts an entry a few hundred steps after its last
    # win; the quantiser's own default (1e-3) waits about 700 steps at decay 0.99, longer than an
    # epoch of the synthetic default.
    dead_threshold: float = Field(0.1, ge=0)
    # With train.ema_decay, average the codebooks with the weights (from the first quantised
    # step), so the validated and indexed model's codes match its averaged towers. Off, the
    # averaged towers meet the live codebooks (as the runs before this key measured).
    average_codebooks: bool = False

    @property
    def num_codes(self) -> int:
        return self.codebook_size**self.num_codebooks


class SparsityConfig(Strict):
    """What makes the (code, item) score table sparse: the bias inside the ReLU and an L1 penalty."""

    bias: float = 0.0  # b in ReLU(E + b) of every (token, item) score: lower leaves more exact zeros
    # Weight of the L1 penalty on sampled negatives' per-token scores (0: none), applied once
    # quantisation is on; larger weights leave fewer non-zero (code, item) scores to index.
    weight: float = Field(0.0, ge=0)
    # Training steps over which that weight grows from 0, quadratically, once quantisation is on
    # (0: full weight at once). At full weight from the first quantised step, L1 1.0 drove a
    # second seed's scores below 0 for good (positive share 0.03, validation at popularity level).
    ramp_steps: int = Field(0, ge=0)


class SparseCodeIndexConfig(Strict):
    """Which (code, item) scores the served index keeps, and for which codes."""

    # "nonzero", the top-L per code (an int), the scores above a threshold (a float >= 0), or
    # {share, usage_exponent}: about that share of the table, each code's top entries in
    # proportion to its use (index.keep_rules.UsageBudget).
    keep: Union[Literal["nonzero"], int, float, IndexBudget] = "nonzero"
    # "observed": the codes the training users' tokens take (a test user's unseen code falls back
    # to the nearest of them); "all": every N^M tuple (none falls back; at most 2^26 codes).
    codes: Literal["observed", "all"] = "observed"
    workers: int = Field(1, ge=1)  # processes that score code chunks

    def keep_rule(self) -> Any:
        """``keep`` as :meth:`SparseCodeIndex.build` takes it (a budget as a plain mapping)."""
        return self.keep.model_dump() if isinstance(self.keep, IndexBudget) else self.keep


# Flat keys of configs written before the quantiser, sparsity and index blocks: old -> (block, key).
_MOVED_KEYS = {
    "num_codebooks": ("quantizer", "num_codebooks"), "codebook_size": ("quantizer", "codebook_size"),
    "commitment": ("quantizer", "commitment"), "vq_weight": ("quantizer", "weight"),
    "vq_warmup_epochs": ("quantizer", "warmup_epochs"), "kmeans_examples": ("quantizer", "kmeans_examples"),
    "vq_dead_threshold": ("quantizer", "dead_threshold"), "average_codebooks": ("quantizer", "average_codebooks"),
    "sparsity_bias": ("sparsity", "bias"), "sparsity_weight": ("sparsity", "weight"),
    "sparsity_ramp_steps": ("sparsity", "ramp_steps"),
    "index_keep": ("index", "keep"), "index_codes": ("index", "codes"), "index_workers": ("index", "workers"),
}


class SparCodeConfig(TokenizerConfig):
    """SparCode; ``name: alltoall`` is the same model unquantised (the exhaustive upper bound)."""

    name: Literal["sparcode", "alltoall"] = "sparcode"  # selects SparCode; alltoall: unquantised, scored exhaustively
    # "maxsim": E(token, item) = max over the item's tokens of their inner product with the
    # token, / maxsim_temperature (late interaction's per-token term; no parameters).
    interaction: Literal["mlp", "sa", "maxsim"] = "mlp"
    maxsim_temperature: float = Field(1.0, gt=0)  # tau of the maxsim interaction
    # The "late" tokenizer's towers: the substrate and encoders are ``dim`` wide, every token
    # vector (what is quantised and what MaxSim reads) ``projection_dim``; the item tower has
    # ``item_layers`` layers, the user tower ``sa_layers``, and ``expansion_tokens`` learned
    # user tokens join each user.
    projection_dim: int = Field(32, ge=1)
    item_layers: int = Field(1, ge=1)  # transformer layers of the item tower (tokenizer: late)
    expansion_tokens: int = Field(0, ge=0)  # learned tokens added to every user (tokenizer: late)
    user_tokens: int = Field(4, ge=1)  # K_u: tokens per user, each quantised into one code (not with late)
    # "summary": K_u tokens that each summarise the user (the tokenizer's heads or query
    # tokens); "history": one token per item of the last K_u history items, read in the user's
    # context (users with a shorter history have fewer tokens).
    user_tokens_from: Literal["summary", "history"] = "summary"
    item_tokens: int = Field(4, ge=1)  # K_i: tokens per item that the interaction encoder reads (not with late)
    # Hidden widths of the interaction encoder: the mlp's layers; sa: the first is its feed-forward width.
    interaction_hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    # MLP encoder only: add a factorised bilinear term (A token) * (B item) to its first layer.
    interaction_products: bool = False
    quantizer: QuantizerConfig = Field(default_factory=QuantizerConfig)  # unused by alltoall
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)  # what makes the (code, item) score table sparse
    index: SparseCodeIndexConfig = Field(default_factory=SparseCodeIndexConfig)  # unused by alltoall

    @property
    def quantize(self) -> bool:
        return self.name == "sparcode"

    @property
    def token_dim(self) -> int:
        """The size of a user token vector: what the quantiser snaps."""
        return self.projection_dim if self.tokenizer == "late" else self.dim

    @classmethod
    def upgrade(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Configs written before the ``quantizer``, ``sparsity`` and ``index`` blocks had their
        keys flat (``codebook_size``, ``vq_warmup_epochs``, ``sparsity_weight``, ``index_keep``,
        ``quantizer: residual``, ...): they are moved into the blocks, so old configs, run
        folders and ``--set`` overrides keep working."""
        if isinstance(raw.get("quantizer"), str):
            raw["quantizer"] = {"kind": raw["quantizer"]}
        for old, (block, key) in _MOVED_KEYS.items():
            if old not in raw:
                continue
            value, section = raw.pop(old), raw.get(block) or {}
            if not isinstance(section, dict):
                raise ValueError(f"{block}: expected a mapping, got {section!r}")
            if key in section and section[key] != value:
                raise ValueError(f"{old} is {block}.{key} now, and both are set (to {value!r} and {section[key]!r})")
            raw[block] = {**section, key: value}
        return raw

    def build(self, dataset: Dataset, context: BuildContext) -> SparCode:
        return SparCode(dataset, self, context)

    def check_run(self, run: Any) -> None:
        if self.user_tokens_from == "history" and self.user_tokens > run.train.history_length:
            raise ValueError(f"model.user_tokens: {self.user_tokens} history tokens need train.history_length >= "
                             f"{self.user_tokens}, got {run.train.history_length}")
        warmup = self.quantizer.warmup_epochs
        if self.quantize and warmup >= run.train.epochs:
            raise ValueError(f"model.quantizer.warmup_epochs: {warmup} leaves no quantised epoch in train.epochs "
                             f"{run.train.epochs}")

    @model_validator(mode="after")
    def _codebooks_divide_dim(self):
        q = self.quantizer
        if self.quantize and q.kind == "product" and self.token_dim % q.num_codebooks:
            what = "projection_dim" if self.tokenizer == "late" else "dim"
            raise ValueError(f"{what} {self.token_dim} is not divisible by quantizer.num_codebooks {q.num_codebooks}")
        return self

    @model_validator(mode="after")
    def _late_tokens_are_fixed(self):
        """The late tokenizer's token counts are the substrate's: one per user field, history
        slot and expansion token, one per item field."""
        fixed = [name for name in ("user_tokens", "user_tokens_from", "item_tokens")
                 if getattr(self, name) != type(self).model_fields[name].default]  # a saved run writes defaults
        if self.tokenizer == "late" and fixed:
            raise ValueError(f"tokenizer 'late' takes its token counts from the substrate; drop {fixed}")
        return self

    @model_validator(mode="after")
    def _enumerable_codes(self):
        """Refused when the config is read, not after training, when the index is built."""
        codes = self.quantizer.num_codes
        if self.index.codes == "all" and codes > MAX_ENUMERATED_CODES:
            raise ValueError(f"index.codes 'all' would enumerate codebook_size^num_codebooks = {codes:,} codes, "
                             f"more than {MAX_ENUMERATED_CODES:,}; use 'observed'")
        return self

    @model_validator(mode="after")
    def _late_needs_an_encoder_for_any_item_token_count(self):
        """The MLP encoder reads a fixed number of item tokens; the late tokenizer's item token
        count follows the item fields, so it is refused here, when the config is read, rather
        than when the model is built."""
        if self.tokenizer == "late" and self.interaction == "mlp":
            raise ValueError("tokenizer 'late' needs interaction 'maxsim' or 'sa' (the MLP encoder reads a "
                             "fixed number of item tokens)")
        return self


def build_tokenizers(
    dataset: Dataset, config: TokenizerConfig, context: BuildContext, user_tokens: int, item_tokens: int,
    from_history: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """The user tokenizer (DNN or SA) and the item tokenizer, sharing the item field embeddings
    between the history (user side) and the item side (``late``: both towers share a substrate
    and a projection). ``from_history``: one user token per recent history item."""
    s = config
    user_field_names = context.user_fields(s.user_fields, dataset)
    if s.tokenizer == "late":
        towers = LateTowers(dataset, s.dim, s.projection_dim, context.history_length, s.sa_layers, s.item_layers,
                            s.sa_heads, s.dropout, user_field_names, s.item_fields, s.expansion_tokens)
        return LateUserTokenizer(towers), LateItemTokenizer(towers)
    item_fields = FieldEmbedder(dataset.items.select(s.item_fields), s.dim)
    user_table = dataset.users.select(user_field_names)
    user_fields = FieldEmbedder(user_table, s.dim) if user_table.fields else None
    if s.tokenizer == "dnn":
        tokenizer = DNNTokenizer(user_fields, item_fields, s.dim, user_tokens, s.tokenizer_hidden, s.dropout, from_history)
    else:
        tokenizer = SATokenizer(
            user_fields, item_fields, s.dim, user_tokens, context.history_length, s.sa_layers, s.sa_heads, s.dropout,
            from_history,
        )
    return tokenizer, ItemTokenizer(item_fields, s.dim, item_tokens, s.item_hidden, s.dropout)


class SparCode(Recommender):
    def __init__(self, dataset: Dataset, config: SparCodeConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        s = self.config = config
        self.tokenizer, self.item_tokenizer = build_tokenizers(
            dataset, s, context, s.user_tokens, s.item_tokens, from_history=s.user_tokens_from == "history"
        )
        d = s.token_dim
        if s.interaction == "mlp":  # (never with the late tokenizer: SparCodeConfig refuses it)
            self.interaction = InteractionMLP(d, s.item_tokens, s.interaction_hidden, s.dropout, s.interaction_products)
        elif s.interaction == "maxsim":
            self.interaction = InteractionMaxSim(s.maxsim_temperature)
        else:
            self.interaction = InteractionSA(d, s.sa_heads, s.interaction_hidden, s.dropout)
        self.quantizer = None
        if s.quantize:
            q = s.quantizer
            quantizer_class = ResidualQuantizer if q.kind == "residual" else ProductQuantizer
            self.quantizer = quantizer_class(
                d, q.num_codebooks, q.codebook_size, commitment=q.commitment, dead_threshold=q.dead_threshold
            )
            self.warmup_epochs = q.warmup_epochs
        # Whether tokens are quantised now: never without a quantiser, off during the warm-up
        # epochs. A buffer, so that a checkpoint resumes in the right phase.
        self.register_buffer("quantizing", torch.tensor(self.quantizer is not None and self.warmup_epochs == 0))
        # Training steps taken with the L1 penalty on (it ramps up over sparsity.ramp_steps); a
        # buffer, so that a resumed run continues the ramp where it stopped.
        self.register_buffer("sparsity_steps", torch.zeros((), dtype=torch.int64))
        self.register_load_state_dict_pre_hook(_count_from_zero_if_absent)
        # (positive, all) per-token candidate scores in training since the last training_stats().
        self._score_counts = torch.zeros(2, dtype=torch.int64)
        # A per-item prior outside the code scores. Without it an item's popularity can only be
        # expressed through every code's score of it, which fills each posting list with the
        # popular items whatever the code means; with it the code scores need only say what the
        # code adds, so they can be zero for most items. Served as one dense vector beside the
        # posting lists (SparseCodeIndex's ``item_prior``).
        self.bias = item_prior(self.num_items, s.item_bias)

    @torch.no_grad()
    def begin_epoch(self, epoch: int, examples: TrainExamples) -> None:
        """At the end of the warm-up: k-means codebooks from the tokens learned so far, then quantise."""
        if self.quantizer is None or bool(self.quantizing) or epoch < self.warmup_epochs:
            return
        sample = torch.randperm(len(examples))[: self.config.quantizer.kmeans_examples].numpy()
        blocks = np.array_split(sample, -(-len(sample) // 1024))
        self.eval()
        tokens = torch.cat([_real_tokens(*self.tokenizer.tokenize(examples.user_input(block).to(self.device)))
                            for block in blocks])
        self.quantizer.init_kmeans(tokens, seed=epoch)
        self.quantizing.fill_(True)
        log.info("epoch %d: codebooks set by k-means on %d tokens; quantisation on", epoch, len(tokens))

    def averaged_buffers(self) -> list[str]:
        """With ``average_codebooks``, the codebooks follow the averaged weights, so that the
        validated, saved and indexed model snaps its tokens to codes that match its item tower
        (see :mod:`crosstower.train.averaging`)."""
        return ["quantizer.codebooks"] if self.quantizer is not None and self.config.quantizer.average_codebooks else []

    # ---- the pieces the index needs -------------------------------------------------------
    def user_tokens(self, user: UserInput) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Quantised user tokens ``[B, K_u, D]``, their codes ``[B, K_u, M]`` (None unquantised)
        and which tokens are real ``[B, K_u]`` (None: all). A token that is not real (a history
        slot without an item) is neither quantised nor scored: its vector is 0, its code -1."""
        return self._quantized_tokens(user)[:3]

    def _quantized_tokens(self, user: UserInput) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                           torch.Tensor]:
        """:meth:`user_tokens` and the quantiser's loss (0 unquantised)."""
        tokens, mask = self.tokenizer.tokenize(user)
        if not bool(self.quantizing):
            return tokens, None, mask, tokens.new_zeros(())
        real = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask
        out = self.quantizer(tokens[real])  # the codebooks learn from real tokens only
        quantized = tokens.new_zeros(tokens.shape).masked_scatter(real.unsqueeze(-1), out.quantized)
        codes = out.codes.new_full((*real.shape, out.codes.shape[-1]), -1)
        codes[real] = out.codes
        return quantized, codes, mask, out.loss

    def user_scores(self, user: UserInput, item_tokens: torch.Tensor) -> torch.Tensor:
        """``y(u, i)``: the sum over the user's real tokens of their sparsified scores."""
        tokens, _, mask = self.user_tokens(user)
        return _sum_real(self.sliced_token_scores(tokens, item_tokens), mask)

    def token_scores(self, tokens: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """Sparsified per-token scores ``ReLU(E(token, item) + b)``: ``[..., T, N]``."""
        return F.relu(self.interaction(tokens, item_tokens) + self.config.sparsity.bias)

    def sliced_token_scores(self, tokens: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`token_scores` against a whole catalogue, a slice of items at a time, because the
        encoder's activations grow with tokens x items."""
        n = item_tokens.shape[0]
        return torch.cat(
            [self.token_scores(tokens, item_tokens[lo : lo + SCORE_SLICE]) for lo in range(0, n, SCORE_SLICE)], dim=-1
        )

    def score_codes(self, codes: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """What the index stores: the score of each code ``[C, M]`` against each item ``[C, N]``."""
        return self.sliced_token_scores(self.quantizer.lookup(codes), item_tokens)

    def item_bias(self, items: torch.Tensor) -> torch.Tensor:
        """The per-item prior (zeros without ``item_bias``), shaped like ``items``."""
        if self.bias is None:
            return torch.zeros(items.shape, device=items.device)
        return self.bias(items).squeeze(-1)

    def training_stats(self) -> dict[str, float]:
        """The share of positive (token, candidate) scores in the epoch's batches, and once
        quantised the codebooks' usage and perplexity (collapse shows here first).

        A share of 0 means the ReLU of ``sum_k ReLU(E + b)`` has died: every score is 0, no
        gradient reaches the tokenizer or the encoder again, and only the item prior (if any)
        ranks. Measured once on the synthetic default (history tokens with the prior, seed 1:
        every score 0 after the first epoch, validation at popularity level); it is logged as a
        warning so that such a run is stopped, not reported.
        """
        positive, total = (int(c) for c in self._score_counts)
        self._score_counts = torch.zeros_like(self._score_counts)
        stats = {"positive_share": positive / total} if total else {}
        if total and positive == 0:
            log.warning("every (user token, item) score of this epoch was 0: the ReLU has died and the model "
                        "cannot recover (only the item prior ranks); try model.sparsity.bias 0.5 (if it died while "
                        "warming up) and model.sparsity.ramp_steps about one epoch of steps (if it died when "
                        "the L1 penalty came on), or another train.seed")
        if bool(self.quantizing):
            stats.update({f"vq_{k}": v for k, v in self.quantizer.window_stats().items()})
        return stats

    @torch.no_grad()
    def code_usage(self, users: UserInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct codes ``[C, M]`` that ``users``' real tokens take, and how many tokens took
        each ``[C]``."""
        if not bool(self.quantizing):
            raise ValueError("an unquantised (all-to-all or still warming up) model has no codes to index")
        self.eval()
        blocks = []
        for lo in range(0, len(users), 1024):
            _, codes, mask = self.user_tokens(UserInput(users.users[lo : lo + 1024], users.history[lo : lo + 1024]))
            blocks.append(_real_tokens(codes, mask))
        return torch.unique(torch.cat(blocks), dim=0, return_counts=True)

    def build_index(self, training_users: UserInput) -> SparseCodeIndex | None:
        """The sparse code index of the training users' codes, kept and built as ``index``
        configures; None for the unquantised all-to-all model (served by exhaustive scoring)."""
        if self.quantizer is None:
            return None
        settings = self.config.index
        log.info("building the sparse code index from %d training users", len(training_users))
        return self.build_code_index(training_users, keep=settings.keep_rule(), workers=settings.workers,
                                     codes=settings.codes)

    @torch.no_grad()
    def build_code_index(self, users: UserInput, keep="nonzero", code_chunk: int = 256, workers: int = 1,
                         codes: Literal["observed", "all"] = "observed") -> SparseCodeIndex:
        """The sparse (code -> item, score) index, with how many of ``users``' tokens took each
        code (for a :class:`UsageBudget`).

        ``codes="observed"`` (the default) indexes the codes that ``users``' tokens occur as,
        because most of the N^M tuples never do; ``"all"`` enumerates every one of them, so that
        no user's code ever falls back to its nearest indexed code (the table is then N^M x items
        scores to score and prune). ``workers > 1`` scores code chunks in that many processes.
        """
        distinct, usage = self.code_usage(users)
        if codes == "all":
            distinct, usage = self._every_code(distinct, usage)
        elif codes != "observed":
            raise ValueError(f"codes must be 'observed' or 'all', got {codes!r}")
        catalogue = torch.arange(self.num_items, device=self.device)
        prior = self.item_bias(catalogue) if self.bias is not None else None
        return SparseCodeIndex.build(
            CodeScorer(self, self.item_tokenizer(catalogue)), distinct, self.quantizer.lookup(distinct),
            self.num_items, self.config.quantizer.codebook_size, keep=keep, code_chunk=code_chunk, workers=workers,
            item_prior=prior, code_usage=usage,
        )

    def _every_code(self, observed: torch.Tensor, usage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All N^M code tuples in id order, and their usage (0 for the codes no token took)."""
        n, m = self.config.quantizer.codebook_size, self.config.quantizer.num_codebooks
        if n**m > MAX_ENUMERATED_CODES:
            raise ValueError(f"model.index.codes 'all' would enumerate {n}^{m} = {n**m:,} codes, more than "
                             f"{MAX_ENUMERATED_CODES:,}; index the observed codes instead")
        log.info("enumerating all %d^%d = %d codes for the index", n, m, n**m)
        every = every_code(n, m).to(observed.device)
        counts = torch.zeros(len(every), dtype=usage.dtype, device=usage.device)
        counts[torch.from_numpy(encode_code_ids(observed.cpu(), n)).to(usage.device)] = usage
        return every, counts

    @torch.no_grad()
    def index_query(self, user: UserInput) -> CodeQueries:
        """The index query of a user batch: its token codes (-1 for a token that is not real) and
        quantised token vectors."""
        if self.quantizer is None:
            raise NotImplementedError("the all-to-all model (unquantised) is served by exhaustive scoring, not an index")
        return self.serving_codes(user)

    def serving_codes(self, user: UserInput) -> CodeQueries:
        """:meth:`index_query` of a trained model, on fixed shapes: every token is assigned its
        code (what :meth:`user_tokens` gives in eval mode), then a token that is not real gets
        code -1 and vector 0. No branch or shape depends on the data, so the user side exports
        as one ONNX graph (``crosstower export``)."""
        tokens, mask = self.tokenizer.tokenize(user)
        _, codes = self.quantizer.assign(tokens)
        codes = codes.t().reshape(*tokens.shape[:-1], -1)
        vectors = self.quantizer.lookup(codes).to(tokens.dtype)
        if mask is not None:
            codes = torch.where(mask.unsqueeze(-1), codes, torch.full_like(codes, -1))
            vectors = torch.where(mask.unsqueeze(-1), vectors, torch.zeros_like(vectors))
        return CodeQueries(codes, vectors)

    # ---- the model contract ---------------------------------------------------------------
    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self.user_scores(user, self.item_tokenizer(items)) + self.item_bias(items)

    def item_scorer(self):
        """Tokenises the catalogue once; each call scores a range of it."""
        with torch.no_grad():
            catalogue = torch.arange(self.num_items, device=self.device)
            item_tokens, prior = self.item_tokenizer(catalogue), self.item_bias(catalogue)

        def scorer(user: UserInput, start: int, stop: int) -> torch.Tensor:
            return self.user_scores(user, item_tokens[start:stop]) + prior[start:stop]

        return scorer

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """``y(u, i)`` of each row's positive, sampled and (optionally) in-batch candidates. States
        (always: the extra losses read them): ``token_scores [B, K_u, 1 + K]`` (per user token,
        the positive first), ``real`` tokens ``[B, K_u]`` (None: all) and ``vq_loss``; with
        ``with_states`` also the quantised user ``tokens`` and the candidates' ``item_tokens``."""
        tokens, _, real, vq_loss = self._quantized_tokens(batch.user)  # [B, K_u, D], which are real [B, K_u]
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)  # [B, 1 + K]
        unique, inverse = torch.unique(candidates, return_inverse=True)
        flat = self.item_tokenizer(unique).flatten(1)
        item_tokens = F.embedding(inverse, flat).view(*candidates.shape, -1, self.config.token_dim)
        token_scores = self.token_scores(tokens, item_tokens)  # [B, K_u, 1 + K]
        if self.training:
            self._count_positive_scores(token_scores, real)
        logits = _sum_real(token_scores, real) + self.item_bias(candidates)
        in_batch_logits = None
        if batch.in_batch_mask is not None:
            # every user against every row's positive: [B, K_u, D] x [B, K_i, D] -> [B, B]
            in_batch_logits = _sum_real(self.token_scores(tokens, item_tokens[:, 0]), real)
            in_batch_logits = in_batch_logits + self.item_bias(batch.positives)[None, :]
        states = {"token_scores": token_scores, "real": real, "vq_loss": vq_loss}
        if with_states:
            states.update(tokens=tokens, item_tokens=item_tokens)
        return batch.logits(logits[:, 0], logits[:, 1:], in_batch_logits, states)

    @torch.no_grad()
    def _count_positive_scores(self, token_scores: torch.Tensor, real: torch.Tensor | None) -> None:
        """Adds the batch's (positive, all) real per-token scores to the epoch's counts (device
        tensors, read once an epoch: no sync on the training step)."""
        positive = token_scores > 0 if real is None else (token_scores > 0) & real.unsqueeze(-1)
        scored = token_scores[..., 0].numel() if real is None else real.sum()
        counts = torch.stack([positive.sum(), torch.as_tensor(scored, device=positive.device) * token_scores.shape[-1]])
        self._score_counts = self._score_counts.to(counts.device) + counts

    def extra_losses(self, batch: TrainBatch, logits: CandidateLogits) -> LossTerms:
        """The quantiser's loss and an L1 penalty on the sampled negatives' (code, item) scores.

        The L1 pushes them to exact zeros, which is what lets the index keep few entries per code
        (the FLOPS-style regulariser of learned sparse retrieval, e.g. SPLADE, applied to
        SparCode's score table). Only once quantised: from the first step it drove every score of
        the synthetic default to zero, where the ReLU passes no gradient and training cannot
        recover.
        """
        token_scores, real = logits.states["token_scores"], logits.states["real"]
        sparsity = token_scores.new_zeros(())
        if bool(self.quantizing) and batch.negatives.shape[1]:
            sparsity = _real_tokens(token_scores[..., 1:], real).mean()
        return {"vq": (logits.states["vq_loss"], self.config.quantizer.weight),
                "sparsity": (sparsity, self._sparsity_weight())}

    def _sparsity_weight(self) -> torch.Tensor:
        """The L1 weight of this step, ``sparsity_weight * min(1, (t / ramp)^2)`` after ``t``
        quantised training steps (SPLADE's quadratic warm-up of its regulariser); counts the step."""
        s = self.config.sparsity
        ramp = torch.ones((), device=self.sparsity_steps.device)
        if s.ramp_steps:
            ramp = (self.sparsity_steps.float() / s.ramp_steps).square().clamp(max=1.0)
        if self.training and bool(self.quantizing):
            self.sparsity_steps += 1
        return s.weight * ramp


def _count_from_zero_if_absent(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loading a checkpoint saved before the L1 ramp existed: its step count starts at 0."""
    state_dict.setdefault(prefix + "sparsity_steps", torch.zeros((), dtype=torch.int64))


def _real_tokens(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real tokens of ``tokens [B, K_u, ...]`` as rows ``[R, ...]``."""
    return tokens.flatten(0, 1) if mask is None else tokens[mask]


def _sum_real(token_scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token scores ``[B, K_u, N]`` summed over the real tokens (``mask [B, K_u]``)."""
    if mask is None:
        return token_scores.sum(-2)
    return (token_scores * mask.unsqueeze(-1).to(token_scores.dtype)).sum(-2)


class CodeScorer:
    """What :meth:`SparseCodeIndex.build` calls on a trained model: the scores of a chunk of
    codes against the whole catalogue, whose item tokens are computed once. A class, not a
    closure, so that a multi-process build can pickle it to its spawned workers."""

    def __init__(self, model: SparCode, item_tokens: torch.Tensor) -> None:
        self.model, self.item_tokens = model, item_tokens

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.score_codes(codes, self.item_tokens)
