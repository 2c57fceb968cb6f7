"""The model contract every scorer follows, from training to serving.

Training: :meth:`Recommender.candidate_logits` scores a batch's candidates (each row's positive,
its sampled negatives and, optionally, every row's positive) and :meth:`Recommender.pair_logits`
a batch of labelled pairs (P4); ``loss()`` / ``pointwise_loss()`` are those logits through the
pure functions of :mod:`crosstower.losses`, plus the model's own extra terms (a quantiser's, a
regulariser's) from the one hook :meth:`Recommender.extra_losses`. A distiller reads the same
logits (and, on request, hidden states) of a teacher and a student.

Evaluation: ``score(user, items)`` scores users against candidate items, ``score_pairs`` each
user against its own item, and ``item_scorer()`` returns the function that full-ranking
evaluation calls per item range, which a model may speed up by caching its item side.

Serving: :meth:`Recommender.build_index` returns the index that serves the model (None: it is
served by exhaustive scoring) and :meth:`Recommender.index_query` what that index searches
with. A model whose score is one inner product (:class:`EmbeddingRecommender`) is served by an
exact inner-product index over ``encode_items``, queried by ``encode_users``: the same vectors
train, evaluate and serve.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from crosstower.config import ModelConfig, Strict
from crosstower.data.batching import PointwiseBatch, TrainBatch, TrainExamples, UserInput
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.losses import CandidateLogits, PairLogits, binary_cross_entropy, listwise_softmax

if TYPE_CHECKING:
    from crosstower.evaluate.ranking import Scorer
    from crosstower.index import Index

ItemRangeScorer = Callable[[UserInput, int, int], torch.Tensor]
UserBlock = Callable[[np.ndarray], UserInput]
"""``user_input(rows)``: the model input of evaluation users ``rows`` (positions 0..n-1)."""
LossTerms = dict[str, tuple[torch.Tensor, float | torch.Tensor]]
"""Extra loss terms by name: ``(value, weight)``, added to the main loss as ``weight * value``."""


# Users are encoded in fixed blocks of this many, whatever the evaluation batch size, so that a
# user's vector (and hence the metrics) never depends on ``user_batch``, and an index is queried
# with the very vectors exhaustive evaluation ranked with.
ENCODE_BLOCK = 1024


@dataclass(frozen=True)
class BuildContext:
    """What a model's shape depends on besides its own config: the protocol and the history
    length of the run (how many recent items a user's input holds)."""

    protocol: str = "p1"
    history_length: int = 50

    @property
    def users_have_history(self) -> bool:
        """Under P3 the evaluated users have no history, so the user side does not read one in
        training either."""
        return self.protocol != "p3"

    def user_fields(self, requested: list[str] | None, dataset: Dataset) -> list[str] | None:
        """The user fields a model reads. Under P2/P3 the evaluated users were never trained on,
        so a ``user_id`` embedding would be untrained noise for them: it is left out by default
        and refused when asked for."""
        if self.protocol not in ("p2", "p3"):
            return requested
        if requested is None:
            return [f for f in dataset.users.fields if f != "user_id"]
        if "user_id" in requested:
            raise ConfigError(f"model.user_fields: 'user_id' is untrained for held-out users under {self.protocol}")
        return requested


def item_prior(num_items: int, enabled: bool) -> nn.Embedding | None:
    """A learned per-item prior ``p_i`` added to a model's score (zero at the start), or None.

    Popularity is what shared or unit-length vectors express worst; one scalar per item carries
    it so that the vectors, tokens or codes need only say what the user adds. The towers,
    SparCode and late interaction keep it as ``self.bias`` (checkpoint key ``bias.weight``);
    IntTower, whose ``bias`` is its global offset, as ``self.item_prior``.
    """
    if not enabled:
        return None
    table = nn.Embedding(num_items, 1)
    nn.init.zeros_(table.weight)
    return table


# Under train.candidate_scoring "auto", a batch's candidate logits come from one [B, distinct
# items] matrix product when there are at most this many distinct items per candidate column,
# else from gathered item vectors (the crossover measured at B = 512, D = 64, K = 200: about 60
# distinct items per column).
DENSE_SCORE_RATIO = 30


class Recommender(nn.Module):
    """Base class: a scorer of (user, item) pairs."""

    trainable: bool = True
    # True where :meth:`loss` is the model's own objective (Airbnb's session skip-gram), not the
    # listwise softmax of its candidate logits: such a model cannot be a distillation student.
    own_loss: bool = False

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items

    # ---- training ---------------------------------------------------------------------------
    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """Logits of the batch's candidates (built by :meth:`TrainBatch.logits`, which adds the
        masks and log-Q). ``with_states`` also returns the hidden states a teacher can expose
        (vectors, token states, attention) in ``states``."""
        raise NotImplementedError(f"{type(self).__name__} does not train on sampled candidates")

    def pair_logits(self, batch: PointwiseBatch, with_states: bool = False) -> PairLogits:
        """Logits ``[B]`` of labelled pairs (protocol P4): :meth:`score_pairs` by default."""
        return PairLogits(self.score_pairs(batch.user, batch.items))

    def extra_losses(self, batch: TrainBatch | PointwiseBatch, logits: CandidateLogits | PairLogits) -> LossTerms:
        """The model's own loss terms beside the listwise or pointwise one, read from ``logits``
        (and its ``states``); none here."""
        return {}

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Listwise softmax of :meth:`candidate_logits`, plus :meth:`extra_losses`."""
        logits = self.candidate_logits(batch)
        return self._with_extra_losses(batch, logits, "softmax", listwise_softmax(logits))

    def pointwise_loss(self, batch: PointwiseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Binary cross-entropy of :meth:`pair_logits` against the labels (protocol P4), plus
        :meth:`extra_losses`."""
        logits = self.pair_logits(batch)
        return self._with_extra_losses(batch, logits, "bce", binary_cross_entropy(logits.logits, batch.labels))

    def _with_extra_losses(self, batch: Any, logits: Any, name: str, main: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = main, {name: float(main.detach())}
        for term, (value, weight) in self.extra_losses(batch, logits).items():
            total = total + weight * value
            parts[term], parts[f"{term}_weight"] = float(value.detach()), float(weight)
        return total, parts

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, len(items)]`` of every user in ``user`` against every item in ``items``."""
        raise NotImplementedError

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of user ``b`` against its own item ``items[b]`` (pre-ranking, P4).

        This default scores every user against every row's item and keeps the diagonal, B^2
        work; models that can score pairs directly override it.
        """
        return torch.diagonal(self.score(user, items))

    def item_scorer(self) -> ItemRangeScorer:
        """A function ``(user, start, stop) -> [B, stop - start]`` for full-ranking evaluation."""
        return lambda user, start, stop: self.score(user, torch.arange(start, stop, device=self.device))

    def ranking_scorer(self, user_input: UserBlock, num_users: int) -> Scorer:
        """The scorer full-ranking evaluation calls, ``(rows, start, stop) -> [len(rows), stop -
        start]``, for ``num_users`` evaluation users read by ``user_input``: :meth:`item_scorer`
        on each batch of users here."""
        item_scorer, device = self.item_scorer(), self.device
        return lambda rows, lo, hi: item_scorer(user_input(rows).to(device), lo, hi)

    # ---- serving ----------------------------------------------------------------------------
    def build_index(self, training_users: UserInput) -> Index | None:
        """The :class:`~crosstower.index.Index` that serves this model, built on the CPU, or
        None where the model is served by exhaustive scoring (:meth:`item_scorer`).
        ``training_users`` (every training user with its training history) is what an index of
        user-side codes holds; an item-side index ignores it."""
        return None

    def index_query(self, user: UserInput) -> Any:
        """What this model's index searches with for ``user`` (its typed query)."""
        raise NotImplementedError(f"{type(self).__name__} is served by exhaustive scoring, not an index")

    # ---- training hooks ---------------------------------------------------------------------
    warmup_epochs: int = 0
    """Epochs at the start of training that are never selected as the best (see SparCode)."""

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (``train.device``); inputs are moved there."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def fit(self, train_items: np.ndarray) -> None:
        """Fit a model that is not trained by gradient (``trainable`` False) on the training
        interactions' items; a no-op here."""

    def begin_epoch(self, epoch: int, examples: TrainExamples) -> None:
        """Called by the trainer before epoch ``epoch`` (also after a resume); a no-op here."""

    def averaged_buffers(self) -> list[str]:
        """Buffers that ``train.ema_decay`` averages with the weights (see
        :mod:`crosstower.train.averaging`); none here."""
        return []

    def training_stats(self) -> dict[str, float]:
        """Model-specific numbers worth logging after an epoch (e.g. codebook usage)."""
        return {}


class AttentionModelConfig(ModelConfig):
    """What the config of every transformer model shares: its width and heads (which divide it)."""

    dim: int = Field(64, ge=1)  # width of every token and transformer state (a multiple of heads)
    heads: int = Field(2, ge=1)  # attention heads per transformer layer (must divide dim)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


class InnerProductIndexConfig(Strict):
    """How a model whose score is one inner product is served: ``exact`` scores every item
    (:class:`~crosstower.index.ExactInnerProductIndex`); ``faiss`` searches a faiss index built
    from ``factory`` (``"HNSW32"``, ``"IVF{auto},Flat"``, ``"IVF{auto},PQ16"``, ...; {auto} = 4
    sqrt(items) lists) with ``nprobe`` IVF lists or ``ef_search`` HNSW candidates."""

    kind: Literal["exact", "faiss"] = "exact"  # exact: score every item; faiss: search an approximate faiss index
    # faiss index_factory string (kind: faiss): "HNSW32", "IVF{auto},Flat", "IVF{auto},PQ16", ...;
    # {auto} = about 4 sqrt(items) inverted lists.
    factory: str = "HNSW32"
    nprobe: int = Field(16, ge=1)  # inverted lists searched per query (faiss IVF indexes)
    ef_search: int = Field(128, ge=1)  # candidates kept while searching the graph (faiss HNSW indexes)


class EmbeddingRecommender(Recommender):
    """A model whose score is ``<encode_users(u), encode_items(i)>``: servable by MIPS.

    Its config has an ``index`` (:class:`InnerProductIndexConfig`) that says which MIPS index.

    A subclass with an item prior (``self.bias``, from :func:`item_prior`) stays servable by
    MIPS through one more dimension: ``[u; 1] . [i; p_i] = <u, i> + p_i``.
    """

    bias: nn.Embedding | None

    def _user_with_prior(self, vector: torch.Tensor) -> torch.Tensor:
        """``[u; 1]`` when the model has an item prior, else ``u``."""
        if self.bias is None:
            return vector
        return torch.cat([vector, torch.ones_like(vector[:, :1])], dim=-1)

    def _item_with_prior(self, vector: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[i; p_i]`` when the model has an item prior, else ``i``."""
        return vector if self.bias is None else torch.cat([vector, self.bias(items)], dim=-1)

    def encode_users(self, user: UserInput) -> torch.Tensor:
        raise NotImplementedError

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return self.encode_users(user) @ self.encode_items(items).T

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        return (self.encode_users(user) * self.encode_items(items)).sum(-1)

    @torch.no_grad()
    def item_vectors(self, chunk: int = 65536) -> torch.Tensor:
        """The whole catalogue's item vectors ``[num_items, D]``, encoded in chunks."""
        return torch.cat([self.encode_items(c) for c in torch.arange(self.num_items, device=self.device).split(chunk)])

    def item_scorer(self) -> ItemRangeScorer:
        """Encodes the catalogue once, then scores by one matrix product per call."""
        item_vectors = self.item_vectors()
        return lambda user, start, stop: self.encode_users(user) @ item_vectors[start:stop].T

    def ranking_scorer(self, user_input: UserBlock, num_users: int) -> Scorer:
        """Encodes every evaluation user once (not once per item chunk), in fixed blocks of
        :data:`ENCODE_BLOCK`, and the catalogue once; then one matrix product per call."""
        device = self.device
        user_vectors = torch.cat([
            self.encode_users(user_input(np.arange(lo, min(lo + ENCODE_BLOCK, num_users))).to(device))
            for lo in range(0, num_users, ENCODE_BLOCK)
        ] or [torch.zeros(0, 0, device=device)])
        item_vectors = self.item_vectors()
        return lambda rows, lo, hi: user_vectors[torch.from_numpy(rows).to(device)] @ item_vectors[lo:hi].T

    def build_index(self, training_users: UserInput) -> Index:
        """The inner-product index of the catalogue's item vectors that the config's ``index``
        names: exact by default."""
        from crosstower.index import ExactInnerProductIndex, FaissInnerProductIndex

        self.eval()
        settings = self.config.index
        if settings.kind == "faiss":
            return FaissInnerProductIndex.build(self.item_vectors(), settings.factory, settings.nprobe, settings.ef_search)
        return ExactInnerProductIndex(self.item_vectors())

    @torch.no_grad()
    def index_query(self, user: UserInput) -> torch.Tensor:
        """The user vectors ``[B, D]``."""
        return self.encode_users(user)

    def candidate_logits(self, batch: TrainBatch, with_states: bool = False) -> CandidateLogits:
        """Inner products of each user with its positive, its sampled negatives and (with
        in-batch negatives) every row's positive. States: ``user_vectors [B, D]`` and
        ``item_vectors [B, 1 + K, D]`` (the positive first)."""
        users = self.encode_users(batch.user)
        items = torch.cat([batch.positives, batch.negatives.reshape(-1)])
        unique, inverse = torch.unique(items, return_inverse=True)
        item_vectors = self.encode_items(unique)  # each distinct item encoded once
        b = len(batch.positives)
        in_batch = batch.in_batch_mask is not None
        few = len(unique) <= DENSE_SCORE_RATIO * (1 + batch.negatives.shape[1])
        if batch.dense_scores and few and not with_states:
            columns = torch.cat([inverse[:b, None], inverse[b:].view(*batch.negatives.shape)], dim=1)  # [B, 1 + K]
            # Few distinct items: score every user against all of them with one matrix product
            # and pick each row's columns; on MovieLens-100K (K = 200) this step's forward and
            # backward took a sixth of the time of gathering B x (1 + K) item vectors.
            scores = users @ item_vectors.T
            logits = scores.gather(1, columns)
            in_batch_logits = scores.index_select(1, columns[:, 0]) if in_batch else None
            return batch.logits(logits[:, 0], logits[:, 1:], in_batch_logits, {})
        # F.embedding's backward is far cheaper than indexing's. (This layout, positives first,
        # fixes the order in which gradients add up: the reference runs were measured with it.)
        vectors = F.embedding(inverse, item_vectors)
        positive = vectors[:b]
        negative = vectors[b:].view(*batch.negatives.shape, -1)
        positive_logits = (users * positive).sum(-1)
        sampled_logits = torch.einsum("bd,bkd->bk", users, negative)
        in_batch_logits = users @ positive.T if in_batch else None
        states = {}
        if with_states:
            states = {"user_vectors": users, "item_vectors": torch.cat([positive[:, None], negative], dim=1)}
        return batch.logits(positive_logits, sampled_logits, in_batch_logits, states)
