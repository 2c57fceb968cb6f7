"""Every distillation loss against a hand computation: KL direction, temperature, masks,
self-exclusion, and the stop-gradient that keeps a teacher out of a distillation term."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from crosstower.data.batching import TrainExamples
from crosstower.data.dataset import FieldSpec, build_dataset
from crosstower.data.schema import FieldKind
from crosstower.distill.attention import PairQK
from crosstower.distill.losses import (
    attention_kl,
    attention_mse,
    duplicate_targets,
    listwise_kd,
    masked_softmax,
    one_minus_p_positive,
    pointwise_kd,
    relation_kl,
    token_attention_kd,
    token_mse,
)
from crosstower.distill.privileged import NAMES, PrivilegedFeatures


def softmax(row):
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_listwise_kd_is_tau_squared_kl_teacher_to_student():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    tau = 2.0
    expected = np.mean([kl(softmax((t / tau).tolist()), softmax((s / tau).tolist())) for t, s in zip(teacher, student)])
    assert float(listwise_kd(teacher, student, temperature=tau)) == pytest.approx(tau**2 * expected, rel=1e-5)
    # KL(teacher || student), not the reverse
    reverse = np.mean([kl(softmax((s / tau).tolist()), softmax((t / tau).tolist())) for t, s in zip(teacher, student)])
    assert abs(float(listwise_kd(teacher, student, temperature=tau)) - tau**2 * reverse) > 1e-3


def test_listwise_kd_drops_masked_candidates_from_both_sides():
    teacher = torch.tensor([[2.0, 0.0, 5.0]])
    student = torch.tensor([[0.0, 1.0, -9.0]])
    mask = torch.tensor([[False, False, True]])
    expected = kl(softmax([2.0, 0.0]), softmax([0.0, 1.0]))
    assert float(listwise_kd(teacher, student, mask)) == pytest.approx(expected, rel=1e-5)


def test_pointwise_kd_is_bce_to_the_teacher_probability():
    teacher, student = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.0]])
    mask = torch.tensor([[False, True]])
    p, q = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))
    expected = -(p * math.log(q) + (1 - p) * math.log(1 - q))
    assert float(pointwise_kd(teacher, student, mask)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["listwise", "pointwise"])
def test_a_distillation_term_sends_no_gradient_to_the_teacher(loss):
    teacher = torch.randn(4, 5, requires_grad=True)
    student = torch.randn(4, 5, requires_grad=True)
    term = listwise_kd if loss == "listwise" else pointwise_kd
    term(teacher, student).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    term(teacher, student, detach=False).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def reference_relation_kl(teacher, student, drop, kernel, tau):
    """Per anchor, per target, in plain Python."""
    rows = []
    for b in range(len(teacher[0])):
        kept = [j for j in range(len(teacher[1])) if not drop[b][j]]
        if not kept:
            continue

        def distribution(anchors, targets):
            sims = [cosine(anchors[b], targets[j]) for j in kept]
            if kernel == "softmax":
                return softmax([s / tau for s in sims])
            weights = [(s + 1) / 2 for s in sims]
            return [w / sum(weights) for w in weights]

        rows.append(kl(distribution(*teacher), distribution(*student)))
    return np.mean(rows)


@pytest.mark.parametrize("kernel", ["softmax", "pkt"])
@pytest.mark.parametrize("same_side", [False, True])
def test_relation_kl_against_a_per_element_reference(kernel, same_side):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([3, 7, 3, 1, 9])  # id 3 twice: its second column is dropped
    t_anchor, t_target = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    s_anchor, s_target = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)  # other width
    if same_side:
        t_target, s_target = t_anchor, s_anchor
    drop = duplicate_targets(ids, same_side)
    expected = reference_relation_kl((t_anchor.numpy(), t_target.numpy()), (s_anchor.numpy(), s_target.numpy()),
                                     drop.tolist(), kernel, 0.1)
    got = relation_kl((t_anchor, t_target), (s_anchor, s_target), drop, kernel, 0.1)
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_duplicate_targets_excludes_self_and_repeats():
    drop = duplicate_targets(torch.tensor([3, 7, 3]), same_side=True)
    assert drop.tolist() == [[True, False, True], [False, True, True], [True, False, True]]
    drop = duplicate_targets(torch.tensor([3, 7, 3]), same_side=False)
    assert drop.tolist() == [[False, False, True]] * 3


def test_relation_kl_gradient_is_finite_with_dropped_targets():
    student = (torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True))
    teacher = (torch.randn(4, 5), torch.randn(4, 5))
    for kernel in ("softmax", "pkt"):
        relation_kl(teacher, student, duplicate_targets(torch.tensor([1, 1, 2, 2]), True), kernel).backward()
        assert all(torch.isfinite(s.grad).all() for s in student)


def test_token_attention_kd_against_a_per_element_reference():
    g = torch.Generator().manual_seed(1)
    attention = torch.rand(2, 3, 4, generator=g)
    users, items = torch.randn(2, 3, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    user_mask = torch.tensor([[True, True, False], [True, True, True]])
    item_mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    tau = 0.5
    total = []
    for p in range(2):
        pair = 0.0
        for a in range(3):
            if not user_mask[p, a]:
                continue
            real = [b for b in range(4) if item_mask[p, b]]
            target = [float(attention[p, a, b]) for b in real]
            target = [t / sum(target) for t in target]
            student = softmax([float(users[p, a] @ items[p, b]) / tau for b in real])
            pair += kl(target, student)
        total.append(pair)
    got = token_attention_kd(attention, users, items, user_mask, item_mask, tau)
    assert float(got) == pytest.approx(np.mean(total), rel=1e-4)


def attention_inputs(seed: int = 2):
    """Random ``[P=3, H=2, L_q=3, L_k=4]`` attention inputs with padded queries and keys; the
    third pair has no real key at all."""
    g = torch.Generator().manual_seed(seed)
    teacher, student = torch.randn(3, 2, 3, 4, generator=g), torch.randn(3, 2, 3, 4, generator=g)
    query_mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    key_mask = torch.tensor([[True, True, True, False], [True, False, True, True], [False, False, False, False]])
    return teacher, student, query_mask, key_mask


def counted(query_mask, key_mask, p, a):
    """Whether an attention loss counts query ``a`` of pair ``p``, and the pair's real keys."""
    real = [b for b in range(key_mask.shape[1]) if key_mask[p, b]]
    return bool(query_mask[p, a]) and bool(real), real


