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
self-attention encoder ``E``; ``late`` is late interaction's user tower
(:mod:`crosstower.nn.late_towers`), one normalised vector per user field, history item and
expansion token, scored by :class:`InteractionMaxSim` (``E(q, i) = max_b q . d_b / tau``), which
makes ``y`` ColBERT's MaxSim with the sparsity control and quantised user vectors.

With ``quantize: false`` the same tokenizer and encoder, unquantised and scored exhaustively,
give the all-to-all upper bound the index is measured against. With ``item_bias`` a learned
per-item prior ``p_i`` is added outside the sum, ``y(u, i) = p_i + sum_k ReLU(...)``, and served
as one dense vector beside the posting lists (not in the paper; see ``__init__`` for why).

Training: sampled softmax over the candidates (plus in-batch negatives with logQ, optionally),
the quantiser's commitment loss and, with ``sparsity_weight``, an L1 penalty on the sampled
negatives' per-token scores (once quantised, its weight optionally grown over
``sparsity_ramp_steps``) that drives the score table towards exact zeros. With
``vq_warmup_epochs`` the model first trains unquantised (the all-to-all model), then
:meth:`begin_epoch` sets the codebooks by k-means on the tokens it has learned and quantisation
starts; seeding the codebooks from the first batch of an untrained tokenizer instead collapsed to
3 of 256 entries in use on the synthetic default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crosstower.config import MAX_ENUMERATED_CODES
from crosstower.data.batching import TrainBatch, TrainExamples, UserInput
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.losses import sampled_softmax
from crosstower.models.base import Recommender, item_prior
from crosstower.nn.fields import MLP, FieldEmbedder
from crosstower.nn.late_towers import LateItemTokenizer, LateTowers, LateUserTokenizer
from crosstower.nn.tokenizers import DNNTokenizer, ItemTokenizer, SATokenizer


log = logging.getLogger("crosstower.sparcode")

SCORE_SLICE = 256  # items per encoder call in exhaustive scoring


@dataclass
class SparCodeSettings:
    tokenizer: str = "dnn"  # "dnn", "sa" or "late"
    dim: int = 64
    projection_dim: int = 32  # "late" only: the size of every token vector
    item_layers: int = 1  # "late" only
    expansion_tokens: int = 0  # "late" only
    user_tokens: int = 4
    user_tokens_from: str = "summary"  # "summary" or "history" (one token per recent history item)
    item_tokens: int = 4
    user_fields: list[str] | None = None
    item_fields: list[str] | None = None
    tokenizer_hidden: list[int] = field(default_factory=lambda: [256])
    item_hidden: list[int] = field(default_factory=lambda: [128])
    max_history: int = 50
    sa_layers: int = 2
    sa_heads: int = 2
    interaction: str = "mlp"  # "mlp", "sa" or "maxsim"
    maxsim_temperature: float = 1.0
    interaction_hidden: list[int] = field(default_factory=lambda: [128, 64])
    interaction_products: bool = False
    quantize: bool = True
    quantizer: str = "product"  # "product" or "residual"
    num_codebooks: int = 2
    codebook_size: int = 256
    commitment: float = 0.25
    vq_weight: float = 1.0
    vq_warmup_epochs: int = 0
    vq_dead_threshold: float = 0.1
    kmeans_examples: int = 8192
    sparsity_bias: float = 0.0
    sparsity_weight: float = 0.0
    sparsity_ramp_steps: int = 0
    item_bias: bool = False
    average_codebooks: bool = False  # with train.ema_decay: average the codebooks with the weights
    dropout: float = 0.0

    @property
    def token_dim(self) -> int:
        """The size of a user token vector (what is quantised) and of an item token vector."""
        return self.projection_dim if self.tokenizer == "late" else self.dim


