"""benchmarks/million_items.py: its stage runner measures a whole process tree's memory, and its
plan trains both million configs on the one data set it generates."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tests.helpers import load_benchmark



@pytest.fixture(scope="module")
def million():
    return load_benchmark("million_items")


def test_a_stage_peak_counts_its_child_processes(million, tmp_path):
    # The stage's process holds 300 MB while its child holds 200 MB: the tree's peak is their
    # sum, the largest process's peak the stage's process alone.
    child = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    script = textwrap.dedent(f"""
        import subprocess, sys
        b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])
        subprocess.run([sys.executable, "-c", {child!r}], check=True)
    """)
    ballast = bytearray(600 * 2**20)  # a large launcher (as pytest is): not counted in the stage's peaks
    ballast[::4096] = b"x" * len(ballast[::4096])
    result = million.run_stage([sys.executable, "-c", script], tmp_path / "stage.log")
    del ballast
    assert result["exit"] == 0 and result["wall_seconds"] >= 2
    assert result["peak_tree_rss_gib"] >= 0.45  # 500 MB of touched pages, plus two interpreters
    assert 0.29 <= result["peak_process_rss_gib"] < result["peak_tree_rss_gib"]


def test_a_failing_stage_reports_its_exit_status(million, tmp_path):
    result = million.run_stage([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "stage.log")
    assert result["exit"] == 3


def test_every_stage_after_the_first_reads_the_generated_data_set(million, tmp_path):
    plan = million.stages(tmp_path, threads=2, queries=50)
    assert list(plan) == ["data", "youtubednn", "sparcode", "serving"]
    data_command = plan["data"][0]
    assert "num_items=1000000" in data_command and str(tmp_path / "data") in data_command
    for name in ("youtubednn", "sparcode"):
        command, done = plan[name]
        assert "dataset.path=data" in command and command[command.index("--data-dir") + 1] == str(tmp_path)
        assert done == tmp_path / name / "metrics.json"
    serving = plan["serving"][0]  # opens both runs, so it needs their data folder too
    assert serving[serving.index("--data-dir") + 1] == str(tmp_path)
    assert serving[-2:] == ["--out", str(tmp_path / "serving.json")]