def test_masked_softmax_gives_padded_keys_no_probability():
    _, logits, _, key_mask = attention_inputs()
    probabilities = masked_softmax(logits, key_mask)
    assert torch.all(probabilities[~key_mask[:, None, None, :].expand_as(probabilities)] == 0)
    assert torch.allclose(probabilities[:2].sum(-1), torch.ones(2, 2, 3))
    assert torch.all(probabilities[2] == 0)  # no real key: no probability anywhere, and no NaN


def test_attention_mse_against_a_per_element_reference():
    teacher_logits, student_logits, query_mask, key_mask = attention_inputs()
    teacher = torch.softmax(teacher_logits, -1)  # any target; rows need not sum to 1 over the real keys
    squares = []
    for p in range(3):
        for h in range(2):
            for a in range(3):
                keep, real = counted(query_mask, key_mask, p, a)
                if not keep:
                    continue
                student = softmax([float(student_logits[p, h, a, b]) for b in real])
                squares += [(s - float(teacher[p, h, a, b])) ** 2 for s, b in zip(student, real)]
    got = attention_mse(teacher, student_logits, query_mask, key_mask)
    assert float(got) == pytest.approx(np.mean(squares), rel=1e-5)


def test_attention_kl_against_a_per_element_reference():
    teacher, student, query_mask, key_mask = attention_inputs()
    rows = []
    for p in range(3):
        for h in range(2):
            for a in range(3):
                keep, real = counted(query_mask, key_mask, p, a)
                if keep:
                    rows.append(kl(softmax([float(teacher[p, h, a, b]) for b in real]),
                                   softmax([float(student[p, h, a, b]) for b in real])))
    got = attention_kl(teacher, student, query_mask, key_mask)
    assert float(got) == pytest.approx(np.mean(rows), rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_attention_terms_train_the_student_only_with_finite_gradients(loss):
    teacher, student, query_mask, key_mask = attention_inputs()
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    if loss == "mse":
        attention_mse(torch.softmax(teacher, -1), student, query_mask, key_mask).backward()
    else:
        attention_kl(teacher, student, query_mask, key_mask).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad[:2].abs().sum() > 0
    # padded keys, padded queries and the pair without keys get no gradient
    assert torch.all(student.grad[0, :, 2] == 0) and torch.all(student.grad[0, :, :, 3] == 0)
    assert torch.all(student.grad[2] == 0)


def test_pair_blocks_read_user_queries_against_item_keys_and_back():
    g = torch.Generator().manual_seed(3)
    uq, uk = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    iq, ik = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    pairs = PairQK(uq, uk, iq, ik, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool))
    assert torch.allclose(pairs.logits("ui")[1, 0, 2, 4], uq[1, 0, 2] @ ik[1, 0, 4] / 2)
    assert torch.allclose(pairs.logits("iu")[1, 1, 4, 2], iq[1, 1, 4] @ uk[1, 1, 2] / 2)
    assert pairs.masks("ui")[0].shape == (2, 3) and pairs.masks("iu")[0].shape == (2, 5)


