"""The faiss inner-product index: against the exact index, and serving a two-tower run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crosstower.config import parse_config
from crosstower.index import ExactInnerProductIndex, FaissInnerProductIndex, Index
from crosstower.run import run_experiment
from tests.test_index import random_exclusions
from tests.test_training import tiny_config

torch.set_num_threads(1)


def test_flat_faiss_equals_the_exact_index_with_exclusions(tmp_path: Path) -> None:
    """"Flat" is exhaustive: the same items and the same scores as the exact index, excluded items
    removed, and the same after a save and load. (Scores without ties: among items tied at the
    k-th place faiss keeps its own choice, where the exact index keeps the lower item.)"""
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(9, 4, generator=g), torch.randn(40, 4, generator=g)
    exclude = random_exclusions(9, 40, seed=1)
    expected = ExactInnerProductIndex(items).search(users, 10, exclude)
    index = FaissInnerProductIndex.build(items, "Flat")
    got = index.search(users, 10, exclude)
    assert torch.equal(got[1], expected[1]) and torch.allclose(got[0], expected[0])
    index.save(tmp_path / "faiss")
    loaded = Index.load(tmp_path / "faiss")
    assert isinstance(loaded, FaissInnerProductIndex) and loaded.describe()["spec"] == "Flat"
    assert torch.equal(loaded.search(users, 10, exclude)[1], expected[1])


def test_hnsw_finds_nearly_all_of_the_exact_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    users, items = torch.randn(50, 16, generator=g), torch.randn(2000, 16, generator=g)
    exact = ExactInnerProductIndex(items).search(users, 20)[1]
    approximate = FaissInnerProductIndex.build(items, "HNSW32", ef_search=128).search(users, 20)[1]
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(approximate, exact)])
    assert recall >= 0.95


def test_fewer_items_than_k_pads_with_minus_one() -> None:
    items = torch.eye(3)
    scores, found = FaissInnerProductIndex.build(items, "Flat").search(torch.ones(2, 3), 5)
    assert found[:, 3:].eq(-1).all() and torch.isinf(scores[:, 3:]).all()
    assert sorted(found[0, :3].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_a_two_tower_run_serves_from_the_index_its_config_names(tmp_path: Path, kind: str) -> None:
    raw = tiny_config(epochs=1)
    raw["model"]["index"] = {"kind": kind, "factory": "Flat"}
    results = run_experiment(parse_config(raw), tmp_path / kind)
    assert results["index"]["kind"] == ("faiss_inner_product" if kind == "faiss" else "exact_inner_product")
    assert (tmp_path / kind / "index" / "index.json").exists()
    # the exact index, and faiss's exhaustive "Flat", serve what exhaustive evaluation ranked
    assert results["metrics"]["test_served"]["recall@50"] == pytest.approx(results["metrics"]["test"]["recall@50"])
    if kind == "exact":
        assert results["metrics"]["test_served"] == results["metrics"]["test"]
