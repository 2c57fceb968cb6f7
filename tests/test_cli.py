"""The command line: bad input ends with one line and exit status 2, and leaves no run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crosstower.cli import main
from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]


def run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "crosstower.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: {name: dssm\n  oops")
    result = run_cli(["run", "bad.yaml", "--out", "out"], tmp_path)
    assert_one_line_error(result, "bad.yaml", "YAML")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("body, fragment", [
    ("model: {name: dssm, embeding_dim: 3}", "model.embeding_dim: unknown key"),
    ("model: {name: dssm}\ntrain: {lr: fast}", "train.lr"),
    ("model: {name: transformer}", "'transformer'"),
    ("model: {name: dssm}\nevaluate: {ks: [10]}", "early_stopping_metric"),
    ("model: {name: dssm}\ntrain: {negatives: {num: 0}}", "train.negatives: no negatives"),
    ("dataset: {name: nosuch}\nmodel: {name: popularity}", "unknown dataset 'nosuch'"),
])
def test_invalid_config(tmp_path, body, fragment):
    (tmp_path / "c.yaml").write_text(body)
    result = run_cli(["run", "c.yaml", "--out", "out"], tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_data_dir(tmp_path):
    (tmp_path / "c.yaml").write_text("dataset: {name: ml-100k, path: ml-100k}\nmodel: {name: popularity}")
    result = run_cli(["run", "c.yaml", "--data-dir", str(tmp_path / "nowhere"), "--out", "out"], tmp_path)
    assert_one_line_error(result, "nowhere", "--data-dir")
    assert not (tmp_path / "out").exists()


def test_ratings_file_with_missing_column(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ratings.csv").write_text("userId,movieId,timestamp\n1,2,3\n")
    (tmp_path / "c.yaml").write_text(
        "dataset:\n  name: generic\n  path: data\n  options:\n    interactions: ratings.csv\n"
        "    columns: {user: userId, item: movieId, rating: rating}\nmodel: {name: popularity}\n"
    )
    result = run_cli(["run", "c.yaml", "--data-dir", str(tmp_path), "--out", "out"], tmp_path)
    assert_one_line_error(result, "ratings.csv", "rating")
    assert not (tmp_path / "out").exists()


def test_error_after_loading_data_leaves_no_folder(tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"dataset: {{name: synthetic, options: {json.dumps(TINY)}}}\nmodel: {{name: dssm, user_fields: [nosuch]}}\n"
    )
    result = run_cli(["run", "c.yaml", "--out", "out"], tmp_path)
    assert_one_line_error(result, "nosuch")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_out_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    (tmp_path / "c.yaml").write_text(f"dataset: {{name: synthetic, options: {json.dumps(TINY)}}}\nmodel: {{name: popularity}}\n")
    result = run_cli(["run", "c.yaml", "--out", "precious"], tmp_path)
    assert_one_line_error(result, "precious", "not a crosstower run folder")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_bad_override(tmp_path):
    result = run_cli(["run", "--set", "train.epochs=many", "--out", "out"], tmp_path)
    assert_one_line_error(result, "train.epochs")


def test_run_writes_results_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"dataset: {{name: synthetic, options: {json.dumps(TINY)}}}\nsplit: {{protocol: p1}}\n"
        "model: {name: youtubednn, embedding_dim: 8, output_dim: 8, user_hidden: [16]}\n"
        "train: {epochs: 1, threads: 1, negatives: {num: 10}}\n"
    )
    assert main(["run", str(config), "--out", "out", "--set", "train.batch_size=128"]) == 0
    table = capsys.readouterr().out
    assert "youtubednn" in table and "recall@50" in table
    assert main(["run", str(config), "--out", "out10", "--set", "evaluate.ks=[10,50]"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split(" | ")
    assert [h.strip() for h in header if "@" in h] == ["recall@10", "recall@50", "ndcg@50", "precision@50"]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["config"]["train"]["batch_size"] == 128 and saved["protocol"] == "p1"
    assert main(["evaluate", "out"]) == 0
    assert main(["data", "prepare", str(config), "--out", "prepared"]) == 0
    assert (tmp_path / "prepared" / "split.npz").exists()


def test_every_shipped_config_validates():
    from crosstower.config import load_config

    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        config = load_config(path)
        assert config.run_name == path.stem, f"{path.name}: name should match the file name"


def test_tour_configs_mirror_the_embedded_default():
    import yaml

    from crosstower.defaults import DEFAULT_SUITE

    for _, raw in DEFAULT_SUITE:
        assert yaml.safe_load((REPO / "configs" / f"{raw['name']}.yaml").read_text()) == raw


def test_default_suite_trains_each_teacher_before_its_student_under_the_same_output(tmp_path):
    from crosstower.config import parse_config
    from crosstower.defaults import DEFAULT_SUITE, default_suite

    before = repr(DEFAULT_SUITE)
    suite = default_suite(tmp_path / "tour")
    assert [out.parent for out, _ in suite] == [tmp_path / "tour"] * len(suite)
    trained: list[Path] = []
    for out, raw in suite:
        config = parse_config(raw)
        if config.distill is not None:
            assert Path(config.distill.teacher.run) in trained, f"{out.name}: its teacher must come first"
        trained.append(out)
    assert any(parse_config(raw).distill is not None for _, raw in suite), "the tour shows distillation"
    assert repr(DEFAULT_SUITE) == before, "default_suite must not change the embedded suite"


def test_config_help_lists_models_and_every_key_has_a_meaning(tmp_path):
    from crosstower import config as cfg
    from crosstower import config_help

    overview = run_cli(["config"], tmp_path)
    assert overview.returncode == 0 and "dssm" in overview.stdout and "distill.pfd" in overview.stdout
    assert "ml-100k" in overview.stdout and "generic" in overview.stdout
    names = [*config_help.SECTIONS, *cfg.model_names(), *(f"distill.{m}" for m in cfg.distill_methods())]
    for name in names:
        bare = [line for line in config_help.describe(name).splitlines() if "  # " not in line]
        assert not bare, f"{name}: keys without a meaning (add a comment beside the field): {bare}"
    dssm = run_cli(["config", "dssm"], tmp_path).stdout
    assert "embedding_dim: 64  # " in dssm and "  kind: " in dssm  # nested blocks indented
    assert_one_line_error(run_cli(["config", "nosuch"], tmp_path), "config nosuch: unknown model 'nosuch'")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_subcommand(tmp_path, where):
    args = ["--debug", "config", "nosuch"] if where == "before" else ["config", "nosuch", "--debug"]
    result = run_cli(args, tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