def test_one_minus_p_positive_is_the_pairwise_softmax_complement():
    logits = torch.tensor([[2.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[False, False, False, True]])
    pairs = [1 - softmax([2.0, negative])[0] for negative in (1.0, -1.0)]
    assert float(one_minus_p_positive(logits, mask)) == pytest.approx(np.mean(pairs), rel=1e-6)


def test_token_mse_counts_real_tokens_only_and_spares_the_teacher():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    got = token_mse(student, teacher, mask)
    assert float(got.detach()) == pytest.approx((1.0 + 4.0) / 4)  # two real tokens x two dimensions
    got.backward()
    assert teacher.grad is None and torch.all(student.grad[0, 2] == 0)


def privileged_setup(extra_rows: list[tuple] = ()):
    """Two users' interactions with ratings; items 0..5 in categories (1, 1, 2, 2, 3, 3)."""
    rows = [(0, 0, 10, 5.0), (0, 2, 20, 3.0), (0, 1, 30, 4.0), (0, 3, 30, 1.0), (0, 4, 40, 2.0),
            (1, 5, 5, 4.0), (1, 0, 15, 2.0), *extra_rows]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    users = pd.DataFrame({"group": [0, 1]}, index=[0, 1])
    items = pd.DataFrame({"kind": [1, 1, 2, 2, 3, 3]}, index=np.arange(6))
    dataset = build_dataset("tiny", frame, users, [FieldSpec("group", FieldKind.CATEGORICAL)],
                            items, [FieldSpec("kind", FieldKind.CATEGORICAL)])
    train = dataset.interactions
    return dataset, train


def features_of(dataset, train, user_raw, time, candidates, length=4):
    examples = TrainExamples(train, length, dataset.num_users)
    user = list(dataset.user_ids).index(user_raw)
    frame = train.sort_values(["user", "timestamp", "item"], kind="stable").reset_index(drop=True)
    position = int(np.flatnonzero((frame["user"] == user) & (frame["timestamp"] == time))[0])
    features = PrivilegedFeatures(dataset, train, length, "kind")
    index = np.array([position])
    return features(examples.user_input(index), torch.from_numpy(index), torch.tensor([candidates])), frame


def test_privileged_features_by_hand():
    dataset, train = privileged_setup()
    item = {raw: i for i, raw in enumerate(dataset.item_ids)}
    # user 0's example at time 40 (item 4): the past is items 0 (kind 1, rated 5), 2 (kind 2, 3),
    # 1 (kind 1, 4), 3 (kind 2, 1), in that order; candidates: item 1 (kind 1) and item 5 (kind 3)
    out, _ = features_of(dataset, train, 0, 40, [item[1], item[5]])
    got = dict(zip(NAMES, out[0].T.tolist()))
    assert got["category_count"] == pytest.approx([math.log1p(2), 0.0])
    assert got["category_share"] == pytest.approx([2 / 4, 0.0])
    # item 1 was the third of four past slots: one step before the last
    assert got["category_recency"] == pytest.approx([1 / 4, 1.0])
    assert got["category_never"] == [0.0, 1.0]
    assert got["item_count"] == pytest.approx([math.log1p(1), 0.0])
    # kind 1's mean rating against the user's mean of every past rating
    assert got["category_rating"] == pytest.approx([(5 + 4) / 2 - (5 + 3 + 4 + 1) / 4, 0.0], abs=1e-6)


def test_an_event_at_the_same_time_is_not_in_the_past():
    dataset, train = privileged_setup()
    item = {raw: i for i, raw in enumerate(dataset.item_ids)}
    # user 0's two events at time 30 (items 1 and 3) do not see each other
    out, _ = features_of(dataset, train, 0, 30, [item[2]])
    got = dict(zip(NAMES, out[0, 0].tolist()))
    assert got["category_count"] == pytest.approx(math.log1p(1))  # item 2 only (time 20)


def test_a_later_event_never_changes_an_earlier_privileged_feature():
    dataset, train = privileged_setup()
    later, _ = privileged_setup([(0, 5, 99, 1.0), (0, 1, 50, 2.0), (1, 2, 60, 5.0)])
    item = {raw: i for i, raw in enumerate(dataset.item_ids)}
    for time in (10, 20, 30, 40):
        before, _ = features_of(dataset, train, 0, time, [item[i] for i in range(6)])
        after, _ = features_of(later, later.interactions, 0, time, [item[i] for i in range(6)])
        assert torch.equal(before, after)
