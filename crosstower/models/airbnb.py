"""Airbnb-style embeddings (Grbovic & Cheng, KDD 2018; methods.md §1.3), served as a retriever.

Item embeddings are learnt by skip-gram with negative sampling over *sessions*: a user's
training interactions in time order, split where more than ``session_gap`` seconds pass. For
each interaction (the centre item ``l``) the objective is

- ``-log sigma(v'_c . v_l)`` (and the symmetric ``v'_l . v_c``) for the ``window`` items ``c``
  before it in the same session;
- ``-log sigma(v'_b . v_l)`` for the session's last item ``b`` as global context (Airbnb's
  booked listing: every centre of the session sees it, inside the window or not);
- ``-log sigma(-v'_n . v_l)`` for the sampled negatives ``n`` (``train.negatives``) and for
  ``market_negatives`` items drawn from ``l``'s own market (the category of ``market_field``:
  random negatives mostly come from other markets).

User types and item types live in one second space: a user's type combines its categorical
fields and how active it is (a log2 bucket of its history), an item's its ``item_type_fields``
and how popular it is in training (a log2 bucket), each combination hashed into a table;
each interaction pulls its (user type, item type) pair together against the negatives' types.

Retrieval score (methods.md): ``s(u, i) = cos(v_i, mean of v over u's recent items) + beta
cos(t_u, t_i)``, which is one inner product of ``[v_i/|v_i|; t_i/|t_i|]`` with
``[vbar/|vbar|; beta t_u/|t_u|]``, so the model is served by the inner-product index like DSSM.
``similarity: context`` scores ``v'_i . vbar`` instead of the cosine: the in-out score that the
skip-gram objective itself trains, popularity kept in the context vectors' norms.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from crosstower.config import ModelConfig
from crosstower.data.batching import TrainBatch, TrainExamples, UserInput
from crosstower.data.dataset import Dataset, category_field
from crosstower.data.schema import FieldKind
from crosstower.errors import ConfigError
from crosstower.models.base import BuildContext, EmbeddingRecommender, InnerProductIndexConfig

BUCKETS = 16  # log2 buckets of user activity and item popularity (2^15 and more share the last)


class AirbnbConfig(ModelConfig):
    """Airbnb-style skip-gram embeddings over sessions, with user-type and item-type embeddings."""

    name: Literal["airbnb"] = "airbnb"  # selects Airbnb-style session skip-gram embeddings
    dim: int = Field(32, ge=1)  # d, the width of the item and of the type embeddings
    window: int = Field(5, ge=1)  # context items before the centre within its session
    session_gap: float | None = Field(86_400.0, gt=0)  # seconds of inactivity that start a new session; null: one per user
    global_context: bool = True  # the session's last item as context of every centre (Airbnb's booking)
    market_field: str | None = None  # the item field of the "market"; null: the first categorical item field
    market_negatives: int = Field(5, ge=0)  # negatives drawn from the centre's own market (0: none, no market needed)
    recent: int = Field(10, ge=1)  # the user's most recent history items averaged into its vector
    # cosine: cos(v_i, vbar) (methods.md); context: v'_i . vbar, the in-out score the skip-gram objective
    # trains (it keeps popularity in the context vectors' norms)
    similarity: Literal["cosine", "context"] = "cosine"
    type_weight: float = Field(0.5, ge=0)  # beta: weight of the type similarity in the score
    user_type_fields: list[str] | None = None  # categorical user fields of the user type; null: all but user_id
    item_type_fields: list[str] | None = None  # categorical item fields of the item type; null: the market field, if any
    type_buckets: int = Field(100_000, ge=1)  # hashed type ids per side
    index: InnerProductIndexConfig = Field(default_factory=InnerProductIndexConfig)  # how the item vectors are served

    def check_run(self, run) -> None:
        if run.split.protocol == "p4":
            raise ValueError("model: airbnb learns from sessions of interactions; protocol p4's labelled rows are not sessions")
        negatives = run.train.negatives
        if negatives.in_batch or negatives.sampler == "none" or negatives.num == 0:
            # skip-gram's negatives are sampled (uniform or unigram^alpha, word2vec's), uncorrected: logq has no effect
            raise ValueError("train.negatives: airbnb trains by skip-gram with sampled negatives only; set in_batch: "
                             "false and num > 0 with a sampler")
        if run.train.history_length < max(self.window, self.recent):
            raise ValueError(f"train.history_length {run.train.history_length}: airbnb reads the last "
                             f"max(window, recent) = {max(self.window, self.recent)} items of each history")

    def build(self, dataset: Dataset, context: BuildContext) -> AirbnbEmbeddings:
        return AirbnbEmbeddings(dataset, self, context)


class AirbnbEmbeddings(EmbeddingRecommender):
    own_loss = True

    def __init__(self, dataset: Dataset, config: AirbnbConfig, context: BuildContext = BuildContext()):
        super().__init__(dataset.num_items)
        self.config = s = config
        self.item_in = nn.Embedding(dataset.num_items, s.dim)  # v: what retrieval reads
        self.item_out = nn.Embedding(dataset.num_items, s.dim)  # v': the context side
        nn.init.normal_(self.item_in.weight, std=1 / s.dim)
        nn.init.zeros_(self.item_out.weight)  # word2vec's start
        self.types = nn.Embedding(2 * s.type_buckets, s.dim)  # user types, then item types: one space
        nn.init.normal_(self.types.weight, std=1 / s.dim)
        market = None  # a data set without item categories trains with market_negatives: 0
        if s.market_negatives or s.market_field is not None:
            market = category_field(dataset, s.market_field, "model.market_field")
            self._index_markets(_first_values(dataset.items.values[market]))
        user_fields = _type_fields(dataset.users, s.user_type_fields, "user_id", "model.user_type_fields")
        default_item_fields = [market] if market is not None else []
        item_fields = _type_fields(dataset.items, s.item_type_fields if s.item_type_fields is not None
                                   else default_item_fields, "item_id", "model.item_type_fields")
        self.register_buffer("user_fields", _field_key(dataset.users.values, user_fields, dataset.num_users),
                             persistent=False)
        self.register_buffer("item_fields", _field_key(dataset.items.values, item_fields, dataset.num_items),
                             persistent=False)
        # the training popularity bucket of every item: set from the training data, saved with the model
        self.register_buffer("item_popularity", torch.zeros(dataset.num_items, dtype=torch.long))
        self.session_last: torch.Tensor | None = None  # per training example: its session's last item
        self.session: torch.Tensor | None = None  # per training example: its session id

    def _index_markets(self, market: np.ndarray) -> None:
        """Each item's market and the item ids grouped by market, for drawing market negatives."""
        self.register_buffer("market", torch.from_numpy(market), persistent=False)
        counts = torch.bincount(self.market, minlength=int(self.market.max()) + 1)
        self.register_buffer("market_items", torch.argsort(self.market, stable=True), persistent=False)
        self.register_buffer("market_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("market_size", counts, persistent=False)

    # ---- sessions ----------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, examples: TrainExamples) -> None:
        """Split the training examples into sessions (once) and bucket each item's popularity."""
        if self.session is not None:
            return
        users, times = examples.users, examples.times
        new_user = np.r_[True, users[1:] != users[:-1]]
        gap = self.config.session_gap
        new_session = new_user if gap is None else new_user | np.r_[True, np.diff(times) > gap]
        session = np.cumsum(new_session) - 1
        last_row = np.r_[np.flatnonzero(new_session)[1:], len(session)] - 1
        self.session = torch.from_numpy(session)
        self.session_last = torch.from_numpy(examples.items[last_row[session]])
        popularity = torch.from_numpy(np.bincount(examples.items, minlength=self.num_items))
        self.item_popularity.copy_(_log2_bucket(popularity))

    # ---- types -------------------------------------------------------------------------------
    def user_types(self, user: UserInput) -> torch.Tensor:
        activity = _log2_bucket((user.history >= 0).sum(1))
        return _hash(self.user_fields[user.users] * BUCKETS + activity, self.config.type_buckets)

    def item_types(self, items: torch.Tensor) -> torch.Tensor:
        key = self.item_fields[items] * BUCKETS + self.item_popularity[items]
        return self.config.type_buckets + _hash(key, self.config.type_buckets)

    # ---- the model contract ------------------------------------------------------------------
    def encode_users(self, user: UserInput) -> torch.Tensor:
        recent = user.history[:, -self.config.recent:]
        mask = (recent >= 0).unsqueeze(-1).float()
        mean = (self.item_in(recent.clamp_min(0)) * mask).sum(1) / mask.sum(1).clamp_min(1)
        types = F.normalize(self.types(self.user_types(user)), dim=-1)
        if self.config.similarity == "cosine":
            mean = F.normalize(mean, dim=-1)
        return torch.cat([mean, self.config.type_weight * types], dim=-1)

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        if self.config.similarity == "cosine":
            vectors = F.normalize(self.item_in(items), dim=-1)
        else:
            vectors = self.item_out(items)
        return torch.cat([vectors, F.normalize(self.types(self.item_types(items)), dim=-1)], dim=-1)

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The skip-gram objective of the module docstring, each part averaged over the batch."""
        if batch.examples is None or self.session is None:
            raise RuntimeError("airbnb trains on the trainer's examples (their sessions are set at begin_epoch)")
        rows = batch.examples
        centre = self.item_in(batch.positives)  # [B, d]
        parts = {"context": self._window_term(batch, centre), "negative": self._negative_term(batch, centre)}
        if self.config.global_context:
            last = self.session_last[rows].to(rows.device)
            keep = (last != batch.positives).float()
            parts["global"] = (F.softplus(-(centre * self.item_out(last)).sum(-1)) * keep).mean()
        if self.config.market_negatives:
            parts["market"] = F.softplus((centre[:, None] * self.item_out(self._market_sample(batch.positives))).sum(-1)).sum(1).mean()
        parts["types"] = self._type_term(batch)
        total = sum(parts.values())
        return total, {name: float(value.detach()) for name, value in parts.items()}

    def _window_term(self, batch: TrainBatch, centre: torch.Tensor) -> torch.Tensor:
        window = self.config.window
        rows = batch.examples
        context = batch.user.history[:, -window:]  # the rows rows - window .. rows - 1
        context_rows = rows[:, None] - window + torch.arange(window, device=rows.device)
        same = (context >= 0) & (self.session[context_rows.clamp_min(0)].to(rows.device) == self.session[rows][:, None].to(rows.device))
        context = context.clamp_min(0)
        forward = (centre[:, None] * self.item_out(context)).sum(-1)  # centre reads its context
        backward = (self.item_in(context) * self.item_out(batch.positives)[:, None]).sum(-1)  # and the reverse
        loss = (F.softplus(-forward) + F.softplus(-backward)) * same
        return loss.sum(1).mean()

    def _negative_term(self, batch: TrainBatch, centre: torch.Tensor) -> torch.Tensor:
        logits = (centre[:, None] * self.item_out(batch.negatives)).sum(-1)
        return (F.softplus(logits) * (~batch.negative_mask)).sum(1).mean()

    def _market_sample(self, items: torch.Tensor) -> torch.Tensor:
        """``market_negatives`` items drawn uniformly from each item's market (torch's generator,
        seeded per epoch by the trainer)."""
        market = self.market[items]
        draws = torch.rand(len(items), self.config.market_negatives, device=items.device)
        offset = (draws * self.market_size[market][:, None]).long()
        return self.market_items[self.market_start[market][:, None] + offset]

    def _type_term(self, batch: TrainBatch) -> torch.Tensor:
        user = self.types(self.user_types(batch.user))  # [B, d]
        positive = (user * self.types(self.item_types(batch.positives))).sum(-1)
        negative = (user[:, None] * self.types(self.item_types(batch.negatives))).sum(-1)
        return (F.softplus(-positive) + (F.softplus(negative) * (~batch.negative_mask)).sum(1)).mean()


def _first_values(values: np.ndarray) -> np.ndarray:
    """A categorical column as is; a multi-valued one by its first value (the primary category)."""
    return (values if values.ndim == 1 else values[:, 0]).astype(np.int64)


def _type_fields(table, requested: list[str] | None, id_field: str, key: str) -> list[str]:
    categorical = [n for n, f in table.fields.items()
                   if n != id_field and f.kind in (FieldKind.CATEGORICAL, FieldKind.MULTI_CATEGORICAL)]
    if requested is None:
        return categorical
    unknown = [n for n in requested if n not in categorical]
    if unknown:
        raise ConfigError(f"{key}: {unknown[0]!r} is not a categorical field here (choose from "
                          f"{', '.join(categorical) or 'none'})")
    return requested


def _field_key(values: dict[str, np.ndarray], fields: list[str], rows: int) -> torch.Tensor:
    """One int64 key per row combining ``fields``' values (mixed radix, wrapping on overflow:
    the key is hashed into the type table anyway)."""
    key = np.zeros(rows, dtype=np.int64)
    with np.errstate(over="ignore"):
        for name in fields:
            column = _first_values(values[name])
            key = key * (int(column.max()) + 1 if len(column) else 1) + column
    return torch.from_numpy(key)


def _hash(key: torch.Tensor, buckets: int) -> torch.Tensor:
    """A type id in ``[0, buckets)``: multiplicative hashing of the combined key."""
    return (key * 2_654_435_761) % buckets


def _log2_bucket(counts: torch.Tensor) -> torch.Tensor:
    """``min(floor(log2(n + 1)), BUCKETS - 1)`` by integer comparisons: exact in an ONNX graph
    too, where a float log2 may land just below a power of two."""
    powers = 2 ** torch.arange(1, BUCKETS, device=counts.device)
    return (counts[:, None] + 1 >= powers).sum(1)
