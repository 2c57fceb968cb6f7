"""Evaluation metrics: full ranking against a slow per-user reference, batch invariance,
hand-computed cases, and pointwise metrics (AUC, GAUC, log loss)."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crosstower.data.ragged import Ragged
from crosstower.errors import DataError
from crosstower.evaluate import auc, evaluate_ranking, gauc, log_loss, topk_items

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# helpers


def ragged(rows: list[list[int]]) -> Ragged:
    lengths = [len(r) for r in rows]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.array([v for r in rows for v in r], dtype=np.int64)
    return Ragged(indptr, values)


def matrix_scorer(scores: torch.Tensor):
    """A scorer over a dense score matrix; returns fresh tensors like a real model would."""

    def scorer(rows: np.ndarray, start: int, stop: int) -> torch.Tensor:
        return scores[torch.from_numpy(rows), start:stop]

    return scorer


def reference_ranking(score_row: list[float], excluded: set[int], k: int) -> list[int]:
    """Textbook: sort every item by (score desc, index asc), drop excluded, keep the first k."""
    order = sorted(range(len(score_row)), key=lambda i: (-score_row[i], i))
    return [i for i in order if i not in excluded][:k]


def reference_metrics(
    scores: torch.Tensor, exclude: list[list[int]], targets: list[list[int]], ks: list[int]
) -> dict[str, float]:
    per_user: dict[str, list[float]] = {}
    n_users = 0
    for u in range(scores.shape[0]):
        excluded = set(exclude[u])
        relevant = set(targets[u]) - excluded
        if not relevant:
            continue
        n_users += 1
        for k in ks:
            ranked = reference_ranking(scores[u].tolist(), excluded, k)
            hit_ranks = [r + 1 for r, item in enumerate(ranked) if item in relevant]
            dcg = sum(1 / math.log2(r + 1) for r in hit_ranks)
            idcg = sum(1 / math.log2(r + 1) for r in range(1, min(len(relevant), k) + 1))
            values = {
                "recall": len(hit_ranks) / len(relevant),
                "ndcg": dcg / idcg,
                "precision": len(hit_ranks) / k,
                "hitrate": float(bool(hit_ranks)),
                "mrr": 1 / hit_ranks[0] if hit_ranks else 0.0,
            }
            for name, value in values.items():
                per_user.setdefault(f"{name}@{k}", []).append(value)
    out = {key: sum(v) / len(v) for key, v in per_user.items()}
    out["num_users"] = n_users
    return out


def random_case(rng: np.random.Generator, num_users: int, num_items: int, integer_scores: bool):
    if integer_scores:  # few distinct values: many ties, including at the top-k boundary
        scores = torch.from_numpy(rng.integers(0, 4, (num_users, num_items)).astype(np.float32))
    else:
        scores = torch.from_numpy(rng.standard_normal((num_users, num_items)).astype(np.float32))
    exclude, targets = [], []
    for _ in range(num_users):
        kind = rng.integers(0, 5)
        n_ex = int(rng.integers(0, num_items + 1)) if kind == 0 else int(rng.integers(0, 6))
        ex = rng.choice(num_items, size=min(n_ex, num_items), replace=False).tolist()
        if kind == 1:  # no targets
            tg: list[int] = []
        elif kind == 2 and ex:  # every target excluded
            tg = rng.choice(ex, size=int(rng.integers(1, len(ex) + 1))).tolist()
        else:  # random targets, duplicates allowed, may overlap the exclusions
            tg = rng.integers(0, num_items, size=int(rng.integers(1, 8))).tolist()
        exclude.append(ex)
        targets.append(tg)
    return scores, exclude, targets


# --------------------------------------------------------------------------------------------
# (1) against the reference


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_users=st.integers(1, 40),
    num_items=st.integers(1, 300),
    integer_scores=st.booleans(),
    ks=st.lists(st.integers(1, 320), min_size=1, max_size=3, unique=True),
    user_batch=st.sampled_from([1, 5, 256]),
    item_chunk=st.sampled_from([1, 13, 64, 65536]),
)
def test_matches_reference(seed, num_users, num_items, integer_scores, ks, user_batch, item_chunk):
    rng = np.random.default_rng(seed)
    scores, exclude, targets = random_case(rng, num_users, num_items, integer_scores)
    expected = reference_metrics(scores, exclude, targets, ks)
    scorer = matrix_scorer(scores)
    if expected["num_users"] == 0:
        with pytest.raises(DataError):
            evaluate_ranking(scorer, num_users, num_items, ragged(exclude), ragged(targets), ks)
        return
    got = evaluate_ranking(
        scorer, num_users, num_items, ragged(exclude), ragged(targets), ks,
        user_batch=user_batch, item_chunk=item_chunk,
    )
    assert got.keys() == expected.keys()
    assert got["num_users"] == expected["num_users"]
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_users=st.integers(1, 20),
    num_items=st.integers(1, 120),
    k=st.integers(1, 130),
    item_chunk=st.sampled_from([1, 6, 50, 65536]),
)
def test_topk_items_matches_reference_order(seed, num_users, num_items, k, item_chunk):
    rng = np.random.default_rng(seed)
    scores, exclude, _ = random_case(rng, num_users, num_items, integer_scores=True)
    vals, items = topk_items(
        matrix_scorer(scores), num_users, num_items, ragged(exclude), k, user_batch=3,
        item_chunk=item_chunk,
    )
    assert vals.shape == items.shape == (num_users, k)
    assert items.dtype == torch.int64
    for u in range(num_users):
        ranked = reference_ranking(scores[u].tolist(), set(exclude[u]), k)
        assert items[u, : len(ranked)].tolist() == ranked
        assert vals[u, : len(ranked)].tolist() == scores[u, ranked].tolist()
        tail = items[u, len(ranked):]  # excluded items (score -inf), then -1 past the catalogue
        assert torch.isinf(vals[u, len(ranked):]).all()
        assert set(tail[tail >= 0].tolist()) <= set(exclude[u])


# --------------------------------------------------------------------------------------------
# (2) batch-size invariance


@pytest.mark.parametrize("integer_scores", [False, True])
def test_identical_for_any_batching(integer_scores):
    rng = np.random.default_rng(7)
    num_users, num_items = 20, 150
    scores, exclude, targets = random_case(rng, num_users, num_items, integer_scores)
    scorer, ex, tg = matrix_scorer(scores), ragged(exclude), ragged(targets)
    ks = (5, 20, 200)
    base = evaluate_ranking(scorer, num_users, num_items, ex, tg, ks)
    base_top = topk_items(scorer, num_users, num_items, ex, 20)
    for user_batch, item_chunk in product([1, 3, 64, num_users], [1, 7, 128, num_items]):
        got = evaluate_ranking(
            scorer, num_users, num_items, ex, tg, ks, user_batch=user_batch, item_chunk=item_chunk
        )
        assert got == base, (user_batch, item_chunk)
        top = topk_items(scorer, num_users, num_items, ex, 20, user_batch, item_chunk)
        assert torch.equal(top[1], base_top[1]) and torch.equal(top[0], base_top[0])


# --------------------------------------------------------------------------------------------
# (3) hand-computed cases


def test_hand_computed_single_user():
    # scores rank items as [3, 0, 1, 2]; targets {1, 3}
    scores = torch.tensor([[0.5, 0.2, 0.1, 0.9]])
    got = evaluate_ranking(
        matrix_scorer(scores), 1, 4, ragged([[]]), ragged([[1, 3, 3]]), ks=(1, 2, 3)
    )
    idcg2 = 1 + 1 / math.log2(3)
    assert got["num_users"] == 1
    assert got["recall@1"] == 0.5 and got["precision@1"] == 1.0
    assert got["ndcg@1"] == 1.0 and got["mrr@1"] == 1.0 and got["hitrate@1"] == 1.0
    assert got["recall@2"] == 0.5 and got["precision@2"] == 0.5
    assert got["ndcg@2"] == pytest.approx(1 / idcg2)
    assert got["recall@3"] == 1.0 and got["precision@3"] == pytest.approx(2 / 3)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / idcg2)


def test_hand_computed_exclusion_mrr_and_averaging():
    # user 0: ranking [0, 1, 2, 3], item 0 excluded -> [1, 2, 3]; target {3}: rank 3
    # user 1: targets all excluded -> skipped; user 2: no targets -> skipped
    # user 3: ranking [3, 2, 1, 0]; target {0} (duplicated) -> rank 4, outside k=3
    scores = torch.tensor(
        [[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]
    )
    got = evaluate_ranking(
        matrix_scorer(scores), 4, 4,
        exclude=ragged([[0], [1, 2], [], []]),
        targets=ragged([[3], [2, 1], [], [0, 0]]),
        ks=(3,),
    )
    assert got["num_users"] == 2
    assert got["recall@3"] == 0.5
    assert got["hitrate@3"] == 0.5
    assert got["mrr@3"] == pytest.approx((1 / 3 + 0) / 2)
    assert got["precision@3"] == pytest.approx((1 / 3) / 2)
    assert got["ndcg@3"] == pytest.approx((1 / math.log2(4)) / 2)


def test_ties_prefer_lower_item_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    _, items = topk_items(matrix_scorer(scores), 1, 5, ragged([[2]]), k=3, item_chunk=2)
    assert items.tolist() == [[1, 3, 0]]


def test_k_larger_than_remaining_items_never_counts_padding():
    # 3 items, 2 excluded, one target that is the only remaining item
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    got = evaluate_ranking(
        matrix_scorer(scores), 1, 3, ragged([[0, 1]]), ragged([[2]]), ks=(1, 10)
    )
    assert got["recall@10"] == 1.0 and got["precision@10"] == pytest.approx(0.1)
    assert got["ndcg@10"] == 1.0 and got["mrr@10"] == 1.0 and got["recall@1"] == 1.0
    vals, items = topk_items(matrix_scorer(scores), 1, 3, ragged([[0, 1]]), k=5)
    assert items.tolist() == [[2, 0, 1, -1, -1]]
    assert vals[0, 0] == pytest.approx(0.1) and torch.isinf(vals[0, 1:]).all()


def test_bad_inputs_raise_clear_errors():
    scorer = matrix_scorer(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rows"):
        evaluate_ranking(scorer, 2, 3, ragged([[]]), ragged([[0], [1]]))
    with pytest.raises(ValueError, match="outside"):
        evaluate_ranking(scorer, 2, 3, ragged([[], []]), ragged([[0], [5]]))
    with pytest.raises(ValueError, match="shape"):
        evaluate_ranking(lambda r, a, b: torch.zeros(1, 1), 2, 3, ragged([[], []]),
                         ragged([[0], [1]]))
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(matrix_scorer(torch.full((2, 3), math.nan)), 2, 3, ragged([[], []]),
                         ragged([[0], [1]]))


def test_scorer_views_are_not_modified():
    scores = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    view_scorer = lambda rows, a, b: scores[: len(rows), a:b]  # noqa: E731  a view
    topk_items(view_scorer, 2, 3, ragged([[0, 1], [2]]), k=2)
    assert torch.equal(scores, torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_progress_bar_runs(capsys):
    scores = torch.rand(5, 10)
    got = evaluate_ranking(matrix_scorer(scores), 5, 10, ragged([[]] * 5), ragged([[1]] * 5),
                           ks=(2,), user_batch=2, progress=True)
    assert got["num_users"] == 5


# --------------------------------------------------------------------------------------------
# (4) pointwise metrics


def brute_force_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == 0.5
    assert auc([True, False, True], [0.9, 0.1, 0.2]) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    y[:2] = [0, 1]
    s = rng.integers(0, 5, 60).astype(float)  # ties
    assert auc(y, s) == pytest.approx(brute_force_auc(y, s))


def test_gauc_hand_computed_and_brute_force():
    users = np.array([7, 7, 7, 3, 3, 5, 5, 5, 5])
    y = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1])  # user 3 has one class: left out
    s = np.array([0.9, 0.5, 0.95, 0.1, 0.2, 0.3, 0.3, 0.8, 0.6])
    a7 = 0.5  # positive 0.9 beats 0.5, loses to 0.95
    a5 = brute_force_auc(y[5:], s[5:])
    assert a5 == pytest.approx((0.5 + 0 + 1 + 0) / 4)  # pos 0.3, 0.6 vs neg 0.3, 0.8
    assert gauc(users, y, s) == pytest.approx((3 * a7 + 4 * a5) / 7)

    rng = np.random.default_rng(1)
    users = rng.integers(0, 8, 200)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 6, 200).astype(float)
    num = den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * brute_force_auc(y[m], s[m])
            den += m.sum()
    assert gauc(users, y, s) == pytest.approx(num / den)


def test_log_loss_hand_computed():
    expected = -(math.log(0.8) + math.log(1 - 0.3) + math.log(0.6)) / 3
    assert log_loss([1, 0, 1], [0.8, 0.3, 0.6]) == pytest.approx(expected)
    assert log_loss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7))


def test_pointwise_errors():
    with pytest.raises(ValueError, match="one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both positive and negative"):
        gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        auc([0, 1], [0.1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([0, 1], [0.1, 1.5])
