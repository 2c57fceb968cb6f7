"""Airbnb-style embeddings: sessions, market negatives, the served score against its formula, and a
run end to end (the model contract tests cover scoring, the index and saving)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from crosstower.config import parse_config
from crosstower.data.batching import TrainExamples, UserInput
from crosstower.errors import ConfigError
from crosstower.models import build_model
from crosstower.run import run_experiment
from tests.helpers import random_dataset

DAY = 86_400


def model_and_examples(frame: pd.DataFrame, **keys):
    dataset = random_dataset(num_users=3, num_items=20, rows=200)
    config = parse_config({"model": {"name": "airbnb", "dim": 8, **keys}, "split": {"protocol": "p1"},
                           "train": {"history_length": 10, "negatives": {"num": 4}}})
    model = build_model(config.model, dataset, "p1", 10)
    examples = TrainExamples(frame, 10, dataset.num_users)
    model.begin_epoch(0, examples)
    return model, examples


def test_sessions_split_at_the_gap_and_at_each_new_user():
    frame = pd.DataFrame({"user": [0, 0, 0, 0, 1, 1], "item": [1, 2, 3, 4, 5, 6],
                          "timestamp": [0, 100, 2 * DAY, 2 * DAY + 5, 2 * DAY + 6, 2 * DAY + 7]})
    model, _ = model_and_examples(frame)
    assert model.session.tolist() == [0, 0, 1, 1, 2, 2]
    assert model.session_last.tolist() == [2, 2, 4, 4, 6, 6]  # each session's last item: its global context
    one_session, _ = model_and_examples(frame, session_gap=None)
    assert one_session.session.tolist() == [0, 0, 0, 0, 1, 1]


def test_market_negatives_come_from_the_centre_items_market():
    frame = pd.DataFrame({"user": [0, 0], "item": [1, 2], "timestamp": [0, 1]})
    model, _ = model_and_examples(frame, market_negatives=7)
    items = torch.arange(20)
    drawn = model._market_sample(items)
    assert drawn.shape == (20, 7)
    assert torch.equal(model.market[drawn], model.market[items][:, None].expand(-1, 7))


@pytest.mark.parametrize("similarity", ["cosine", "context"])
def test_the_served_inner_product_is_the_item_similarity_plus_weighted_type_cosine(similarity):
    frame = pd.DataFrame({"user": [0, 0, 0], "item": [1, 2, 3], "timestamp": [0, 1, 2]})
    model, _ = model_and_examples(frame, recent=2, type_weight=0.3, similarity=similarity)
    torch.nn.init.normal_(model.item_out.weight)  # not the zeros of a fresh model
    user = UserInput(torch.tensor([1]), torch.tensor([[-1] * 6 + [4, 7, 9, 11]]), torch.zeros(1))
    recent = model.item_in(torch.tensor([9, 11]))  # the 2 most recent items
    with torch.no_grad():
        served = model.encode_users(user) @ model.encode_items(torch.tensor([5])).T
        types = F.cosine_similarity(model.types(model.user_types(user)), model.types(model.item_types(torch.tensor([5]))))
        candidate, mean = model.item_in(torch.tensor([5])), recent.mean(0, keepdim=True)
        if similarity == "cosine":
            items = F.cosine_similarity(candidate, mean)
        else:
            items = model.item_out(torch.tensor([5])) @ mean.T
        expected = items + 0.3 * types
    assert float(served) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("gap, pairs", [(1e-9, False), (None, True)])
def test_no_window_context_crosses_a_session(gap, pairs):
    """With a gap shorter than any step every interaction is its own session: no window pairs
    (with one session per user, there are)."""
    dataset = random_dataset()
    raw = {"model": {"name": "airbnb", "dim": 8, "session_gap": gap, "global_context": False},
           "split": {"protocol": "p1"}, "train": {"epochs": 1, "batch_size": 64, "history_length": 10, "threads": 1,
                                                  "negatives": {"num": 4}}}
    from crosstower.data.splits import make_split
    from crosstower.train.trainer import Trainer

    config = parse_config(raw)
    model = build_model(config.model, dataset, "p1", 10)
    trainer = Trainer(model, dataset, make_split(dataset, "p1"), config, None)
    model.begin_epoch(0, trainer.examples)
    batch = trainer.make_batch(np.arange(64), torch.Generator().manual_seed(0))
    with torch.no_grad():
        window = float(model._window_term(batch, model.item_in(batch.positives)))
    assert (window > 0) == pairs


def test_in_batch_negatives_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="train.negatives: airbnb"):
        parse_config({"model": {"name": "airbnb"}, "train": {"negatives": {"in_batch": True}}})


def test_a_run_trains_and_serves_exactly_like_the_exhaustive_ranking(tmp_path):
    raw = {"dataset": {"name": "synthetic", "options": {"num_users": 300, "num_items": 150, "seed": 3}},
           "split": {"protocol": "p2"}, "model": {"name": "airbnb", "dim": 16},
           "train": {"epochs": 2, "batch_size": 128, "threads": 1, "history_length": 10, "negatives": {"num": 5}},
           "evaluate": {"ks": [10, 50]}}
    results = run_experiment(parse_config(raw), tmp_path / "run")
    epochs = results["training_history"]
    assert all(np.isfinite(e["loss"]) for e in epochs) and epochs[-1]["loss"] < epochs[0]["loss"]
    assert {"loss_context", "loss_global", "loss_market", "loss_negative", "loss_types"} <= set(epochs[0])
    assert results["metrics"]["test_served"]["recall@50"] == results["metrics"]["test"]["recall@50"]
    # the user side (recent items, activity bucket, type hash) exports to ONNX unchanged
    import onnxruntime

    import crosstower
    from crosstower.export import export_run

    retriever = crosstower.load_run(tmp_path / "run")
    out = export_run(retriever, tmp_path / "onnx")
    histories = np.load(out / "user_histories.npy")
    users = np.arange(20)
    got = onnxruntime.InferenceSession(str(out / "user_tower.onnx")).run(
        None, {"users": users, "history": histories[users]})[0]
    with torch.no_grad():
        expected = retriever.model.encode_users(UserInput(torch.from_numpy(users), torch.from_numpy(histories[users]),
                                                          torch.zeros(20))).numpy()
    assert np.abs(got - expected).max() <= 1e-5
