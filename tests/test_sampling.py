import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosstower.config import parse_config
from crosstower.data.sampling import CandidatePool, accidental_hits, in_batch_hits, popularity_sampler, uniform_sampler
from crosstower.data.splits import make_split
from crosstower.losses import sampled_softmax
from crosstower.train.trainer import Trainer
from tests.helpers import random_dataset


def test_logq_is_subtracted_so_popular_negatives_weigh_less():
    """The sign pin (TFRS#219 shipped it added): a frequently drawn negative must be
    *down*-weighted, so with equal raw logits it takes less of the softmax mass."""
    pos, neg = torch.tensor([1.0]), torch.tensor([[1.0]])
    popular = sampled_softmax(pos, neg, negative_log_q=torch.tensor([[2.0]]))
    rare = sampled_softmax(pos, neg, negative_log_q=torch.tensor([[-2.0]]))
    assert popular < rare
    assert torch.allclose(popular, -torch.log_softmax(torch.tensor([1.0, 1.0 - 2.0]), 0)[0])


def test_trainer_batches_carry_mixture_logq_and_mask_in_batch_hits(tmp_path):
    dataset = random_dataset(num_users=40, num_items=30, rows=800)
    split = make_split(dataset, "p1")
    config = parse_config({
        "model": {"name": "youtubednn"},
        "train": {"batch_size": 16, "negatives": {"sampler": "popularity", "num": 5, "alpha": 1.0, "in_batch": True}},
    })
    trainer = Trainer(None, dataset, split, config, tmp_path)
    batch = trainer.make_batch(np.arange(16), torch.Generator().manual_seed(0))
    assert batch.negatives.shape == (16, 5) and batch.in_batch_mask.shape == (16, 16)
    assert batch.in_batch_mask.diagonal().all()  # a row's own positive is never its negative
    counts = torch.as_tensor(np.bincount(trainer.examples.items, minlength=30), dtype=torch.float64)
    q_sampled = (counts + 1) / (counts + 1).sum()
    q_batch = counts / counts.sum()
    expected = torch.log(5 * q_sampled + 16 * q_batch)
    assert torch.allclose(batch.positive_log_q.double(), expected[batch.positives], atol=1e-5)
    assert torch.allclose(batch.negative_log_q.double(), expected[batch.negatives], atol=1e-5)
    # in-batch column j is candidate positives[j]: it takes positives[j]'s correction
    _, mask, log_q = batch.logits(torch.zeros(16), torch.zeros(16, 5), torch.zeros(16, 16)).negatives()
    assert torch.equal(log_q[:, 5:], batch.positive_log_q[None, :].expand(16, -1))
    assert torch.equal(mask[:, 5:], batch.in_batch_mask)


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



@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 9), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_hit_masks_equal_a_pairwise_reference(batch, num_users, num_items, num_sampled, seed):
    """Both fast masks against the definition: candidate (b, k) is some row b' with the same user
    and that candidate as its positive."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(0, num_users, (batch,), generator=gen)
    positives = torch.randint(0, num_items, (batch,), generator=gen)
    sampled = torch.randint(0, num_items, (batch, num_sampled), generator=gen)

    def reference(candidates: torch.Tensor) -> list[list[bool]]:
        pairs = set(zip(users.tolist(), positives.tolist()))
        return [[(users[b].item(), c) in pairs for c in row] for b, row in enumerate(candidates.tolist())]

    assert accidental_hits(users, positives, sampled).tolist() == reference(sampled)
    in_batch = positives[None, :].expand(batch, -1)
    assert in_batch_hits(users, positives).tolist() == reference(in_batch)
    assert accidental_hits(users, positives, in_batch).tolist() == reference(in_batch)

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
