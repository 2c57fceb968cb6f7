"""The late-interaction index against exhaustive MaxSim on random token vectors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crosstower.data.ragged import Ragged
from crosstower.evaluate.ranking import evaluate_ranking, evaluate_retrieved, topk_items
from crosstower.index import Index
from crosstower.index.late_interaction import LateInteractionIndex, _top_voted
from crosstower.nn.maxsim import maxsim
from crosstower.nn.tokens import TokenSequence

torch.set_num_threads(1)


def random_tokens(n: int, length: int, m: int, seed: int, pad: bool) -> TokenSequence:
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(n, length, m, generator=g), dim=-1)
    mask = torch.rand(n, length, generator=g) > 0.3 if pad else torch.ones(n, length, dtype=torch.bool)
    mask[:, 0] = True
    # float16 is what the index stores; round here so the exhaustive reference sees the same vectors
    return TokenSequence(tokens.half().float(), mask)


def random_exclusions(num_users: int, num_items: int, seed: int) -> Ragged:
    rng = np.random.default_rng(seed)
    rows = [np.unique(rng.integers(0, num_items, rng.integers(0, 6))) for _ in range(num_users)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return Ragged(indptr.astype(np.int64), np.concatenate(rows).astype(np.int64))


def exhaustive_topk(users: TokenSequence, items: TokenSequence, bias: torch.Tensor, exclude: Ragged, k: int):
    scores = maxsim(users, items) + bias
    return topk_items(lambda rows, lo, hi: scores[torch.from_numpy(rows), lo:hi], len(scores), scores.shape[1], exclude, k)


@pytest.mark.parametrize("spec", ["Flat", "IVF8,Flat"])
def test_search_equals_exhaustive_maxsim_when_every_item_is_a_candidate(spec):
    """With every token retrieved and no candidate cap, the index is exhaustive MaxSim."""
    items = random_tokens(60, 4, 8, seed=0, pad=True)
    users = random_tokens(7, 5, 8, seed=1, pad=True)
    bias = torch.randn(60) * 0.1
    exclude = random_exclusions(7, 60, seed=2)
    total = int(items.mask.sum())
    index = LateInteractionIndex.build(items, bias, spec=spec, tokens_per_query=total, max_candidates=60, nprobe=8)
    scores, top = index.search(users, 10, exclude)
    ref_scores, ref_top = exhaustive_topk(users, items, bias, exclude, 10)
    assert torch.equal(top, ref_top)
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    assert index.last_scored_fraction == pytest.approx(1.0)


def slow_top_voted(owner, items, gains, num_users, length, bias, top):
    """Every item scored: summed best gain per user token (0 where not retrieved) plus the bias."""
    best = {}
    for o, i, g in zip(owner, items, gains):
        best[(o, i)] = max(best.get((o, i), -np.inf), g)
    out = []
    for u in range(num_users):
        approx = {i: float(bias[i]) for i in range(len(bias))}
        for (o, i), g in best.items():
            if o // length == u:
                approx[i] += g
        ranked = sorted((-s, i) for i, s in approx.items())
        out.append(sorted(i for _, i in ranked[:top]))
    return out


@pytest.mark.parametrize("with_bias", [False, True])
def test_candidates_are_the_best_imputed_maxsim_plus_bias_over_every_item(with_bias):
    """Retrieval gains (similarity above the token's lowest hit) summed over user tokens, plus
    the bias; an item no token retrieved scores its bias, so popular items compete too."""
    rng = np.random.default_rng(0)
    owner = rng.integers(0, 12, 300)
    items = rng.integers(0, 20, 300)
    gains = rng.random(300).round(3) + rng.random(300) * 1e-6  # no exact ties in the ordering
    bias = (rng.random(20) * 3 if with_bias else np.zeros(20)) + rng.random(20) * 1e-6
    top = 5
    fast = _top_voted(owner, items, gains, 4, 3, bias, np.argsort(-bias)[:top], top)
    assert [f.tolist() for f in fast] == slow_top_voted(owner, items, gains, 4, 3, bias, top)
    # a user whose tokens retrieved nothing gets the items of highest bias
    lonely = _top_voted(owner[owner < 9], items[owner < 9], gains[owner < 9], 4, 3, bias, np.argsort(-bias)[:top], top)
    assert lonely[3].tolist() == sorted(np.argsort(-bias)[:top].tolist())


def test_capped_candidates_score_a_fraction_and_save_load_round_trips(tmp_path):
    items = random_tokens(200, 3, 8, seed=3, pad=False)
    users = random_tokens(5, 4, 8, seed=4, pad=False)
    index = LateInteractionIndex.build(items, None, spec="IVF16,Flat", tokens_per_query=8, max_candidates=20, nprobe=4)
    scores, top = index.search(users, 10)
    assert index.last_scored_fraction <= 20 / 200
    # every returned item is scored exactly: its score is its true MaxSim
    exact = maxsim(users, items)
    assert torch.allclose(scores, exact.gather(1, top), atol=1e-5)
    index.save(tmp_path / "li")
    loaded = Index.load(tmp_path / "li")
    assert isinstance(loaded, LateInteractionIndex) and loaded.nbytes() == index.nbytes()
    again_scores, again_top = loaded.search(users, 10)
    assert torch.equal(again_top, top) and torch.equal(again_scores, scores)
    assert index.describe()["bytes_per_part"]["item_tokens"] == 200 * 3 * 8 * 2  # float16


def test_retrieved_metrics_equal_ranking_metrics_for_the_same_lists():
    items = random_tokens(50, 3, 6, seed=5, pad=False)
    users = random_tokens(9, 4, 6, seed=6, pad=False)
    exclude = random_exclusions(9, 50, seed=7)
    targets = random_exclusions(9, 50, seed=8)
    scores = maxsim(users, items)
    index = LateInteractionIndex.build(items, None, spec="Flat", tokens_per_query=150, max_candidates=50)
    retrieved = evaluate_retrieved(
        lambda rows: index.search(TokenSequence(users.tokens[rows], users.mask[rows]), 20, exclude.take(rows))[1],
        9, 50, exclude, targets, ks=(5, 20),
    )
    ranked = evaluate_ranking(lambda rows, lo, hi: scores[torch.from_numpy(rows), lo:hi], 9, 50, exclude, targets, ks=(5, 20))
    assert retrieved == ranked



@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_residual_bits_pack_and_unpack_exactly(nbits):
    from crosstower.index.token_store import _pack, _unpack

    buckets = np.random.default_rng(nbits).integers(0, 2**nbits, size=(7, 16)).astype(np.uint8)
    packed = _pack(buckets, nbits)
    assert packed.shape == (7, 16 * nbits // 8) and packed.dtype == np.uint8
    assert np.array_equal(_unpack(packed, nbits, 16), buckets)


def test_residual_store_reconstructs_tokens_within_its_bit_budget():
    from crosstower.index.token_store import ResidualStore

    items = random_tokens(300, 3, 16, seed=9, pad=True)
    tokens, mask = items.tokens.numpy(), items.mask.numpy()
    cosines = {}
    for nbits in (1, 2, 8):
        store = ResidualStore.encode(tokens, mask, nbits=nbits)
        decoded = store.decode(np.arange(300))
        cosines[nbits] = float((decoded * tokens).sum(-1)[mask].mean())
        assert np.allclose(np.linalg.norm(decoded, axis=-1), 1.0, atol=1e-5)
        assert store.residuals.nbytes == 300 * 3 * 16 * nbits // 8
    assert cosines[1] < cosines[2] < cosines[8] and cosines[8] > 0.99 and cosines[1] > 0.7


def test_residual_index_is_exhaustive_maxsim_on_its_decoded_tokens(tmp_path):
    items = random_tokens(80, 3, 8, seed=10, pad=True)
    users = random_tokens(6, 4, 8, seed=11, pad=True)
    index = LateInteractionIndex.build(items, None, spec="Flat", store="residual", nbits=2,
                                       tokens_per_query=int(items.mask.sum()), max_candidates=80)
    decoded = TokenSequence(torch.from_numpy(index.store.decode(np.arange(80))), items.mask)
    scores, top = index.search(users, 10)
    ref_scores, ref_top = exhaustive_topk(users, decoded, torch.zeros(80), _empty(6), 10)
    assert torch.equal(top, ref_top) and torch.allclose(scores, ref_scores, atol=1e-5)
    index.save(tmp_path / "residual")
    loaded = Index.load(tmp_path / "residual")
    assert loaded.describe()["store"] == "residual" and torch.equal(loaded.search(users, 10)[1], top)
    assert "item_tokens" not in loaded.arrays() and loaded.nbytes() < LateInteractionIndex.build(items, None, spec="Flat").nbytes()


def _empty(rows: int) -> Ragged:
    return Ragged(np.zeros(rows + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
