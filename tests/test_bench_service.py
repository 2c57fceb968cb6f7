"""The service load benchmark runs, stops by itself and writes what it measured (its timings
are not checked here: benchmarks are measured alone, not in the test suite)."""

from __future__ import annotations

import json

from tests.helpers import load_benchmark


def test_a_short_load_reports_latency_throughput_and_no_errors(finished_runs, tmp_path):
    out = tmp_path / "bench.json"
    load_benchmark("bench_service").main([str(finished_runs / "dssm"), "--requests", "30", "--concurrency", "1", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["settings"]["concurrency"] == [1, 2] and "cpu" in json.dumps(report).lower()
    (result,) = report["results"]
    assert result["served_by"] == "exact_inner_product index (exact)"
    assert [load["concurrency"] for load in result["service"]] == [1, 2]
    for measured in (result["in_process"], *result["service"]):
        assert measured["requests"] == 30 and measured["errors"] == 0
        assert 0 < measured["p50_ms"] <= measured["p99_ms"] and measured["requests_per_second"] > 0
