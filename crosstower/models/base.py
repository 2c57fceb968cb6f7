"""The model contract every scorer follows.

``loss(batch)`` returns the total loss and its named parts; ``score(user, items)`` scores a
batch of users against candidate items; ``item_scorer()`` returns the function that full-ranking
evaluation calls per item range, which a model may speed up by caching its item side. A model
whose score is one inner product (:class:`EmbeddingRecommender`) also offers ``encode_users`` /
``encode_items``: the same vectors train, evaluate and serve.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from crosstower.data.batching import PointwiseBatch, TrainBatch, TrainExamples, UserInput
from crosstower.losses import sampled_softmax

ItemRangeScorer = Callable[[UserInput, int, int], torch.Tensor]


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


class Recommender(nn.Module):
    """Base class: a scorer of (user, item) pairs."""

    trainable: bool = True

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def score(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, len(items)]`` of every user in ``user`` against every item in ``items``."""
        raise NotImplementedError

    def score_pairs(self, user: UserInput, items: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of user ``b`` against its own item ``items[b]`` (pre-ranking, P4).

        This default scores every user against every row's item and keeps the diagonal, B^2
        work; models that can score pairs directly override it.
        """
        return torch.diagonal(self.score(user, items))

    def pointwise_loss(self, batch: PointwiseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Binary cross-entropy of :meth:`score_pairs` against the labels (protocol P4)."""
        total = F.binary_cross_entropy_with_logits(self.score_pairs(batch.user, batch.items), batch.labels)
        return total, {"bce": float(total.detach())}

    warmup_epochs: int = 0
    """Epochs at the start of training that are never selected as the best (see SparCode)."""

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (``train.device``); inputs are moved there."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def begin_epoch(self, epoch: int, examples: TrainExamples) -> None:
        """Called by the trainer before epoch ``epoch`` (also after a resume); a no-op here."""

    def averaged_buffers(self) -> list[str]:
        """Buffers that ``train.ema_decay`` averages with the weights (see
        :mod:`crosstower.train.averaging`); none here."""
        return []

    def training_stats(self) -> dict[str, float]:
        """Model-specific numbers worth logging after an epoch (e.g. codebook usage)."""
        return {}

    def item_scorer(self) -> ItemRangeScorer:
        """A function ``(user, start, stop) -> [B, stop - start]`` for full-ranking evaluation."""
        return lambda user, start, stop: self.score(user, torch.arange(start, stop, device=self.device))


class EmbeddingRecommender(Recommender):
    """A model whose score is ``<encode_users(u), encode_items(i)>``: servable by MIPS.

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

    def loss(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Sampled softmax of the positive against the batch's negatives (logQ, hit masking)."""
        users = self.encode_users(batch.user)
        items = torch.cat([batch.positives, batch.negatives.reshape(-1)])
        unique, inverse = torch.unique(items, return_inverse=True)
        # Encode each distinct item once; F.embedding's backward is far cheaper than indexing's.
        vectors = F.embedding(inverse, self.encode_items(unique))
        positive = vectors[: len(batch.positives)]
        negative = vectors[len(batch.positives) :].view(*batch.negatives.shape, -1)
        positive_logits = (users * positive).sum(-1)
        sampled_logits = torch.einsum("bd,bkd->bk", users, negative)
        in_batch_logits = users @ positive.T if batch.in_batch_mask is not None else None
        negative_logits, mask, log_q = batch.candidate_logits(positive_logits, sampled_logits, in_batch_logits)
        total = sampled_softmax(positive_logits, negative_logits, mask, batch.positive_log_q, log_q)
        return total, {"softmax": float(total.detach())}
