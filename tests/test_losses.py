"""The pure losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from crosstower.losses import CandidateLogits, binary_cross_entropy, info_nce, listwise_softmax, sampled_softmax


def test_listwise_softmax_drops_masked_candidates_and_subtracts_log_q():
    logits = CandidateLogits(
        positive=torch.tensor([1.0, 0.5]),
        sampled=torch.tensor([[0.0, 2.0], [1.0, -1.0]]),
        sampled_mask=torch.tensor([[False, True], [False, False]]),  # row 0's second negative is a hit
        in_batch=torch.tensor([[1.0, 3.0], [0.2, 0.5]]),
        in_batch_mask=torch.tensor([[True, False], [False, True]]),  # each row's own positive
        positive_log_q=torch.tensor([0.1, 0.2]),
        sampled_log_q=torch.tensor([[0.3, 0.4], [0.5, 0.6]]),
    )
    # row 0: positive 1.0 - 0.1; sampled 0.0 - 0.3; in-batch column 1 is row 1's positive: 3.0 - 0.2
    row0 = -(0.9 - math.log(math.exp(0.9) + math.exp(-0.3) + math.exp(2.8)))
    # row 1: positive 0.5 - 0.2; sampled 1.0 - 0.5 and -1.0 - 0.6; in-batch column 0: 0.2 - 0.1
    row1 = -(0.3 - math.log(math.exp(0.3) + math.exp(0.5) + math.exp(-1.6) + math.exp(0.1)))
    assert float(listwise_softmax(logits)) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_listwise_softmax_without_in_batch_or_log_q_is_a_plain_softmax():
    logits = CandidateLogits(torch.tensor([2.0]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2, dtype=torch.bool))
    expected = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0) + 1.0))
    assert float(listwise_softmax(logits)) == pytest.approx(expected, rel=1e-6)
    negatives, mask, log_q = logits.negatives()
    assert negatives.shape == (1, 2) and log_q is None
    assert float(sampled_softmax(logits.positive, negatives, mask)) == pytest.approx(expected, rel=1e-6)


def test_binary_cross_entropy():
    got = binary_cross_entropy(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    assert float(got) == pytest.approx((math.log(2.0) + math.log(1.0 + math.exp(2.0))) / 2, rel=1e-6)


def test_info_nce_is_a_softmax_over_the_batch_pairs_with_same_item_columns_dropped():
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised to the unit axes inside
    got = info_nce(z, z.clone(), torch.tensor([3, 4]), temperature=0.5)
    assert float(got) == pytest.approx(-(2.0 - math.log(math.exp(2.0) + 1.0)), rel=1e-6)
    # the other row holds the same item: it is no negative, each row's softmax is over itself
    assert float(info_nce(z, z.clone(), torch.tensor([3, 3]), temperature=0.5)) == pytest.approx(0.0, abs=1e-7)
    assert float(info_nce(z[:1], z[:1], torch.tensor([3]), temperature=0.5)) == 0.0
