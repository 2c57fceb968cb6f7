"""Smoke test of benchmarks/bench_serving.py: it runs end to end at a tiny size, writes the report
it promises, and every method returns what its exact reference returns where it should."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import load_benchmark

N = 2_000


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_serving")


def small(bench, **kw):
    base = dict(sizes=[N], queries=20, warmup=2, batch=16, batches=2, train_users=2_000, codes=512, threads=1,
                build_threads=1)
    return bench.Settings(**{**base, **kw})


def test_report_structure_and_agreement(bench, tmp_path):
    out = tmp_path / "serving.json"
    argv = ["--sizes", str(N), "--queries", "20", "--warmup", "2", "--batch", "16", "--batches", "2",
            "--train-users", "2000", "--codes", "512", "--build-threads", "1", "--out", str(out)]
    bench.main(argv, log=lambda *_: None)
    report = json.loads(out.read_text())
    assert report["command"].startswith("python benchmarks/bench_serving.py --sizes 2000")
    for key in ("platform", "cpu_count", "cpu", "torch", "torch_cpu_capability", "faiss", "numpy", "threads",
                "git_commit", "git_dirty"):
        assert key in report["machine"]
    assert report["machine"]["threads"] == 1
    (result,) = report["results"]
    assert result["num_items"] == N and result["k"] == 50
    methods = result["methods"]
    assert set(methods) == set(bench.ALL_METHODS)
    for name, m in methods.items():
        for key in ("p50_ms", "p99_ms", "index_p50_ms", "index_p99_ms", "encoder_p50_ms", "qps_batch16",
                    "index_qps_batch16", "recall@50"):
            assert np.isfinite(m[key]) and m[key] >= 0, (name, key)
        assert m["p99_ms"] >= m["p50_ms"] > 0 and m["index_bytes"] > 0
    # Exact methods are exact; HNSW is approximate but must be a recall in [0, 1].
    for name in ("exact_torch", "exact_index", "faiss_flat_ip"):
        assert methods[name]["recall@50"] == 1.0, name
    assert 0.0 <= methods["faiss_hnsw"]["recall@50"] <= 1.0
    assert methods["faiss_hnsw"]["efSearch"] >= 50
    # SparCode: batch-1 search equals its dense reference and the batched search.
    assert methods["sparcode_index"]["recall@50"] == 1.0
    assert methods["sparcode_index"]["identical_to_index_search"] == 1.0
    sc = result["sparcode"]
    assert sc["keep_per_code"] == N // 100 and sc["codes_indexed"] <= 512
    assert sc["kept_fraction"] <= 0.0101
    assert set(result["bar"]) == {"end_to_end", "index_only"}
    assert "met_by_sparcode_index" in result["bar"]["end_to_end"]


def test_exact_brute_force_equals_faiss_flat_ip(bench):
    work = bench.build_workload(N, small(bench, methods=["exact_torch", "exact_index", "faiss_flat_ip"]),
                                log=lambda *_: None)
    users = bench.draw_users(40, N, torch.Generator().manual_seed(1))
    with torch.no_grad():
        vectors = work.methods[0].encode(users)
        answers = {m.name: bench._items(m.search(vectors, 50)) for m in work.methods}
    for name in ("exact_index", "faiss_flat_ip"):
        for a, b in zip(answers["exact_torch"], answers[name]):
            assert set(a.tolist()) == set(b.tolist()), name


@pytest.mark.parametrize("keep", [0, 5])  # 5: 4 codes x 5 items < k, so zero-score items fill the list
def test_sparcode_search_equals_dense_reference(bench, keep):
    work = bench.build_workload(N, small(bench, methods=["sparcode_index"], keep_per_code=keep),
                                log=lambda *_: None)
    index = work.sparse
    users = bench.draw_users(40, N, torch.Generator().manual_seed(2))
    with torch.no_grad():
        queries = work.methods[0].encode(users)
    dense = index.dense_scores(queries.codes, queries.vectors)
    reference = torch.sort(dense, dim=1, descending=True, stable=True).indices[:, :50].numpy()
    searched = index.search(queries, 50)[1].numpy()
    np.testing.assert_array_equal(searched, reference)
    # Batch-1 calls (the one-query path) answer as the batch does.
    for b in range(len(users)):
        one = bench.CodeQueries(queries.codes[b : b + 1], queries.vectors[b : b + 1])
        np.testing.assert_array_equal(index.search(one, 50)[1].numpy(), reference[b : b + 1])



def test_two_trained_runs_are_served_side_by_side(bench, finished_runs, tmp_path):
    out = tmp_path / "trained.json"
    two_tower, sparcode = finished_runs / "dssm", finished_runs / "sparcode"
    bench.main(["--runs", str(two_tower), str(sparcode), "--queries", "10", "--warmup", "1", "--batch", "8",
                "--batches", "2", "--k", "10", "--build-threads", "1", "--out", str(out)], log=lambda *_: None)
    (result,) = json.loads(out.read_text())["results"]
    import crosstower

    assert result["num_items"] == crosstower.load_run(sparcode).num_items
    assert result["runs"]["sparcode"]["dir"] == str(sparcode) and result["runs"]["two_tower"]["model"] == "dssm"
    assert result["queries_by"] == "onnxruntime"  # as crosstower serve encodes a known user
    assert all(key.startswith("recall@10") for key in result["runs"]["sparcode"]["metrics"]["test"])
    methods = result["methods"]
    assert set(methods) == set(bench.ALL_METHODS)
    for name in ("exact_torch", "exact_index", "faiss_flat_ip"):
        assert methods[name]["recall@10"] == 1.0, name
    sparcode = methods["sparcode_index"]  # the run's own index, searched as saved
    assert sparcode["identical_to_index_search"] == 1.0 and sparcode["recall@10"] == 1.0
    assert sparcode["codes_indexed"] == result["sparcode"]["codes_indexed"] > 0


def test_a_run_without_a_sparse_code_index_is_refused(bench, finished_runs, tmp_path):
    with pytest.raises(SystemExit, match="expected a SparCode run"):
        bench.main(["--runs", str(finished_runs / "dssm"), str(finished_runs / "colbert"), "--queries", "4",
                    "--out", str(tmp_path / "x.json")], log=lambda *_: None)
