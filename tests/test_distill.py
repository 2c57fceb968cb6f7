"""Distillation end to end on a tiny synthetic data set: teachers from a run or from a config,
every method from its config, students that load, evaluate and serve without their teacher."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml

from crosstower.config import parse_config
from crosstower.data.batching import UserInput
from crosstower.data.run_data import load_data
from crosstower.distill import build_distiller
from crosstower.errors import ConfigError
from crosstower.evaluate.model_eval import evaluate_served, evaluate_split
from crosstower.models import build_model
from crosstower.run import run_experiment
from crosstower.run_dir import open_run, training_users
from crosstower.train.trainer import Trainer
from tests.helpers import rated_frames
from tests.test_cli import assert_one_line_error, run_cli

TINY = {"num_users": 300, "num_items": 150, "num_clusters": 6, "num_segments": 4, "seed": 3}
TRAIN = {"epochs": 2, "batch_size": 128, "patience": 5, "threads": 1, "history_length": 10,
         "negatives": {"num": 10, "in_batch": True}}
MODELS = {
    "dssm": {"name": "dssm", "embedding_dim": 16, "output_dim": 16, "user_hidden": [32], "item_hidden": [32]},
    "youtubednn": {"name": "youtubednn", "embedding_dim": 16, "output_dim": 16, "user_hidden": [32]},
    "colbert": {"name": "colbert", "dim": 16, "projection_dim": 8, "user_layers": 1, "item_layers": 1},
    "cross": {"name": "cross", "dim": 16, "layers": 1, "heads": 2},
    "dual": {"name": "dual", "dim": 16, "user_layers": 1, "heads": 2, "output_dim": 16},
    "trmd": {"name": "trmd", "dim": 16, "projection_dim": 8, "user_layers": 1, "item_layers": 1},
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
    run = open_run(out)
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


def test_missing_teacher_run_is_one_error_line_and_exit_2(tmp_path):
    raw = config("dssm", {"method": "kd", "teacher": {"run": str(tmp_path / "nothing")}})
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli(["run", "kd.yaml", "--out", "out"], tmp_path)
    assert_one_line_error(result, "distill.teacher.run", "nothing", "not a finished run")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("distill, fragment", [
    ({"method": "kd"}, "teacher"),
    ({"method": "kd", "terms": {"nosuch": 1}}, "unknown term 'nosuch'"),
    ({"method": "nosuch"}, "unknown distillation method"),
    ({"method": "kd", "teacher": {"run": "a", "config": "b"}}, "exactly one"),
    ({"method": "kd", "teacher": {"run": "a"}, "terms": {"supervised": 0, "kd": 0}}, "every weight is 0"),
    ({"method": "pfd", "teacher": {"run": "a"}}, "trains its teacher jointly"),
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
    assert all(len(set(row.tolist())) == 20 for row in cache["items"])  # distinct candidates per user
    # each cached score is the teacher's own score of that (user, item), from the user's training history
    teacher = open_run(teachers / "cross")
    users = training_users(teacher.dataset, teacher.split, teacher.config)
    with torch.no_grad():
        for row in (0, 7):
            one = UserInput(users.users[row:row + 1], users.history[row:row + 1])
            expected = teacher.model.score(one, cache["items"][row])[0]
            assert torch.allclose(cache["scores"][row], expected, atol=1e-4)


def distiller_and_batch(raw: dict, tmp_path):
    """The distiller a run would train, and its first batch of 32 examples."""
    cfg = parse_config(raw)
    dataset, split = load_data(cfg, None)
    student = build_model(cfg.model, dataset, "p2", cfg.train.history_length)
    distiller = build_distiller(cfg, student, dataset, split, tmp_path / "x", tmp_path, None)
    batch = Trainer(distiller, dataset, split, cfg, tmp_path).make_batch(np.arange(32), torch.Generator().manual_seed(0))
    return distiller, batch


@pytest.mark.parametrize("model, method, term", [("dssm", "kd", "kd"), ("dual", "virt", "virt"),
                                                 ("dual", "dide", "kd"), ("dual", "dide", "attention"),
                                                 ("trmd", "trmd", "cls"), ("trmd", "trmd", "tokens")])
def test_the_frozen_teacher_gets_no_gradient(teachers, tmp_path, model, method, term):
    """A distillation term trains the student only: the frozen teachers get no gradient."""
    distill = {"method": method, "teacher": {"run": str(teachers / "cross")}}
    if method == "trmd":
        distill["colbert_teacher"] = {"run": str(teachers / "colbert")}
    distiller, batch = distiller_and_batch(config(model, distill), tmp_path)
    student = distiller.student
    loss, parts = distiller.loss(batch)
    loss.backward()
    assert parts[term] > 0
    frozen = [distiller.teacher, getattr(distiller, "colbert_teacher", None)]
    assert all(p.grad is None for t in frozen if t is not None for p in t.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not any(k.startswith("teacher") for k in distiller.state_dict())


@pytest.mark.parametrize("model, distill", [
    ("dssm", {"method": "endx", "kernel": "pkt"}),
    ("dssm", {"method": "endx"}),
    ("dssm", {"method": "pfd"}),
    ("youtubednn", {"method": "pfd", "variant": "pointwise", "warmup_epochs": 0}),
    ("dual", {"method": "ernie"}),
    ("dual", {"method": "virt"}),
    ("dual", {"method": "virt", "normalisation": "slice", "pairs": "candidates", "layers": [-1]}),
    ("dual", {"method": "dide", "terms": {"supervised": 0.5}}),
    ("trmd", {"method": "trmd"}),
    ("trmd", {"method": "trmd", "ranking": "faithful", "pairs": "candidates"}),
    # self on-the-fly distillation alone: a teacher named but never read is not even loaded
    ("dual", {"method": "ernie", "teacher": {"run": "/nonexistent"},
              "terms": {"cross_to_colbert": 0, "cross_to_dual": 0, "attention": 0}}),
])
def test_every_method_trains_end_to_end(teachers, tmp_path, model, distill):
    if distill["method"] in ("endx", "ernie", "virt", "dide", "trmd") and "teacher" not in distill:
        distill = {**distill, "teacher": {"run": str(teachers / "cross")}}
    if distill["method"] == "trmd":
        distill = {**distill, "colbert_teacher": {"run": str(teachers / "colbert")}}
    raw = config(model, distill)
    results = run_experiment(parse_config(raw), tmp_path / "run")
    history = results["training_history"]
    for term, weight in parse_config(raw).distill.terms.items():
        if weight:
            assert all(math.isfinite(epoch[f"loss_{term}"]) for epoch in history), term
    served, exhaustive = results["metrics"]["test_served"]["recall@50"], results["metrics"]["test"]["recall@50"]
    if results["index"]["kind"] == "two_rankers":
        # every item is a candidate here (150 items, 300 candidates): only float16 token storage differs
        assert served == pytest.approx(exhaustive, abs=0.02)
        model = raw["model"]  # MaxSim over the stored tokens plus the folded first ranker, per pair
        tokens = results["cost"]["bytes_per_item"] - 4 * model["dim"]
        assert tokens > 0 and tokens % (2 * model["projection_dim"]) == 0
        assert results["cost"]["macs_per_pair"] >= model["dim"]
    else:
        assert served == pytest.approx(exhaustive, abs=1e-9)
    assert open_run(tmp_path / "run").model.config.name == raw["model"]["name"]


def test_pfd_warm_up_moves_the_kd_weight_to_the_supervised_term(tmp_path):
    results = run_experiment(parse_config(config("dssm", {"method": "pfd", "warmup_epochs": 1})), tmp_path / "run")
    first, second = results["training_history"][:2]
    assert first["loss_kd_weight"] == 0 and first["loss_supervised_weight"] == 1.0
    assert second["loss_kd_weight"] == 0.5 and second["loss_supervised_weight"] == 0.5


@pytest.mark.parametrize("detach", [True, False])
def test_pfd_kd_term_reaches_the_joint_teacher_only_without_detach(tmp_path, detach):
    distiller, batch = distiller_and_batch(
        config("dssm", {"method": "pfd", "warmup_epochs": 0, "detach_teacher": detach,
                        "terms": {"supervised": 0, "teacher": 0}}), tmp_path)
    loss, _ = distiller.loss(batch)
    loss.backward()
    teacher_grad = sum(float(p.grad.abs().sum()) for p in distiller.joint_teacher.parameters() if p.grad is not None)
    assert (teacher_grad == 0) == detach


def test_ernie_attention_term_needs_aligned_token_sequences(teachers, tmp_path):
    raw = config("dual", {"method": "ernie", "teacher": {"run": str(teachers / "cross")}}, history_length=12)
    with pytest.raises(ConfigError, match="token sequences"):
        run_experiment(parse_config(raw), tmp_path / "run")


def test_virtual_attention_reads_each_candidate_pair_from_the_towers(teachers, tmp_path):
    """The student's virtual cross attention of pair (b, c) is built from user b's queries and
    keys and candidate c's, as the two towers compute them alone."""
    from crosstower.distill.attention import student_pairs

    distiller, batch = distiller_and_batch(config("dual", {"method": "virt", "teacher": {"run": str(teachers / "cross")}}),
                                           tmp_path)
    student = distiller.student
    logits = student.candidate_logits(batch, with_states=True)
    pairs = student_pairs(logits, -1, -1, "candidates")
    candidates = torch.cat([batch.positives[:, None], batch.negatives], dim=1)
    for b, c in [(0, 0), (3, 2), (31, candidates.shape[1] - 1)]:
        age = batch.user.example_age
        one_user = UserInput(batch.user.users[b:b + 1], batch.user.history[b:b + 1], None if age is None else age[b:b + 1])
        _, user_traces = student._user_pass(one_user)
        _, item_traces = student._item_pass(candidates[b, c:c + 1])
        row = b * candidates.shape[1] + c
        expected = user_traces[-1].queries[0] @ item_traces[-1].keys[0].transpose(-1, -2) / user_traces[-1].queries.shape[-1] ** 0.5
        assert torch.allclose(pairs.logits("ui")[row], expected, atol=1e-5)
    positives = student_pairs(logits, -1, -1, "positives")
    assert torch.equal(positives.item_keys, pairs.item_keys[::candidates.shape[1]])