class InteractionMLP(nn.Module):
    """``E(token, item) = MLP([token; item tokens])``, optionally with a multiplicative term.

    The first layer is split by input part. ``W [t; v] = W_t t + W_v v``: projecting tokens and
    items separately and adding them is the same function as the MLP on the concatenation, but
    scores all T x N pairs without ever building T x N concatenated inputs.

    With ``products``, the first layer also adds ``(A t) * (B v)`` (element-wise): a factorised
    bilinear term. An MLP over a plain concatenation learns multiplicative interactions (a
    similarity, a conjunction such as "the token's cluster is the item's cluster") only slowly
    and approximately (Rendle et al., RecSys 2020); with this term an inner product of the token
    and the item is one layer away, and per pair it costs one more element-wise product of the
    two projections, not a matrix product.
    """

    def __init__(self, dim: int, item_tokens: int, hidden: list[int], dropout: float = 0.0, products: bool = False):
        super().__init__()
        self.token_in = nn.Linear(dim, hidden[0])
        self.item_in = nn.Linear(item_tokens * dim, hidden[0], bias=False)
        self.token_gate = nn.Linear(dim, hidden[0], bias=False) if products else None
        self.item_gate = nn.Linear(item_tokens * dim, hidden[0], bias=False) if products else None
        self.rest = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), MLP([*hidden, 1], dropout))
        # Start every (token, item) score positive: a ReLU'd score that starts <= 0 everywhere
        # has no gradient and never recovers. Training then pushes negatives' scores to exact 0.
        nn.init.constant_(self.rest[-1][-1].bias, 1.0)

    def forward(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``tokens [..., T, D]`` x ``items [..., N, K_i, D]`` -> scores ``[..., T, N]``."""
        items = items.flatten(-2)
        hidden = self.token_in(tokens).unsqueeze(-2) + self.item_in(items).unsqueeze(-3)  # [..., T, N, H]
        if self.token_gate is not None:
            hidden = hidden + self.token_gate(tokens).unsqueeze(-2) * self.item_gate(items).unsqueeze(-3)
        return self.rest(hidden).squeeze(-1)


def build_tokenizers(
    dataset: Dataset, s: SparCodeSettings, user_tokens: int, item_tokens: int
) -> tuple[nn.Module, nn.Module]:
    """The user tokenizer (DNN or SA) and the item tokenizer, sharing the item field embeddings
    between the history (user side) and the item side (``late``: both towers share a substrate
    and a projection)."""
    if s.tokenizer == "late":
        towers = LateTowers(dataset, s.dim, s.projection_dim, s.max_history, s.sa_layers, s.item_layers, s.sa_heads,
                            s.dropout, s.user_fields, s.item_fields, s.expansion_tokens)
        return LateUserTokenizer(towers), LateItemTokenizer(towers)
    item_fields = FieldEmbedder(dataset.items.select(s.item_fields), s.dim)
    user_table = dataset.users.select(s.user_fields)
    user_fields = FieldEmbedder(user_table, s.dim) if user_table.fields else None
    from_history = s.user_tokens_from == "history"
    if s.tokenizer == "dnn":
        tokenizer = DNNTokenizer(user_fields, item_fields, s.dim, user_tokens, s.tokenizer_hidden, s.dropout, from_history)
    else:
        tokenizer = SATokenizer(
            user_fields, item_fields, s.dim, user_tokens, s.max_history, s.sa_layers, s.sa_heads, s.dropout, from_history
        )
    return tokenizer, ItemTokenizer(item_fields, s.dim, item_tokens, s.item_hidden, s.dropout)


class InteractionSA(nn.Module):
    """``E(token, item)``: one pre-norm transformer layer over ``[token; item tokens]``, scored
    from the first position.

    Only the first position's output is scored, so only its row of attention is computed: the
    token's query against the keys of the token and of the ``K_i`` item tokens. The result is
    exactly that of a full layer over the ``1 + K_i`` tokens (tested against one), at the cost of
    one attention row per (token, item) pair.
    """

    def __init__(self, dim: int, heads: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.norm_in, self.norm_mid, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden[0]), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden[0], dim))
        self.score_head = nn.Linear(dim, 1)
        nn.init.constant_(self.score_head.bias, 1.0)  # start positive, as in InteractionMLP

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(self.norm_in(x)).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def forward(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T, D]`` x ``items [N, K_i, D]`` or ``[B, N, K_i, D]`` -> ``[B, T, N]``;
        ``tokens [T, D]`` (codes to index) x ``items [N, K_i, D]`` -> ``[T, N]``."""
        if tokens.dim() == 2:
            return self.forward(tokens.unsqueeze(0), items)[0]
        if items.dim() == 3:
            items = items.unsqueeze(0)
        q, k_t, v_t = self._split(tokens)  # [B, T, H, dh]
        _, k_i, v_i = self._split(items)  # [Bi, N, K_i, H, dh]
        scale = self.head_dim**-0.5
        self_logit = (q * k_t).sum(-1)[:, :, None, None, :] * scale  # [B, T, 1, 1, H]
        item_logit = (q[:, :, None, None] * k_i[:, None]).sum(-1) * scale  # [B, T, N, K_i, H]
        weights = torch.softmax(torch.cat([self_logit.expand(-1, -1, item_logit.shape[2], -1, -1), item_logit], 3), 3)
        mixed = weights[..., :1, :, None] * v_t[:, :, None, None] + (weights[..., 1:, :, None] * v_i[:, None]).sum(
            3, keepdim=True
        )  # [B, T, N, 1, H, dh]
        x = tokens[:, :, None] + self.attn_out(mixed.squeeze(3).flatten(-2))  # [B, T, N, D]
        x = x + self.ffn(self.norm_mid(x))
        return self.score_head(self.norm_out(x)).squeeze(-1)


class InteractionMaxSim(nn.Module):
    """``E(token, item) = max_b <token, d_b> / tau``: late interaction's per-token term.

    ColBERT's MaxSim is ``sum_a max_b q_a . d_b``; inside SparCode each user token's max becomes
    one (code, item) score, so ``y(u, i) = sum_a ReLU(max_b q_a . d_b / tau + b)`` is MaxSim with
    the sparsity control. No parameters: the towers learn what the scores say. Not an all-to-all
    encoder (the token meets each item token alone, by one inner product), so it cannot learn
    what the MLP and SA encoders can in principle; it is the scorer under which a user tower
    without the item already beat the towers on the synthetic default (issue 4).
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``tokens [..., T, D]`` x ``items [..., N, K_i, D]`` -> ``[..., T, N]`` (leading dims
        broadcast: ``[B, T, D]`` x ``[N, K_i, D]`` scores every item, x ``[B, N, K_i, D]`` each
        user's own candidates; ``[C, D]`` codes x ``[N, K_i, D]`` gives ``[C, N]``)."""
        n, k = items.shape[-3], items.shape[-2]
        similarity = tokens @ items.flatten(-3, -2).transpose(-1, -2)  # [..., T, N * K_i]
        return similarity.unflatten(-1, (n, k)).amax(-1) / self.temperature


class SparCode(Recommender):
    def __init__(self, dataset: Dataset, settings: SparCodeSettings):
        super().__init__(dataset.num_items)
        s = self.settings = settings
        self.tokenizer, self.item_tokenizer = build_tokenizers(dataset, s, s.user_tokens, s.item_tokens)
        d = s.token_dim
        if s.interaction == "mlp":
            if s.tokenizer == "late":
                raise ConfigError("model: the 'late' tokenizer's item token count follows the item fields; use "
                                  "interaction 'maxsim' or 'sa' with it")
            self.interaction = InteractionMLP(d, s.item_tokens, s.interaction_hidden, s.dropout, s.interaction_products)
        elif s.interaction == "maxsim":
            self.interaction = InteractionMaxSim(s.maxsim_temperature)
        else:
            self.interaction = InteractionSA(d, s.sa_heads, s.interaction_hidden, s.dropout)
        self.quantizer = None
        if s.quantize:
            from crosstower.nn.quantizer import ProductQuantizer, ResidualQuantizer

            quantizer_class = ResidualQuantizer if s.quantizer == "residual" else ProductQuantizer
            self.quantizer = quantizer_class(
                d, s.num_codebooks, s.codebook_size, commitment=s.commitment, dead_threshold=s.vq_dead_threshold
            )
            self.warmup_epochs = s.vq_warmup_epochs
        # Whether tokens are quantised now: never without a quantiser, off during the warm-up
        # epochs. A buffer, so that a checkpoint resumes in the right phase.
        self.register_buffer("quantizing", torch.tensor(self.quantizer is not None and self.warmup_epochs == 0))
        self.last_vq_loss = torch.zeros(())
        # Training steps taken with the L1 penalty on (it ramps up over sparsity_ramp_steps); a
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
        sample = torch.randperm(len(examples))[: self.settings.kmeans_examples].numpy()
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
        return ["quantizer.codebooks"] if self.quantizer is not None and self.settings.average_codebooks else []

    # ---- the pieces the index needs -------------------------------------------------------
    def user_tokens(self, user: UserInput) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Quantised user tokens ``[B, K_u, D]``, their codes ``[B, K_u, M]`` (None unquantised)
        and which tokens are real ``[B, K_u]`` (None: all). A token that is not real (a history
        slot without an item) is neither quantised nor scored: its vector is 0, its code -1."""
        tokens, mask = self.tokenizer.tokenize(user)
        if not bool(self.quantizing):
            self.last_vq_loss = tokens.new_zeros(())
            return tokens, None, mask
        real = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask
        out = self.quantizer(tokens[real])  # the codebooks learn from real tokens only
        self.last_vq_loss = out.loss
        quantized = tokens.new_zeros(tokens.shape).masked_scatter(real.unsqueeze(-1), out.quantized)
        codes = out.codes.new_full((*real.shape, out.codes.shape[-1]), -1)
        codes[real] = out.codes
        return quantized, codes, mask

    def user_scores(self, user: UserInput, item_tokens: torch.Tensor) -> torch.Tensor:
        """``y(u, i)``: the sum over the user's real tokens of their sparsified scores."""
        tokens, _, mask = self.user_tokens(user)
        return _sum_real(self.sliced_token_scores(tokens, item_tokens), mask)

    def token_scores(self, tokens: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        """Sparsified per-token scores ``ReLU(E(token, item) + b)``: ``[..., T, N]``."""
        return F.relu(self.interaction(tokens, item_tokens) + self.settings.sparsity_bias)

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
                        "cannot recover (only the item prior ranks); try model.sparsity_bias 0.5 (if it died while "
                        "warming up) and model.sparsity_ramp_steps about one epoch of steps (if it died when "
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

    @torch.no_grad()
    def build_index(self, users: UserInput, keep="nonzero", code_chunk: int = 256, workers: int = 1,
                    codes: Literal["observed", "all"] = "observed"):
        """The sparse (code -> item, score) index, with how many of ``users``' tokens took each
        code (for a :class:`UsageBudget`).

        ``codes="observed"`` (the default) indexes the codes that ``users``' tokens occur as,
        because most of the N^M tuples never do; ``"all"`` enumerates every one of them, so that
        no user's code ever falls back to its nearest indexed code (the table is then N^M x items
        scores to score and prune). ``workers > 1`` scores code chunks in that many processes.
        """
        from crosstower.index import SparseCodeIndex

        distinct, usage = self.code_usage(users)
        if codes == "all":
            distinct, usage = self._every_code(distinct, usage)
        elif codes != "observed":
            raise ValueError(f"codes must be 'observed' or 'all', got {codes!r}")
        catalogue = torch.arange(self.num_items, device=self.device)
        prior = self.item_bias(catalogue) if self.bias is not None else None
        return SparseCodeIndex.build(
            CodeScorer(self, self.item_tokenizer(catalogue)), distinct, self.quantizer.lookup(distinct),
            self.num_items, self.settings.codebook_size, keep=keep, code_chunk=code_chunk, workers=workers,
            item_prior=prior, code_usage=usage,
        )

    def _every_code(self, observed: torch.Tensor, usage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All N^M code tuples in id order, and their usage (0 for the codes no token took)."""
        from crosstower.index import encode_code_ids, every_code

        n, m = self.settings.codebook_size, self.settings.num_codebooks
        if n**m > MAX_ENUMERATED_CODES:
            raise ValueError(f"model.index_codes 'all' would enumerate {n}^{m} = {n**m:,} codes, more than "
                             f"{MAX_ENUMERATED_CODES:,}; index the observed codes instead")
        log.info("enumerating all %d^%d = %d codes for the index", n, m, n**m)
        every = every_code(n, m).to(observed.device)
        counts = torch.zeros(len(every), dtype=usage.dtype, device=usage.device)
        counts[torch.from_numpy(encode_code_ids(observed.cpu(), n)).to(usage.device)] = usage
        return every, counts

    @torch.no_grad()
    def code_queries(self, user: UserInput):
        """The index query of a user batch: its token codes (-1 for a token that is not real) and
        quantised token vectors."""
        from crosstower.index import CodeQueries

        vectors, codes, _ = self.user_tokens(user)
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

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Sampled softmax over the positive and its negatives, plus the quantiser's loss."""
        tokens, _, real = self.user_tokens(batch.user)  # [B, K_u, D], which are real [B, K_u]
        candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)  # [B, 1 + K]
        unique, inverse = torch.unique(candidates, return_inverse=True)
        flat = self.item_tokenizer(unique).flatten(1)
        item_tokens = F.embedding(inverse, flat).view(*candidates.shape, -1, self.settings.token_dim)
        token_scores = self.token_scores(tokens, item_tokens)  # [B, K_u, 1 + K]
        with torch.no_grad():  # device tensors, read once an epoch: no sync on the training step
            positive = token_scores > 0 if real is None else (token_scores > 0) & real.unsqueeze(-1)
            scored = token_scores[..., 0].numel() if real is None else real.sum()
            counts = torch.stack([positive.sum(), torch.as_tensor(scored, device=positive.device) * token_scores.shape[-1]])
            self._score_counts = self._score_counts.to(counts.device) + counts
        logits = _sum_real(token_scores, real) + self.item_bias(candidates)
        in_batch_logits = None
        if batch.in_batch_mask is not None:
            # every user against every row's positive: [B, K_u, D] x [B, K_i, D] -> [B, B]
            in_batch_logits = _sum_real(self.token_scores(tokens, item_tokens[:, 0]), real)
            in_batch_logits = in_batch_logits + self.item_bias(batch.positives)[None, :]
        negative_logits, mask, log_q = batch.candidate_logits(logits[:, 0], logits[:, 1:], in_batch_logits)
        softmax = sampled_softmax(logits[:, 0], negative_logits, mask, batch.positive_log_q, log_q)
        # L1 on the sampled negatives' (code, item) scores: pushes them to exact zeros, which is
        # what lets the index keep few entries per code (the FLOPS-style regulariser of learned
        # sparse retrieval, e.g. SPLADE, applied to SparCode's score table). Only once quantised:
        # from the first step it drove every score of the synthetic default to zero, where the
        # ReLU passes no gradient and training cannot recover.
        sparsity = token_scores.new_zeros(())
        if bool(self.quantizing) and batch.negatives.shape[1]:
            sparsity = _real_tokens(token_scores[..., 1:], real).mean()
        weight = self._sparsity_weight()
        total = softmax + self.settings.vq_weight * self.last_vq_loss + weight * sparsity
        return total, {"softmax": float(softmax.detach()), "vq": float(self.last_vq_loss.detach()),
                       "sparsity": float(sparsity.detach()), "sparsity_weight": float(weight)}

    def _sparsity_weight(self) -> torch.Tensor:
        """The L1 weight of this step, ``sparsity_weight * min(1, (t / ramp)^2)`` after ``t``
        quantised training steps (SPLADE's quadratic warm-up of its regulariser); counts the step."""
        s = self.settings
        ramp = torch.ones((), device=self.sparsity_steps.device)
        if s.sparsity_ramp_steps:
            ramp = (self.sparsity_steps.float() / s.sparsity_ramp_steps).square().clamp(max=1.0)
        if self.training and bool(self.quantizing):
            self.sparsity_steps += 1
        return s.sparsity_weight * ramp


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
