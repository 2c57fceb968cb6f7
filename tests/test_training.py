"""End-to-end training on tiny data: determinism, resume, checkpoints, model contract."""

import json

import math

import numpy as np
import pytest
import torch

from crosstower.config import parse_config
from crosstower.data.batching import TrainExamples, eval_user_input
from crosstower.data.loaders import load_dataset
from crosstower.data.splits import make_split
from crosstower.errors import CheckpointError, ConfigError
from crosstower.evaluate.model_eval import evaluate_model
from crosstower.models import build_model
from crosstower.run import reevaluate, run_experiment
from crosstower.train.checkpoint import load_checkpoint, save_checkpoint
from crosstower.train.trainer import Trainer, epoch_order

TINY = {"num_users": 300, "num_items": 150, "num_clusters": 6, "num_segments": 4, "seed": 3}


def tiny_config(model: str = "youtubednn", **train) -> dict:
    return {
        "dataset": {"name": "synthetic", "options": TINY},
        "split": {"protocol": "p2"},
        "model": {"name": model, "embedding_dim": 16, "output_dim": 16, "user_hidden": [32]},
        "train": {"epochs": 3, "batch_size": 256, "patience": 5, "threads": 1, "history_length": 20,
                  "negatives": {"num": 20, "in_batch": True}, **train},
        "evaluate": {"ks": [10, 50]},
    }


@pytest.fixture(scope="module")
def tiny_data():
    dataset = load_dataset("synthetic", None, TINY)
    return dataset, make_split(dataset, "p2")


def test_history_is_the_items_before_the_example(tiny_data):
    dataset, split = tiny_data
    examples = TrainExamples(split.train, history_length=3, num_users=dataset.num_users)
    user = examples.users[0]
    first_rows = np.nonzero(examples.users == user)[0][:5]
    hist = examples.user_input(first_rows).history.numpy()
    items = examples.items[first_rows]
    assert hist[0].tolist() == [-1, -1, -1]
    assert hist[1].tolist() == [-1, -1, items[0]]
    assert hist[4].tolist() == list(items[1:4])


def test_same_seed_same_metrics_different_seed_differs(tmp_path, tiny_data):
    config = parse_config(tiny_config())
    a = run_experiment(config, tmp_path / "a")
    b = run_experiment(config, tmp_path / "b")
    assert a["metrics"] == b["metrics"]
    c = run_experiment(parse_config(tiny_config(seed=1)), tmp_path / "c")
    assert c["metrics"]["test"] != a["metrics"]["test"]


