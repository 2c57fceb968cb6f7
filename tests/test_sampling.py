import math

import numpy as np
import torch

from crosstower.data.sampling import (
    CandidatePool,
    accidental_hits,
    logq_correct,
    popularity_sampler,
    uniform_sampler,
)
from crosstower.losses import sampled_softmax


def test_logq_is_subtracted_so_popular_items_lose_logit():
    """The sign pin (TFRS#219 shipped it added): a popular negative must be *down*-weighted."""
    sampler = popularity_sampler(np.array([1000, 1]), alpha=1.0)
    log_q = sampler.log_prob(torch.tensor([0, 1]))
    corrected = logq_correct(torch.tensor([2.0, 2.0]), log_q)
    assert corrected[0] < corrected[1]
    assert torch.allclose(corrected, torch.tensor([2.0, 2.0]) - log_q)


def test_sampled_softmax_subtracts_logq_from_positive_and_negatives():
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.5, 2.0]])
    pos_q, neg_q = torch.tensor([0.3]), torch.tensor([[-1.0, 0.7]])
    loss = sampled_softmax(pos, neg, positive_log_q=pos_q, negative_log_q=neg_q)
    logits = torch.tensor([1.0 - 0.3, 0.5 + 1.0, 2.0 - 0.7])
    assert torch.allclose(loss, -torch.log_softmax(logits, 0)[0])


def test_sampled_softmax_drops_masked_negatives():
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.5, 9.0]])
    masked = sampled_softmax(pos, neg, torch.tensor([[False, True]]))
    assert torch.allclose(masked, -torch.log_softmax(torch.tensor([1.0, 0.5]), 0)[0])


def test_accidental_hits_match_same_user_positives_only():
    users = torch.tensor([7, 7, 8])
    positives = torch.tensor([1, 2, 3])
    candidates = positives[None, :].expand(3, -1)  # in-batch negatives
    mask = accidental_hits(users, positives, candidates)
    # user 7 (rows 0 and 1) owns items 1 and 2; user 8 owns item 3
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    sampled = torch.tensor([[2, 3], [5, 1], [3, 3]])
    assert accidental_hits(users, positives, sampled).tolist() == [[True, False], [False, True], [True, True]]


def test_popularity_sampler_follows_count_power():
    counts = np.array([99, 0, 24])  # +1 smoothing -> 100, 1, 25
    sampler = popularity_sampler(counts, alpha=0.5)
    expected = torch.tensor([10.0, 1.0, 5.0]) / 16.0
    assert torch.allclose(sampler.probabilities.float(), expected)
    draws = sampler.sample(2000, 10, torch.Generator().manual_seed(0))
    assert draws.shape == (2000, 10)
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, expected, atol=0.01)


def test_uniform_sampler_is_seeded():
    sampler = uniform_sampler(50)
    a = sampler.sample(4, 6, torch.Generator().manual_seed(1))
    b = sampler.sample(4, 6, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.max() < 50


def test_mixed_pool_expected_count_sums_both_sources():
    sampler = uniform_sampler(4)
    unigram = torch.log(torch.tensor([0.5, 0.25, 0.25, 0.0]).clamp_min(1e-30))
    pool = CandidatePool(sampler, num_sampled=8, in_batch_log_prob=unigram, batch_size=16)
    got = pool.log_expected_count(torch.tensor([0, 3]))
    assert torch.allclose(got, torch.tensor([math.log(8 * 0.25 + 16 * 0.5), math.log(8 * 0.25)]))
