"""`crosstower compare`: a markdown table and PNG plots of finished runs, seeds grouped on demand,
the serving cost read from metrics.json (or measured for runs written before it was recorded)."""

from __future__ import annotations

import json
import shutil

import pytest

from crosstower.compare import markdown_table, summarize, write_report
from crosstower.config import parse_config
from crosstower.errors import CrosstowerError
from crosstower.run import run_experiment
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_distill import config

PNG = b"\x89PNG"


def test_runs_record_their_serving_cost(finished_runs):
    costs = {name: json.loads((finished_runs / name / "metrics.json").read_text())["cost"]
             for name in ("dssm", "cross", "colbert")}
    assert costs["dssm"] == {"macs_per_pair": 16.0, "bytes_per_item": 64.0}  # one 16-d float32 inner product
    assert costs["cross"]["macs_per_pair"] > 100 * costs["dssm"]["macs_per_pair"]
    assert costs["colbert"]["bytes_per_item"] > costs["dssm"]["bytes_per_item"]


def test_the_report_has_a_row_per_run_and_both_plots(finished_runs, tmp_path):
    names = ["dssm", "sparcode", "colbert", "cross"]
    result = run_cli(["compare", *(str(finished_runs / n) for n in names), "--out", str(tmp_path / "report")], tmp_path)
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == names
    assert "sparse_code" in report and "| exhaustive |" in report
    for plot in ("accuracy_vs_cost.png", "validation.png"):
        assert (tmp_path / "report" / plot).read_bytes().startswith(PNG) and f"]({plot})" in report
    assert result.stdout.strip() == report.strip()


def test_seeds_share_a_row_with_mean_and_spread(tmp_path):
    for seed in (0, 1):
        run_experiment(parse_config(config("dssm", epochs=1, seed=seed, threads=2)), tmp_path / f"s{seed}")
    summaries = [summarize(tmp_path / f"s{seed}") for seed in (0, 1)]
    recalls = [s.metrics["test"]["recall@50"] for s in summaries]
    grouped = markdown_table([summaries]).splitlines()[2]
    assert "s0 (+1)" in grouped and " ± " in grouped and "| 0, 1 |" in grouped
    assert f"{sum(recalls) / 2:.4f} ± " in grouped
    separate = markdown_table([[s] for s in summaries]).splitlines()[2:]
    assert len(separate) == 2 and " ± " not in "".join(separate)


def test_a_run_without_a_recorded_cost_is_measured(finished_runs, tmp_path):
    shutil.copytree(finished_runs / "dssm", tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "metrics.json").read_text())
    recorded = saved.pop("cost")
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(saved))
    assert summarize(tmp_path / "old").cost == recorded


def test_bad_input_is_refused_and_nothing_is_replaced(finished_runs, tmp_path):
    assert_one_line_error(run_cli(["compare", str(tmp_path), "--out", str(tmp_path / "r")], tmp_path),
                          "not a finished run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("keep")
    with pytest.raises(CrosstowerError, match="is not a crosstower report"):
        write_report([finished_runs / "dssm"], tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "keep"


def test_a_sparse_code_index_serves_without_multiply_adds(finished_runs):
    from crosstower.compare import served_macs, summarize

    sparcode, dssm = summarize(finished_runs / "sparcode"), summarize(finished_runs / "dssm")
    assert served_macs(sparcode) == 0.0 and sparcode.cost["macs_per_pair"] > 0  # exhaustive scoring's cost
    assert served_macs(dssm) == dssm.cost["macs_per_pair"] == 16.0


def test_an_earlier_report_brings_its_runs_into_a_new_one(finished_runs, tmp_path):
    """Runs compared on another day (their folders gone) join new runs in one table and plot."""
    first = write_report([finished_runs / "dssm", finished_runs / "colbert"], tmp_path / "first")
    shutil.copytree(first, tmp_path / "kept")  # only the report travels
    merged = write_report([tmp_path / "kept", finished_runs / "sparcode"], tmp_path / "merged")
    rows = [line.split(" | ")[0].removeprefix("| ") for line in (merged / "report.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]
    assert rows == ["dssm", "colbert", "sparcode"]
    direct = [summarize(finished_runs / n) for n in ("dssm", "colbert", "sparcode")]
    assert markdown_table([[s] for s in direct]) in (merged / "report.md").read_text()
    assert (merged / "accuracy_vs_cost.png").read_bytes().startswith(PNG)
    (tmp_path / "kept" / "runs.json").write_text("{}")
    with pytest.raises(CrosstowerError, match="runs.json: not a crosstower report's runs.json"):
        write_report([tmp_path / "kept"], tmp_path / "again")
