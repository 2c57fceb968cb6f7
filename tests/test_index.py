"""Indexes: exact MIPS and SparCode's sparse code index against slow dense references."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from crosstower.data.ragged import Ragged
from crosstower.errors import CheckpointError
from crosstower.evaluate.ranking import topk_items
from crosstower.index import CodeQueries, ExactInnerProductIndex, Index, SparseCodeIndex, encode_code_ids, every_code
from crosstower.index.keep_rules import UsageBudget, usage_allocation
from crosstower.index.sparse_code import top_k_positions

torch.set_num_threads(1)


class BilinearScorer:
    """A random SparCode "model": ReLU(code_vector @ W - bias), rounded to quarters.

    Rounding makes many scores exactly 0 (as ReLU does in SparCode) and many exact ties, and keeps
    every score exact in float16, so references can compare scores with ``==``. A module-level
    class, so it pickles for the multi-process build.
    """

    def __init__(self, codebook_size: int, num_codebooks: int, dim: int, num_items: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n, self.m = codebook_size, num_codebooks
        self.table = torch.randn(codebook_size**num_codebooks, dim, generator=g)  # vector of every code
        self.weight = torch.randn(dim, num_items, generator=g)

    def vectors(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table[torch.from_numpy(encode_code_ids(codes, self.n))]

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        raw = self.vectors(codes) @ self.weight - 1.5
        return torch.round(torch.relu(raw) * 4) / 4


def random_exclusions(num_rows: int, num_items: int, seed: int, per_row: int = 4) -> Ragged:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, per_row + 1, num_rows)
    values = np.concatenate([rng.choice(num_items, n, replace=False) for n in lengths]).astype(np.int64)
    return Ragged(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), values)


# ------------------------------------------------------------------------------ slow references


def kept_row(scores: np.ndarray, keep) -> np.ndarray:
    """One code's kept scores as a dense row (0 where not kept), chosen item by item."""
    out = np.zeros_like(scores)
    if keep == "nonzero" or isinstance(keep, float):
        t = 0.0 if keep == "nonzero" else keep
        out[scores > t] = scores[scores > t]
        return out
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # ties: lower item first
    for i in [i for i in order if scores[i] > 0][:keep]:
        out[i] = scores[i]
    return out


def random_prior(num_items: int, seed: int) -> np.ndarray:
    """An item prior in quarters (exact in float32 sums, many ties), of either sign."""
    return (np.random.default_rng(seed).integers(-8, 9, num_items) / 4).astype(np.float32)


def reference_search(model, indexed, keep, codes, vectors, exclude, k, prior=None):
    """Full kept code x item matrix, summed over each user's token rows (plus the item prior),
    then a stable sort."""
    indexed = indexed.numpy()
    table = np.stack([kept_row(model(torch.from_numpy(c[None]))[0].numpy(), keep) for c in indexed])
    table = table.astype(np.float16).astype(np.float32)
    known = {tuple(c): r for r, c in enumerate(indexed)}
    idx_vectors = model.vectors(torch.from_numpy(indexed)).numpy()
    dense = np.zeros((codes.shape[0], table.shape[1]), dtype=np.float32)
    for u in range(codes.shape[0]):
        if prior is not None:
            dense[u] += prior
        for t in range(codes.shape[1]):
            row = known.get(tuple(codes[u, t].tolist()))
            if row is None:  # nearest indexed code vector
                row = int(np.argmin(((idx_vectors - vectors[u, t].numpy()) ** 2).sum(1)))
            dense[u] += table[row]
    for u in range(codes.shape[0]):
        dense[u, exclude.row(u)] = -np.inf
    scores, items = torch.sort(torch.from_numpy(dense), dim=1, descending=True, stable=True)
    return scores[:, :k], items[:, :k], torch.from_numpy(dense)


def build(model, codes, keep, **kw) -> SparseCodeIndex:
    return SparseCodeIndex.build(model, codes, model.vectors(codes), model.weight.shape[1], model.n,
                                 keep=keep, code_chunk=kw.pop("code_chunk", 7), progress=False, **kw)


# ------------------------------------------------------------------------------ exact index


