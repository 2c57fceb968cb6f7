"""Negative samplers and the logQ correction of sampled softmax.

A sampled softmax over a candidate set drawn from a proposal Q is biased towards items Q draws
often. The correction (Bengio & Senecal; Yi et al. 2019) *subtracts* ``log E[count of j in the
candidate pool]`` from every candidate's logit, the positive included. With several sources
(``K`` sampled negatives from Q_s plus the ``B`` in-batch positives, which follow the training
unigram distribution Q_b) the expected count is ``K * Q_s(j) + B * Q_b(j)``; a candidate from
either source gets the same correction because the pool is one mixture.

Negatives are a ``[B, K]`` tensor. An *accidental hit* is a negative equal to a positive of the
same user in the batch; :func:`accidental_hits` marks them so losses can drop them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class NegativeSampler:
    """Draws ``[B, K]`` item ids i.i.d. from a fixed distribution over the catalogue."""

    def __init__(self, probabilities: torch.Tensor):
        self.probabilities = probabilities / probabilities.sum()
        self.log_probabilities = torch.log(self.probabilities.clamp_min(1e-30))
        # Inverse-CDF draws: several times faster than torch.multinomial with replacement.
        self.cdf = torch.cumsum(self.probabilities, 0)

    def sample(self, batch_size: int, k: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(batch_size, k, generator=generator, dtype=torch.float64) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp_max(len(self.cdf) - 1)

    def log_prob(self, items: torch.Tensor) -> torch.Tensor:
        return self.log_probabilities[items]


def uniform_sampler(num_items: int) -> NegativeSampler:
    return NegativeSampler(torch.ones(num_items, dtype=torch.float64))


def popularity_sampler(item_counts: np.ndarray, alpha: float = 0.75) -> NegativeSampler:
    """Q(j) proportional to count(j)^alpha (+1 smoothing so unseen items can be drawn)."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64) + 1.0
    return NegativeSampler(counts**alpha)


@dataclass
class CandidatePool:
    """How one batch's candidates were drawn, to compute the logQ correction.

    ``sampled`` is the sampler of the ``num_sampled`` explicit negatives (or None);
    ``in_batch_log_prob`` is log Q_b over the catalogue (the training unigram distribution)
    when the batch's positives also serve as negatives, ``batch_size`` of them.
    """

    sampled: NegativeSampler | None
    num_sampled: int
    in_batch_log_prob: torch.Tensor | None
    batch_size: int

    def log_expected_count(self, items: torch.Tensor) -> torch.Tensor:
        """log E[number of times each item appears in the candidate pool], same shape as items."""
        terms = []
        if self.sampled is not None and self.num_sampled > 0:
            terms.append(self.sampled.log_prob(items) + np.log(self.num_sampled))
        if self.in_batch_log_prob is not None:
            terms.append(self.in_batch_log_prob[items] + np.log(self.batch_size))
        if not terms:
            return torch.zeros(items.shape, dtype=torch.float32)
        return torch.logsumexp(torch.stack(terms), dim=0).float()


def accidental_hits(users: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` bool: candidate ``[b, k]`` equals a positive of user ``users[b]`` in this batch.

    Matches on (user, item) pairs, so a user who appears twice in the batch with two positives
    never sees either of them as a negative. A binary search of each candidate pair among the
    batch's sorted pairs: ``torch.isin`` sorts the candidates too and took a third of a
    YouTubeDNN epoch.
    """
    if candidates.numel() == 0:
        return torch.zeros(candidates.shape, dtype=torch.bool)
    num_items = int(max(positives.max().item(), candidates.max().item())) + 1
    batch_pairs = torch.unique(users * num_items + positives)  # sorted
    candidate_pairs = users[:, None] * num_items + candidates
    found = torch.searchsorted(batch_pairs, candidate_pairs).clamp_(max=len(batch_pairs) - 1)
    return batch_pairs[found] == candidate_pairs


def in_batch_hits(users: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` bool: the in-batch candidate ``positives[j]`` is a positive of user ``users[b]``
    in this batch (:func:`accidental_hits` with every row's candidates the batch's positives).

    A table of the batch's distinct users by its distinct positives, read with both inverse
    indices: a few milliseconds where the general search takes tens for ``B = 1024``.
    """
    _, user_row = torch.unique(users, return_inverse=True)
    _, item_column = torch.unique(positives, return_inverse=True)
    table = torch.zeros(int(user_row.max()) + 1, int(item_column.max()) + 1, dtype=torch.bool)
    table[user_row, item_column] = True
    return table[user_row][:, item_column]
