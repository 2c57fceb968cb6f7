"""Distillation end to end on a tiny synthetic data set: teachers from a run or from a config,
every method from its config, students that load, evaluate and serve without their teacher."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from crosstower.config import parse_config
from crosstower.data.run_data import load_data
from crosstower.distill import build_distiller
from crosstower.errors import ConfigError
from crosstower.evaluate.model_eval import evaluate_served, evaluate_split
from crosstower.models import build_model
from crosstower.run import run_experiment
from crosstower.run_dir import load_run
from crosstower.train.trainer import Trainer

TINY = {"num_users": 300, "num_items": 150, "num_clusters": 6, "num_segments": 4, "seed": 3}
TRAIN = {"epochs": 2, "batch_size": 128, "patience": 5, "threads": 1, "history_length": 10,
         "negatives": {"num": 10, "in_batch": True}}
MODELS = {
    "dssm": {"name": "dssm", "embedding_dim": 16, "output_dim": 16, "user_hidden": [32], "item_hidden": [32]},
    "colbert": {"name": "colbert", "dim": 16, "projection_dim": 8, "user_layers": 1, "item_layers": 1},
    "cross": {"name": "cross", "dim": 16, "layers": 1, "heads": 2},
    "dual": {"name": "dual", "dim": 16, "layers": 1, "heads": 2, "output_dim": 16},
}


def config(model: str, distill: dict | None = None, **train) -> dict:
    raw = {"dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
           "model": copy.deepcopy(MODELS[model]), "train": {**copy.deepcopy(TRAIN), **train},
           "evaluate": {"ks": [10, 50]}}
    if distill is not None:
        raw["distill"] = distill
    return raw


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A late-interaction and a cross-encoder teacher run, trained once for the module."""
    root = tmp_path_factory.mktemp("teachers")
    for name in ("colbert", "cross"):
        run_experiment(parse_config(config(name, epochs=1)), root / name)
    return root


def test_score_kd_from_a_teacher_run_saves_a_plain_student(teachers, tmp_path):
    out = tmp_path / "student"
    results = run_experiment(parse_config(config("dssm", {"method": "kd", "teacher": {"run": str(teachers / "colbert")}})), out)
    epoch = results["training_history"][0]
    assert {"loss_supervised", "loss_kd", "loss_kd_weight"} <= set(epoch)
    assert epoch["loss_kd"] > 0
    assert results["timing"]["teacher_train_seconds"] > 0
    # The folder holds the student alone, loads and serves like any DSSM run.
    saved = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith(("student.", "teacher.")) for k in saved)
    run = load_run(out)
    assert type(run.model).__name__ == "TwoTower"
    served = evaluate_served(run.model, run.index(), run.split.test, run.dataset.num_items, run.config)[0]
    exhaustive = evaluate_split(run.model, run.split.test, run.dataset.num_items, run.config)[0]
    assert served["recall@50"] == pytest.approx(exhaustive["recall@50"], abs=1e-9)
    assert results["metrics"]["test_served"]["recall@50"] == pytest.approx(exhaustive["recall@50"], abs=1e-9)


def test_teacher_named_by_config_is_trained_once_beside_the_student(tmp_path):
    teacher_config = tmp_path / "teacher.yaml"
    teacher_config.write_text(yaml.safe_dump({**config("colbert", epochs=1), "name": "tiny-colbert"}))
    distill = {"method": "kd", "teacher": {"config": str(teacher_config)}}
    run_experiment(parse_config(config("dssm", distill)), tmp_path / "runs" / "a")
    teacher_dir = tmp_path / "runs" / "tiny-colbert"
    assert (teacher_dir / "metrics.json").exists()
    stamp = (teacher_dir / "metrics.json").stat().st_mtime_ns
    run_experiment(parse_config(config("dssm", distill, seed=1)), tmp_path / "runs" / "b")
    assert (teacher_dir / "metrics.json").stat().st_mtime_ns == stamp  # reused, not retrained
    # A different run under the teacher's name is refused, and kept.
    teacher_config.write_text(yaml.safe_dump({**config("colbert", epochs=1, lr=0.01), "name": "tiny-colbert"}))
    with pytest.raises(ConfigError, match="holds a different run"):
        run_experiment(parse_config(config("dssm", distill)), tmp_path / "runs" / "c")
    assert (teacher_dir / "metrics.json").stat().st_mtime_ns == stamp


def test_teacher_of_another_split_is_refused(teachers, tmp_path):
    raw = config("dssm", {"method": "kd", "teacher": {"run": str(teachers / "colbert")}})
    raw["split"]["seed"] = 5
    with pytest.raises(ConfigError, match="another split"):
        run_experiment(parse_config(raw), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_missing_teacher_run_is_one_clear_error(tmp_path):
    raw = config("dssm", {"method": "kd", "teacher": {"run": str(tmp_path / "nothing")}})
    with pytest.raises(ConfigError, match="distill.teacher.run .*nothing"):
        run_experiment(parse_config(raw), tmp_path / "s")


@pytest.mark.parametrize("distill, fragment", [
    ({"method": "kd"}, "teacher"),
    ({"method": "kd", "terms": {"nosuch": 1}}, "unknown term 'nosuch'"),
    ({"method": "nosuch"}, "unknown distillation method"),
    ({"method": "kd", "teacher": {"run": "a", "config": "b"}}, "exactly one"),
])
def test_bad_distill_sections(distill, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(config("dssm", distill))


def test_score_kd_with_cached_teacher_scores(teachers, tmp_path):
    distill = {"method": "kd", "teacher": {"run": str(teachers / "cross")}, "cache_candidates": 20}
    results = run_experiment(parse_config(config("dssm", distill)), tmp_path / "cached")
    assert results["training_history"][-1]["loss_kd"] > 0
    cache = torch.load(tmp_path / "cached" / "teacher_scores.pt", weights_only=True)
    assert cache["items"].shape[1] == 20 and cache["scores"].shape == cache["items"].shape


def distiller_and_batch(raw: dict, tmp_path):
    """The distiller a run would train, and its first batch of 32 examples."""
    cfg = parse_config(raw)
    dataset, split = load_data(cfg, None)
    student = build_model(cfg.model, dataset, "p2", cfg.train.history_length)
    distiller = build_distiller(cfg, student, dataset, split, tmp_path / "x", tmp_path, None)
    batch = Trainer(distiller, dataset, split, cfg, tmp_path).make_batch(np.arange(32), torch.Generator().manual_seed(0))
    return distiller, batch


def test_the_frozen_teacher_gets_no_gradient(teachers, tmp_path):
    """A distillation term trains the student only: the frozen teacher gets no gradient."""
    distiller, batch = distiller_and_batch(config("dssm", {"method": "kd", "teacher": {"run": str(teachers / "cross")}}),
                                           tmp_path)
    student = distiller.student
    loss, parts = distiller.loss(batch)
    loss.backward()
    assert parts["kd"] > 0
    assert all(p.grad is None for p in distiller.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