def test_exact_index_equals_topk_items_and_round_trips(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    users = torch.randint(-2, 3, (9, 4), generator=g).float()  # small integers: many ties
    items = torch.randint(-2, 3, (40, 4), generator=g).float()
    exclude = random_exclusions(9, 40, seed=1)
    index = ExactInnerProductIndex(items)
    expected = topk_items(lambda r, s, e: users[torch.from_numpy(r)] @ items[s:e].T, 9, 40, exclude, 10)
    got = index.search(users, 10, exclude, user_batch=4, item_chunk=7)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    index.save(tmp_path / "exact")
    loaded = Index.load(tmp_path / "exact")
    assert isinstance(loaded, ExactInnerProductIndex)
    assert isinstance(loaded.arrays()["item_vectors"], np.memmap)
    again = loaded.search(users, 10, exclude)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    assert loaded.nbytes() == 40 * 4 * 4
    assert loaded.describe()["kind"] == "exact_inner_product"
    no_excl = index.search(users, 3)
    assert torch.equal(no_excl[1], topk_items(lambda r, s, e: users[torch.from_numpy(r)] @ items[s:e].T, 9, 40,
                                              Ragged(np.zeros(10, dtype=np.int64), np.zeros(0, dtype=np.int64)), 3)[1])


# ------------------------------------------------------------------------------ sparse code index


@pytest.mark.parametrize("keep", ["nonzero", 3, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_prior", [False, True])
def test_served_search_equals_exhaustive_scoring_of_kept_entries(keep, seed: int, with_prior: bool) -> None:
    n, m, dim, num_items, k_u = 4, 2, 5, 30, 3
    model = BilinearScorer(n, m, dim, num_items, seed)
    codes = every_code(n, m)
    rng = np.random.default_rng(seed)
    prior = random_prior(num_items, seed) if with_prior else None
    indexed = codes[np.sort(rng.choice(len(codes), 10, replace=False))]  # "codes seen in training"
    index = build(model, indexed[torch.from_numpy(rng.permutation(10))], keep, item_prior=prior)  # any order
    queries = torch.from_numpy(rng.integers(0, n, (8, k_u, m)))  # some of them never indexed
    vectors = model.vectors(queries.reshape(-1, m)).reshape(8, k_u, dim) + 0.01
    exclude = random_exclusions(8, num_items, seed)
    ref_scores, ref_items, ref_dense = reference_search(model, indexed, keep, queries, vectors, exclude, 12, prior)
    for sparse in (None, True, False):  # ranking over posting-list items only, or densely
        scores, items = index.search(CodeQueries(queries, vectors), 12, exclude, user_batch=3, sparse=sparse)
        assert torch.equal(items, ref_items)
        assert torch.equal(scores, ref_scores)
    dense = index.dense_scores(queries, vectors)
    finite = torch.isfinite(ref_dense)
    assert torch.equal(dense[finite], ref_dense[finite])
    assert (dense >= (torch.from_numpy(prior) if with_prior else 0)).all()  # never-posted: the prior or 0, not -inf


def test_top_l_keeps_the_largest_positive_scores_per_code() -> None:
    model = BilinearScorer(3, 2, 4, 25, seed=3)
    codes = every_code(3, 2)
    index = build(model, codes, 4)
    full = model(codes).numpy()
    for row in range(len(codes)):
        items, scores = index.posting(row)
        positives = full[row][full[row] > 0]
        assert len(items) == min(4, len(positives))
        assert np.all(np.diff(items) > 0)  # ascending items within a posting list
        np.testing.assert_array_equal(scores.astype(np.float32), full[row, items])
        expected = np.flatnonzero(kept_row(full[row], 4))
        np.testing.assert_array_equal(items, expected)  # boundary ties go to the lower item
    assert any(np.sum(full[r] > 0) > 4 for r in range(len(codes)))  # the cut was exercised


def test_nonzero_keeps_exactly_the_positive_scores_and_sizes_add_up() -> None:
    n, m, dim, num_items = 3, 2, 4, 25
    model = BilinearScorer(n, m, dim, num_items, seed=4)
    codes = every_code(n, m)
    index = build(model, codes, "nonzero")
    full = model(codes).numpy()
    assert 0 < (full == 0).mean() < 1
    for row in range(len(codes)):
        items, scores = index.posting(row)
        np.testing.assert_array_equal(items, np.flatnonzero(full[row] > 0))
        np.testing.assert_array_equal(scores, full[row][full[row] > 0].astype(np.float16))
    nnz, c = int((full > 0).sum()), len(codes)
    assert index.nnz == nnz
    assert index.kept_fraction == pytest.approx(nnz / (c * num_items))
    assert index.nbytes() == (c + 1) * 8 + nnz * (4 + 2) + c * 8 + c * m * 4 + c * dim * 4
    info = index.describe()
    assert info["codes_indexed"] == c and info["nnz"] == nnz and info["nbytes"] == index.nbytes()
    assert sum(info["bytes_per_part"].values()) == index.nbytes()
    assert info["code_space_covered"] == 1.0
    json.dumps(info)  # goes into metrics.json as is


def random_usage(num_codes: int, seed: int) -> np.ndarray:
    """Token counts per code, from 0 to a few hundred (heavy-tailed, as real code use is)."""
    return np.random.default_rng(seed).zipf(1.6, num_codes).clip(max=500) - 1


@pytest.mark.parametrize("keep", [1, 3, 0.5, 1.25, UsageBudget(0.1, 0.5), UsageBudget(0.1, 0.0), UsageBudget(0.3, 1.0)])
def test_pruning_a_nonzero_index_equals_building_with_the_sparser_rule(keep) -> None:
    """Scores are exact in float16 here (quarters), so pruning and building agree entry for entry."""
    model = BilinearScorer(3, 2, 4, 25, seed=5)
    codes = every_code(3, 2)
    prior, usage = random_prior(25, seed=5), random_usage(len(codes), seed=5)  # carried over unchanged
    pruned = build(model, codes, "nonzero", item_prior=prior, code_usage=usage).pruned(keep)
    built = build(model, codes, keep, item_prior=prior, code_usage=usage)
    for name, array in built.arrays().items():
        np.testing.assert_array_equal(pruned.arrays()[name], array, err_msg=name)
    assert pruned.keep == built.keep and pruned.nnz < build(model, codes, "nonzero").nnz


def test_usage_allocation_shares_the_budget_by_usage_to_the_power_of_the_exponent() -> None:
    usage = np.array([0, 1, 4, 16, 100])
    assert usage_allocation(usage, 0.1, 0.0, 30).tolist() == [3] * 5  # the uniform top-L, 0.1 * 30
    for exponent in (0.5, 1.0, 2.0):
        limits = usage_allocation(usage, 0.1, exponent, 30)
        weights = usage.astype(float) ** exponent
        expected = np.minimum(np.floor(0.1 * 5 * 30 * weights / weights.sum()), 30)
        assert limits.tolist() == expected.astype(int).tolist() and limits.sum() <= 0.1 * 5 * 30
    assert usage_allocation(np.array([1, 1000]), 0.9, 1.0, 30).tolist() == [0, 30]  # capped at N
    with pytest.raises(ValueError, match="usage > 0"):
        usage_allocation(np.zeros(3), 0.1, 0.5, 30)


def test_usage_budget_keeps_each_codes_own_top_l() -> None:
    """Every code keeps the top L_c of its positive scores (ties to the lower item), L_c from
    its usage, and the index stays within the budget."""
    model = BilinearScorer(3, 2, 4, 25, seed=3)
    codes = every_code(3, 2)
    usage = random_usage(len(codes), seed=3)
    keep = UsageBudget(0.2, 0.5)
    index = build(model, codes, keep, code_usage=usage)
    full, limits = model(codes).numpy(), usage_allocation(usage, 0.2, 0.5, 25)
    assert len(set(limits.tolist())) > 2  # the allocation differs between codes
    for row in range(len(codes)):
        items, _ = index.posting(row)
        expected = np.flatnonzero(kept_row(full[row], int(limits[row]))) if limits[row] else []
        np.testing.assert_array_equal(items, expected)
    assert index.kept_fraction <= 0.2 and index.keep == {"share": 0.2, "usage_exponent": 0.5}
    np.testing.assert_array_equal(index.arrays()["code_usage"], usage)


def test_code_usage_follows_the_codes_and_can_be_attached_later() -> None:
    """Usage given in any code order ends up on the right rows; an index saved without usage
    gets it from (codes, counts) pairs, repeated codes adding up."""
    model = BilinearScorer(3, 2, 4, 25, seed=6)
    codes = every_code(3, 2)
    usage = random_usage(len(codes), seed=6)
    shuffle = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    shuffled = build(model, codes[shuffle], "nonzero", code_usage=usage[shuffle.numpy()])
    np.testing.assert_array_equal(shuffled.arrays()["code_usage"], usage)
    plain = build(model, codes, "nonzero")
    assert "code_usage" not in plain.arrays()
    with pytest.raises(ValueError, match="needs the codes' usage"):
        plain.pruned(UsageBudget(0.1))
    halves = torch.cat([codes, codes]), np.concatenate([usage // 2, usage - usage // 2])
    attached = plain.with_code_usage(*halves)
    np.testing.assert_array_equal(attached.arrays()["code_usage"], usage)
    np.testing.assert_array_equal(attached.pruned(UsageBudget(0.1)).arrays()["items"],
                                  shuffled.pruned(UsageBudget(0.1)).arrays()["items"])
    partial = build(model, codes[:4], "nonzero")
    with pytest.raises(ValueError, match="not indexed"):
        partial.with_code_usage(codes[3:6], np.ones(3))


@pytest.mark.parametrize("with_extras", [False, True])
def test_save_load_mmap_round_trip_gives_identical_searches(tmp_path: Path, with_extras: bool) -> None:
    """With the optional arrays (item prior, code usage) and a usage budget, or without."""
    model = BilinearScorer(4, 2, 5, 30, seed=5)
    codes = every_code(4, 2)[::2]
    extras = {"item_prior": random_prior(30, seed=5), "code_usage": random_usage(len(codes), seed=5)}
    index = build(model, codes, UsageBudget(0.2) if with_extras else 3, **(extras if with_extras else {}))
    queries = torch.randint(0, 4, (6, 2, 2), generator=torch.Generator().manual_seed(0))
    q = CodeQueries(queries, model.vectors(queries.reshape(-1, 2)).reshape(6, 2, 5))
    exclude = random_exclusions(6, 30, seed=2)
    path = tmp_path / "runs" / "sparse"
    index.save(path)
    index.save(path)  # overwriting an existing index is fine and leaves no temporary folders
    assert sorted(p.name for p in path.parent.iterdir()) == ["sparse"]
    loaded = SparseCodeIndex.load(path)
    assert all(isinstance(a, np.memmap) for a in loaded.arrays().values())
    for a, b in zip(index.search(q, 7, exclude), loaded.search(q, 7, exclude)):
        assert torch.equal(a, b)
    in_memory = SparseCodeIndex.load(path, mmap=False)
    assert not isinstance(in_memory.arrays()["items"], np.memmap)
    assert torch.equal(in_memory.search(q, 7)[1], index.search(q, 7)[1])
    assert loaded.describe() == {**index.describe(), "build_seconds": loaded.describe()["build_seconds"]}
    for name, array in index.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], array, err_msg=name)
    with pytest.raises(CheckpointError, match="expected 'exact_inner_product'"):
        ExactInnerProductIndex.load(path)


def test_unseen_code_falls_back_to_the_nearest_indexed_code() -> None:
    n, num_items = 3, 6
    indexed = torch.tensor([[0, 0], [1, 1], [2, 2]])
    vectors = torch.eye(3) * 10
    table = torch.tensor([[1.0, 0, 0, 0, 0, 2], [0, 3.0, 0, 0, 0, 0], [0, 0, 0, 4.0, 0.5, 0]])

    def score(codes: torch.Tensor) -> torch.Tensor:
        return table[codes[:, 0]]  # the diagonal codes score as their row

    index = SparseCodeIndex.build(score, indexed, vectors, num_items, n, keep="nonzero", progress=False)
    unseen = torch.tensor([[[0, 1]], [[2, 0]]])  # never indexed
    near = torch.tensor([[[0.0, 1.0, 9.0]], [[9.0, 1.0, 0.0]]])  # nearest to codes (2,2) and (0,0)
    dense = index.dense_scores(unseen, near)
    assert torch.equal(dense, table[[2, 0]])
    assert index.lookup(unseen, near).tolist() == [[2], [0]]
    _, items = index.search(CodeQueries(unseen, near), 3)
    assert items.tolist() == [[3, 4, 0], [5, 0, 1]]  # then items scoring 0 in index order
    with pytest.raises(ValueError, match="not indexed and no vectors"):
        index.search(CodeQueries(unseen, None), 3)


def test_invalid_inputs_are_rejected() -> None:
    model = BilinearScorer(3, 2, 4, 10, seed=0)
    dup = torch.tensor([[0, 1], [2, 2], [0, 1]])
    with pytest.raises(ValueError, match="repeated code tuples"):
        build(model, dup, "nonzero")
    usage = np.ones(9)
    for bad in (-1, 0, True, -0.5, float("nan"), "all", UsageBudget(0.0), UsageBudget(1.5), UsageBudget(0.1, -1.0),
                {"share": 0.1}, {"share": 0.1, "usage_exponent": 0.5, "extra": 1}):
        with pytest.raises(ValueError):
            build(model, every_code(3, 2), bad, code_usage=usage)
    with pytest.raises(ValueError, match="code_usage must be"):
        build(model, every_code(3, 2), UsageBudget(0.1), code_usage=np.ones(4))
    with pytest.raises(ValueError, match="outside"):
        build(model, torch.tensor([[0, 3]]), "nonzero")
    with pytest.raises(ValueError, match="float16"):
        SparseCodeIndex.build(lambda c: torch.full((len(c), 10), 1e6), every_code(3, 2), torch.zeros(9, 2), 10, 3,
                              progress=False)


def test_corrupt_or_missing_index_folder_raises_checkpoint_error(tmp_path: Path) -> None:
    model = BilinearScorer(3, 2, 4, 10, seed=0)
    path = tmp_path / "idx"
    with pytest.raises(CheckpointError, match="not found"):
        Index.load(path)
    build(model, every_code(3, 2), "nonzero").save(path)

    items = path / "items.npy"
    good = items.read_bytes()
    items.write_bytes(good[: len(good) - 8])  # truncated
    for mmap in (True, False):
        with pytest.raises(CheckpointError, match=str(path)) as err:
            SparseCodeIndex.load(path, mmap=mmap)
        assert "\n" not in str(err.value)
    items.write_bytes(good)

    indptr = np.load(path / "indptr.npy")
    np.save(path / "indptr.npy", indptr[::-1].copy())  # right shape, wrong content
    with pytest.raises(CheckpointError, match="inconsistent"):
        SparseCodeIndex.load(path)
    np.save(path / "indptr.npy", indptr)
    assert SparseCodeIndex.load(path).nnz == len(np.load(items))

    (path / "scores.npy").unlink()
    with pytest.raises(CheckpointError, match="missing scores.npy"):
        SparseCodeIndex.load(path)
    (path / "index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt index.json"):
        SparseCodeIndex.load(path)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_prior", [False, True])
def test_sparse_ranking_equals_dense_ranking_with_ties_and_exclusions(seed: int, with_prior: bool) -> None:
    """Few posting items per code (top-4) against 200 items: at small k the sparse path ranks,
    at large k users run out of candidates and the search must give the dense answer. With an
    item prior, items outside the posting lists compete through it (the top-prior candidates)."""
    model = BilinearScorer(6, 2, 5, 200, seed)
    index = build(model, every_code(6, 2), 4, item_prior=random_prior(200, seed) if with_prior else None)
    rng = np.random.default_rng(seed)
    queries = torch.from_numpy(rng.integers(0, 6, (20, 3, 2)))
    exclude = random_exclusions(20, 200, seed, per_row=6)
    for k in (1, 5, 12, 30):
        dense = index.search(queries, k, exclude, sparse=False)
        for user_batch in (None, 1):  # one user a block: the one-query path
            sparse = index.search(queries, k, exclude, sparse=True, user_batch=user_batch)
            assert torch.equal(dense[0], sparse[0]) and torch.equal(dense[1], sparse[1])


def test_top_k_positions_breaks_ties_by_position_or_by_the_given_ids() -> None:
    sums = np.array([1.0, 2.0, 2.0, 0.5, 2.0, 3.0], dtype=np.float32)
    assert top_k_positions(sums, 3).tolist() == [5, 1, 2]
    assert top_k_positions(sums, 4).tolist() == [5, 1, 2, 4]
    assert top_k_positions(sums, 10).tolist() == [5, 1, 2, 4, 0, 3]
    ids = np.array([9, 7, 8, 1, 3, 0])  # candidates in no particular order: ties go to the lower id
    assert top_k_positions(sums, 2, ties=ids).tolist() == [5, 4]
    assert top_k_positions(sums, 4, ties=ids).tolist() == [5, 4, 1, 2]
    rng = np.random.default_rng(0)
    for _ in range(50):  # against a full sort by (score descending, id ascending)
        sums = rng.integers(0, 4, 30).astype(np.float32)
        ids = rng.permutation(1000)[:30]
        k = int(rng.integers(1, 31))
        assert top_k_positions(sums, k, ties=ids).tolist() == np.lexsort((ids, -sums))[:k].tolist()


def test_one_query_search_is_the_same_from_concurrent_threads() -> None:
    """Batch-1 search sums in per-thread work arrays: threads answering at once (a service's
    pool) get exactly what one thread gets alone."""
    model = BilinearScorer(6, 2, 5, 300, seed=2)
    index = build(model, every_code(6, 2), 20, item_prior=random_prior(300, 2))
    queries = torch.from_numpy(np.random.default_rng(2).integers(0, 6, (64, 3, 2)))
    exclude = random_exclusions(64, 300, seed=2, per_row=5)

    def one(u: int) -> torch.Tensor:
        return index.search(queries[u : u + 1], 10, exclude.take(np.array([u])), sparse=True)[1][0]

    alone = [one(u) for u in range(64)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, list(range(64)) * 4))
    assert all(torch.equal(together[i], alone[i % 64]) for i in range(len(together)))
    assert torch.equal(torch.stack(alone), index.search(queries, 10, exclude, sparse=False)[1])


def test_search_does_not_depend_on_the_user_block_size() -> None:
    model = BilinearScorer(4, 2, 5, 30, seed=6)
    index = build(model, every_code(4, 2), 2)
    queries = torch.randint(0, 4, (10, 4, 2), generator=torch.Generator().manual_seed(1))
    q = CodeQueries(queries, None)
    exclude = random_exclusions(10, 30, seed=3, per_row=29)  # some users have < k items left
    whole = index.search(q, 8, exclude)
    assert all(torch.equal(a, b) for a, b in zip(whole, index.search(q, 8, exclude, sparse=True)))
    for batch in (1, 3):
        part = index.search(q, 8, exclude, user_batch=batch)
        assert torch.equal(whole[0], part[0]) and torch.equal(whole[1], part[1])
    assert torch.equal(index.search(queries, 8, exclude)[1], whole[1])  # codes alone
    empty = index.search(CodeQueries(queries[:0], None), 8)
    assert empty[0].shape == (0, 8) and empty[1].shape == (0, 8)


@pytest.mark.slow  # spawning two workers that import torch takes a few seconds
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a 2-worker build needs 2 cores to be meaningful")
def test_multi_process_build_equals_single_process() -> None:
    model = BilinearScorer(4, 2, 5, 30, seed=7)
    codes = every_code(4, 2)
    start = time.perf_counter()
    keep, usage = UsageBudget(0.2), random_usage(len(codes), seed=7)  # per-code limits cross the chunks
    parallel = build(model, codes, keep, code_chunk=4, workers=2, code_usage=usage)
    assert time.perf_counter() - start < 30
    single = build(model, codes, keep, code_chunk=4, code_usage=usage)
    for name, array in single.arrays().items():
        np.testing.assert_array_equal(parallel.arrays()[name], array, err_msg=name)