def test_results_contract_and_reevaluation(tmp_path):
    out = tmp_path / "run"
    results = run_experiment(parse_config(tiny_config("dssm")), out)
    saved = json.loads((out / "metrics.json").read_text())
    assert {"model", "dataset", "protocol", "config", "metrics", "timing", "index"} <= saved.keys()
    assert {"recall@50", "ndcg@50", "precision@50", "hitrate@50"} <= saved["metrics"]["test"].keys()
    assert saved["protocol"] == "p2" and saved["model"] == "dssm"
    environment = saved["environment"]  # where it was measured: figures differ between CPUs
    assert environment["torch"] == torch.__version__ and environment["torch_threads"] >= 1
    assert environment["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["cpu"] and environment["numpy"]
    assert not (out / "checkpoint.pt").exists() and not list(tmp_path.glob(".*partial"))
    again = reevaluate(out)
    assert again["test"] == results["metrics"]["test"]


def test_resume_continues_exactly(tmp_path, tiny_data):
    """With dropout on, so that the global generator's state matters too."""
    dataset, split = tiny_data

    def config(epochs):
        raw = tiny_config(epochs=epochs)
        raw["model"]["dropout"] = 0.3
        return parse_config(raw)

    full_cfg = config(3)
    torch.manual_seed(0)
    full = build_model(full_cfg.model, dataset, "p2")
    full_report = Trainer(full, dataset, split, full_cfg, tmp_path).fit()

    work = tmp_path / "resumed"
    work.mkdir()
    torch.manual_seed(0)
    first = build_model(full_cfg.model, dataset, "p2")
    Trainer(first, dataset, split, config(1), work).fit()
    torch.manual_seed(123)  # a different initialisation must be overwritten by the checkpoint
    second = build_model(full_cfg.model, dataset, "p2")
    report = Trainer(second, dataset, split, full_cfg, work).fit(resume=True)
    assert report.resumed_from_epoch == 1
    assert [h["loss"] for h in report.history] == [h["loss"] for h in full_report.history]
    assert [h["val_recall@50"] for h in report.history] == [h["val_recall@50"] for h in full_report.history]


def test_resume_refuses_another_config_and_stops_after_early_stop(tmp_path, tiny_data):
    dataset, split = tiny_data
    base = tiny_config(epochs=2)
    model = build_model(parse_config(base).model, dataset, "p2")
    Trainer(model, dataset, split, parse_config(base), tmp_path).fit()
    other = tiny_config(epochs=4, lr=0.1)
    with pytest.raises(CheckpointError, match="different config"):
        Trainer(model, dataset, split, parse_config(other), tmp_path).fit(resume=True)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["report"]["stopped_early"], state["bad_epochs"] = True, 5  # stopped by patience (5)
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    report = Trainer(model, dataset, split, parse_config(tiny_config(epochs=4)), tmp_path).fit(resume=True)
    assert report.epochs_run == 2


def test_resume_with_a_larger_time_budget_continues_a_run_stopped_by_its_budget(tmp_path, tiny_data):
    dataset, split = tiny_data
    model = build_model(parse_config(tiny_config()).model, dataset, "p2")
    stopped = Trainer(model, dataset, split, parse_config(tiny_config(epochs=4, max_minutes=1e-6)), tmp_path).fit()
    assert stopped.stopped_early and stopped.epochs_run == 1
    same_budget = Trainer(model, dataset, split, parse_config(tiny_config(epochs=4, max_minutes=1e-6)), tmp_path)
    assert same_budget.fit(resume=True).epochs_run == 1
    report = Trainer(model, dataset, split, parse_config(tiny_config(epochs=4)), tmp_path).fit(resume=True)
    assert report.resumed_from_epoch == 1 and report.epochs_run == 4


def test_a_time_budget_ends_the_epoch_that_crosses_it(tmp_path, tiny_data, caplog):
    dataset, split = tiny_data
    config = parse_config(tiny_config(epochs=3, max_minutes=1e-6, batch_size=16))
    model = build_model(config.model, dataset, "p2")
    with caplog.at_level("WARNING", logger="crosstower.train"):
        report = Trainer(model, dataset, split, config, tmp_path).fit()
    assert report.epochs_run == 1 and report.out_of_time and math.isfinite(report.history[0]["loss"])
    assert "epoch 0: train.max_minutes reached after 1 of " in caplog.text


def test_one_epoch_a_pass_is_the_seeded_shuffle_of_every_example():
    for epoch in range(3):
        expected = np.random.default_rng([7, epoch]).permutation(50)
        assert np.array_equal(epoch_order(7, epoch, 50), expected)
        assert np.array_equal(epoch_order(7, epoch, 50, per_epoch=50), expected)


@pytest.mark.parametrize("per_epoch", [1, 7, 20, 50, 120])
def test_short_epochs_are_consecutive_slices_of_the_passes(per_epoch):
    size, epochs = 50, 11
    stream = np.concatenate([epoch_order(3, e, size, per_epoch) for e in range(epochs)])
    passes = np.concatenate([np.random.default_rng([3, p]).permutation(size) for p in range(-(-per_epoch * epochs // size))])
    assert all(len(epoch_order(3, e, size, per_epoch)) == per_epoch for e in range(epochs))
    assert np.array_equal(stream, passes[: per_epoch * epochs])  # every example once a pass


def test_short_epochs_train_and_validate_that_many_examples(tmp_path, tiny_data):
    dataset, split = tiny_data
    config = parse_config(tiny_config(epochs=4, examples_per_epoch=300, batch_size=100))
    model = build_model(config.model, dataset, "p2")
    report = Trainer(model, dataset, split, config, tmp_path).fit()
    assert [epoch["examples"] for epoch in report.history] == [300] * 4
    assert all(epoch["train_seconds"] > 0 for epoch in report.history)
    assert len(split.train) > 4 * 300  # the four epochs did not cover one pass


def test_a_finished_run_stopped_by_its_budget_keeps_its_checkpoint_to_train_on(tmp_path):
    out = tmp_path / "run"
    first = run_experiment(parse_config(tiny_config(epochs=3, max_minutes=1e-6)), out)
    assert first["timing"]["out_of_time"] and first["timing"]["epochs"] == 1
    assert (out / "checkpoint.pt").exists()
    again = run_experiment(parse_config(tiny_config(epochs=3)), out, resume=True)
    assert again["timing"]["resumed_from_epoch"] == 1 and again["timing"]["epochs"] == 3
    assert not again["timing"]["out_of_time"] and not (out / "checkpoint.pt").exists()


def test_best_epoch_is_restored(tmp_path):
    results = run_experiment(parse_config(tiny_config(epochs=4, lr=0.05)), tmp_path / "run")
    best = results["training_history"][results["timing"]["best_epoch"]]
    assert best["val_recall@50"] == max(h["val_recall@50"] for h in results["training_history"])
    assert results["metrics"]["val"]["recall@50"] == best["val_recall@50"]


def test_metrics_do_not_depend_on_evaluation_batch_size(tiny_data):
    dataset, split = tiny_data
    model = build_model(parse_config(tiny_config()).model, dataset, "p2")
    runs = [evaluate_model(model, split.test, dataset.num_items, 20, [10, 50], user_batch=b, item_chunk=c)[0]
            for b, c in ((1, 7), (7, 150), (1000, 64))]
    assert runs[0] == runs[1] == runs[2]


def test_serving_input_has_zero_example_age_and_p3_reads_no_history(tiny_data):
    dataset, split = tiny_data
    user = eval_user_input(split.test, np.arange(4), 20)
    assert torch.equal(user.example_age, torch.zeros(4))
    model = build_model(parse_config(tiny_config()).model, dataset, "p3")
    assert model.use_history is False


def test_trained_model_beats_popularity(tmp_path):
    pop = run_experiment(parse_config({**tiny_config(), "model": {"name": "popularity"}}), tmp_path / "pop")
    yt = run_experiment(parse_config(tiny_config(epochs=8, lr=0.005)), tmp_path / "yt")
    assert yt["metrics"]["test"]["recall@50"] > 1.1 * pop["metrics"]["test"]["recall@50"]


def test_bf16_training_tracks_fp32_and_evaluates_in_fp32(tmp_path, caplog, monkeypatch):
    """The transformer cross encoder, where bf16 pays; parameters and evaluation stay float32.
    On a CPU without bfloat16 instructions the run says it will be slow. (Sampled negatives
    only: in-batch ones cost B^2 cross-encoder passes a batch, minutes on such a CPU.)"""
    def config(**train):
        return parse_config({**tiny_config(epochs=2, history_length=10, negatives={"num": 20}, **train),
                             "model": {"name": "cross", "dim": 16, "layers": 1, "heads": 2}})

    monkeypatch.setattr("crosstower.train.trainer.cpu_has_bfloat16", lambda: False)
    with caplog.at_level("WARNING", logger="crosstower.train"):
        fp32 = run_experiment(config(), tmp_path / "fp32")
        assert "bfloat16" not in caplog.text  # fp32 has nothing to warn about
        bf16 = run_experiment(config(precision="bf16"), tmp_path / "bf16")
    assert "no bfloat16 instructions" in caplog.text and "train.precision=fp32" in caplog.text
    for a, b in zip(fp32["training_history"], bf16["training_history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    weights = torch.load(tmp_path / "bf16" / "model.pt", weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    with pytest.raises(ConfigError, match="precision"):
        parse_config(tiny_config(precision="fp16"))


def test_embedding_model_score_equals_encoders(tiny_data):
    dataset, split = tiny_data
    model = build_model(parse_config(tiny_config("dssm")).model, dataset, "p2").eval()
    user = eval_user_input(split.test, np.arange(5), 20)
    items = torch.arange(dataset.num_items)
    with torch.no_grad():
        direct = model.score(user, items)
        cached = model.item_scorer()(user, 0, dataset.num_items)
        pairwise = torch.stack([(model.encode_users(user) * model.encode_items(torch.tensor([i]))).sum(-1) for i in range(7)], 1)
    assert torch.allclose(direct, cached, atol=1e-5)
    assert torch.allclose(direct[:, :7], pairwise, atol=1e-5)


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    save_checkpoint(path, {"model_name": "dssm", "model": {}})
    with pytest.raises(CheckpointError, match="expected 'youtubednn'"):
        load_checkpoint(path, "youtubednn")


def test_cold_start_on_the_deezer_sample(tmp_path, shared_data):
    """P3 end to end on the real Deezer schema: dense-vector user fields, the release's user split."""
    folder = shared_data / "deezer-semi-perso-cold-start-sample"
    if not (folder / "song_embeddings.parquet").exists():
        pytest.skip(f"{folder} not found")
    config = parse_config({
        "dataset": {"name": "deezer", "path": str(folder)}, "split": {"protocol": "p3"},
        "model": {"name": "dssm", "use_history": False, "embedding_dim": 8, "output_dim": 8},
        "train": {"epochs": 2, "threads": 1, "negatives": {"num": 3}},
    })
    results = run_experiment(config, tmp_path / "deezer", shared_data)
    assert results["protocol"] == "p3" and results["metrics"]["test"]["num_users"] == 5


class ScriptedValidation:
    """Replaces ``Trainer.validate`` with a fixed sequence of validation Recall@50, one per epoch,
    so that which epochs improve (and hence when the learning rate falls) is known in advance."""

    def __init__(self, values: list[float]):
        self.values = list(values)

    def __call__(self) -> dict[str, float]:  # set on the class, but a callable object is not bound
        return {"recall@50": self.values.pop(0)}


DECAY = {"lr": 0.01, "lr_decay": 0.5, "lr_patience": 0, "patience": 4}
SCRIPT = [0.10, 0.20, 0.15, 0.15, 0.30, 0.25]


def test_the_learning_rate_halves_after_each_epoch_without_improvement(tmp_path, tiny_data, monkeypatch):
    dataset, split = tiny_data
    monkeypatch.setattr(Trainer, "validate", ScriptedValidation(SCRIPT))
    config = parse_config(tiny_config(epochs=6, **DECAY))
    report = Trainer(build_model(config.model, dataset, "p2"), dataset, split, config, tmp_path).fit()
    # Epochs 2 and 3 do not beat 0.20, so epochs 3 and 4 train at half the rate of the one before.
    assert [h["lr"] for h in report.history] == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.0025, 0.0025])
    assert report.best_epoch == 4 and report.epochs_run == 6


def test_a_constant_rate_by_default(tmp_path, tiny_data, monkeypatch):
    dataset, split = tiny_data
    monkeypatch.setattr(Trainer, "validate", ScriptedValidation(SCRIPT[:4]))
    config = parse_config(tiny_config(epochs=4, lr=0.01))
    report = Trainer(build_model(config.model, dataset, "p2"), dataset, split, config, tmp_path).fit()
    assert [h["lr"] for h in report.history] == [0.01] * 4


def test_resume_continues_the_schedule(tmp_path, tiny_data, monkeypatch):
    dataset, split = tiny_data
    full_cfg = parse_config(tiny_config(epochs=6, **DECAY))
    (tmp_path / "full").mkdir()
    monkeypatch.setattr(Trainer, "validate", ScriptedValidation(SCRIPT))
    torch.manual_seed(0)
    full = Trainer(build_model(full_cfg.model, dataset, "p2"), dataset, split, full_cfg, tmp_path / "full").fit()
    (tmp_path / "resumed").mkdir()
    monkeypatch.setattr(Trainer, "validate", ScriptedValidation(SCRIPT[:4]))
    torch.manual_seed(0)
    model = build_model(full_cfg.model, dataset, "p2")
    Trainer(model, dataset, split, parse_config(tiny_config(epochs=4, **DECAY)), tmp_path / "resumed").fit()
    monkeypatch.setattr(Trainer, "validate", ScriptedValidation(SCRIPT[4:]))
    report = Trainer(model, dataset, split, full_cfg, tmp_path / "resumed").fit(resume=True)
    assert report.resumed_from_epoch == 4
    assert [h["lr"] for h in report.history] == [h["lr"] for h in full.history]
    assert [h["loss"] for h in report.history] == pytest.approx([h["loss"] for h in full.history])


def test_a_checkpoint_from_before_the_schedule_resumes_under_its_default(tmp_path, tiny_data):
    dataset, split = tiny_data
    model = build_model(parse_config(tiny_config()).model, dataset, "p2")
    Trainer(model, dataset, split, parse_config(tiny_config(epochs=1)), tmp_path).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("lr_decay", "lr_patience"):  # what a checkpoint of an older crosstower holds
        del state["config"]["train"][key]
    del state["scheduler"]
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    report = Trainer(model, dataset, split, parse_config(tiny_config(epochs=2)), tmp_path).fit(resume=True)
    assert report.resumed_from_epoch == 1 and report.epochs_run == 2


def test_patience_that_stops_before_the_rate_can_fall_is_a_config_error():
    with pytest.raises(ConfigError, match="train: .*patience 2 stops the run before the learning rate can fall"):
        parse_config(tiny_config(lr_decay=0.5, lr_patience=1, patience=2))
    parse_config(tiny_config(lr_decay=0.5, lr_patience=1, patience=3))


def test_the_moving_average_is_what_is_validated_selected_and_saved(tmp_path, tiny_data):
    dataset, split = tiny_data
    config = parse_config(tiny_config(epochs=1, ema_decay=0.9, lr=0.01))
    model = build_model(config.model, dataset, "p2")
    report = Trainer(model, dataset, split, config, tmp_path).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    averaged, live = state["average"], state["model"]
    assert report.best_epoch == 0 and averaged is not None
    assert any(not torch.equal(live[name], value) for name, value in averaged.items())
    for name, value in model.state_dict().items():  # the trained model holds the average, buffers live
        assert torch.equal(value, averaged.get(name, live[name])), name
    # Validation scored the average: re-scoring the kept model gives the recorded value.
    rescored = Trainer(model, dataset, split, config, tmp_path).validate()["recall@50"]
    assert rescored == pytest.approx(report.history[0]["val_recall@50"])


def test_the_average_starts_after_the_warm_up(tmp_path, tiny_data):
    dataset, split = tiny_data
    config = parse_config(tiny_config(epochs=1, ema_decay=0.9))
    model = build_model(config.model, dataset, "p2")
    model.warmup_epochs = 1  # as SparCode's unquantised epochs
    Trainer(model, dataset, split, config, tmp_path).fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["average"] is None
    Trainer(model, dataset, split, parse_config(tiny_config(epochs=2, ema_decay=0.9)), tmp_path).fit(resume=True)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["average"] is not None


def test_resume_continues_the_moving_average_exactly(tmp_path, tiny_data):
    dataset, split = tiny_data
    full_cfg = parse_config(tiny_config(epochs=3, ema_decay=0.9))
    torch.manual_seed(0)
    full_model = build_model(full_cfg.model, dataset, "p2")
    (tmp_path / "full").mkdir()
    full = Trainer(full_model, dataset, split, full_cfg, tmp_path / "full").fit()
    torch.manual_seed(0)
    model = build_model(full_cfg.model, dataset, "p2")
    (tmp_path / "resumed").mkdir()
    Trainer(model, dataset, split, parse_config(tiny_config(epochs=1, ema_decay=0.9)), tmp_path / "resumed").fit()
    report = Trainer(model, dataset, split, full_cfg, tmp_path / "resumed").fit(resume=True)
    assert report.resumed_from_epoch == 1
    assert [h["val_recall@50"] for h in report.history] == [h["val_recall@50"] for h in full.history]
    for name, value in model.state_dict().items():
        assert torch.equal(value, full_model.state_dict()[name]), name


def test_the_average_is_off_by_default_and_its_decay_is_validated(tmp_path, tiny_data):
    dataset, split = tiny_data
    config = parse_config(tiny_config(epochs=1))
    Trainer(build_model(config.model, dataset, "p2"), dataset, split, config, tmp_path).fit()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["average"] is None
    with pytest.raises(ConfigError, match="ema_decay"):
        parse_config(tiny_config(ema_decay=1.0))


def test_a_killed_run_survives_a_refused_resume_and_resumes_to_the_uninterrupted_metrics(tmp_path):
    """Kill a training process (SIGKILL, after its first checkpoint), have a ``--resume`` with a
    changed config refused, then resume with the right one: the checkpoint survived the refusal,
    and the resumed run's metrics equal an uninterrupted run's."""
    import subprocess
    import sys
    import time

    import yaml

    raw = tiny_config(epochs=6)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    checkpoint = tmp_path / ".run.partial" / "checkpoint.pt"
    process = subprocess.Popen([sys.executable, "-m", "crosstower.cli", "run", str(config_file), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    assert checkpoint.exists() and not out.exists(), "the run was killed after its first checkpoint"
    saved = checkpoint.read_bytes()

    with pytest.raises(CheckpointError, match="different config"):
        run_experiment(parse_config(tiny_config(epochs=6, lr=0.01)), out, resume=True)
    assert checkpoint.read_bytes() == saved  # refused, and not deleted

    resumed = run_experiment(parse_config(raw), out, resume=True)
    whole = run_experiment(parse_config(raw), tmp_path / "whole")
    assert resumed["timing"]["resumed_from_epoch"] >= 1 and resumed["timing"]["epochs"] == 6
    assert resumed["metrics"] == whole["metrics"]
    assert not checkpoint.parent.exists()  # finished: the partial folder became the run


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_experiment(parse_config(tiny_config()), tmp_path / "run", resume=True)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_an_epoch_logs_its_progress_where_no_progress_bar_shows(tmp_path, tiny_data, caplog, monkeypatch):
    from crosstower.train import trainer

    monkeypatch.setattr(trainer, "PROGRESS_LOG_SECONDS", 0.0)
    dataset, split = tiny_data
    config = parse_config(tiny_config(epochs=1, batch_size=64))
    with caplog.at_level("INFO", logger="crosstower.train"):
        Trainer(build_model(config.model, dataset, "p2"), dataset, split, config, tmp_path).fit()
    steps = [line for line in caplog.text.splitlines() if "epoch 0: " in line and " batches, loss " in line]
    assert steps and "epoch 0: 1/" in steps[0]


def test_max_users_ranks_a_saved_seeded_sample_of_validation_and_test_users(tmp_path):
    full = run_experiment(parse_config(tiny_config(epochs=1)), tmp_path / "full")
    raw = {**tiny_config(epochs=1), "evaluate": {"ks": [10, 50], "max_users": 25}}
    sampled = run_experiment(parse_config(raw), tmp_path / "sampled")
    for part in ("val", "test"):
        assert sampled["metrics"][part]["num_users"] == 25 < full["metrics"][part]["num_users"]
    assert reevaluate(tmp_path / "sampled") == {p: sampled["metrics"][p] for p in ("val", "test", "test_served")}
    again = run_experiment(parse_config(raw), tmp_path / "again")
    assert again["metrics"]["test"] == sampled["metrics"]["test"]
    with pytest.raises(ConfigError, match="evaluate.max_users: protocol p4"):
        parse_config({**raw, "split": {"protocol": "p4"}, "evaluate": {"max_users": 5}})


@pytest.mark.parametrize("in_batch", [False, True])
def test_dense_and_gathered_candidate_logits_agree(tmp_path, tiny_data, monkeypatch, in_batch):
    """The two ways an inner-product model scores a batch's candidates (one matrix product over
    the distinct items, ``train.candidate_scoring: auto``; or gathered item vectors, the default)
    give the same logits and the same gradients."""
    import dataclasses

    import crosstower.models.base as base
    from crosstower.losses import listwise_softmax

    dataset, split = tiny_data
    config = parse_config(tiny_config("dssm", negatives={"num": 20, "in_batch": in_batch}, candidate_scoring="auto"))
    model = build_model(config.model, dataset, "p2")
    batch = Trainer(model, dataset, split, config, tmp_path).make_batch(np.arange(64), torch.Generator().manual_seed(0))
    assert batch.dense_scores and not parse_config(tiny_config()).train.candidate_scoring == "auto"
    monkeypatch.setattr(base, "DENSE_SCORE_RATIO", 10**9)  # dense for any number of distinct items
    results = []
    for dense in (True, False):
        model.zero_grad()
        logits = model.candidate_logits(dataclasses.replace(batch, dense_scores=dense))
        listwise_softmax(logits).backward()
        results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (dense, dense_grads), (gathered, gathered_grads) = results
    torch.testing.assert_close(dense.positive, gathered.positive)
    torch.testing.assert_close(dense.sampled, gathered.sampled)
    if in_batch:
        torch.testing.assert_close(dense.in_batch, gathered.in_batch)
    assert dense_grads.keys() == gathered_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(dense_grads[name], gathered_grads[name], rtol=1e-4, atol=1e-6)