@pytest.mark.parametrize("distill, fragment", [
    ({"method": "virt", "layers": [1]}, "layer 1 is not in"),
    ({"method": "virt", "layers": None}, "needs as many layers"),
    ({"method": "dide"}, "heads"),
])
def test_attention_methods_refuse_a_teacher_they_cannot_pair_with(teachers, tmp_path, distill, fragment):
    model = {**MODELS["dual"], "user_layers": 2} if distill.get("layers", 0) is None else MODELS["dual"]
    if distill["method"] == "dide":
        model = {**MODELS["dual"], "heads": 4}
    raw = config("dual", {**distill, "teacher": {"run": str(teachers / "cross")}})
    raw["model"] = copy.deepcopy(model)
    with pytest.raises(ConfigError, match=fragment):
        run_experiment(parse_config(raw), tmp_path / "run")


def test_endx_refuses_a_teacher_without_joint_states(teachers, tmp_path):
    raw = config("dssm", {"method": "endx", "teacher": {"run": str(teachers / "colbert")}})
    with pytest.raises(ConfigError, match="cross encoder"):
        run_experiment(parse_config(raw), tmp_path / "run")


def test_a_teacher_on_rated_interactions_is_accepted(tmp_path):
    """A saved split keeps user, item and time but not the ratings: the teacher's split still
    matches the student's; PFD reads the ratings of the past (its category_rating feature)."""
    frame, _, items = rated_frames(num_users=80, num_items=60, rows=2500)
    frame.to_csv(tmp_path / "log.csv", index=False)
    items.reset_index().to_csv(tmp_path / "items.csv", index=False)
    dataset = {"name": "generic", "path": str(tmp_path), "options": {
        "interactions": "log.csv", "columns": {"rating": "rating"},
        "item_features": {"file": "items.csv", "id_column": "item_id", "fields": [{"column": "genre", "kind": "categorical"}]}}}

    def rated(model, distill=None):
        raw = {**config(model, distill), "dataset": dataset, "split": {"protocol": "p1"}}
        raw["model"].pop("user_fields", None)
        return parse_config(raw)

    run_experiment(rated("colbert"), tmp_path / "teacher")
    kd = run_experiment(rated("dssm", {"method": "kd", "teacher": {"run": str(tmp_path / "teacher")}}), tmp_path / "kd")
    pfd = run_experiment(rated("dssm", {"method": "pfd", "category_field": "genre"}), tmp_path / "pfd")
    assert kd["training_history"][0]["loss_kd"] > 0 and pfd["training_history"][0]["loss_teacher"] > 0
