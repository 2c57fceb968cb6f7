"""MVKE: the served inner product against the paper's mixture, the batched attention and gate
against per-pair loops, padding, training, config and serving through the exact index."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crosstower.config import parse_config
from crosstower.data.batching import UserInput, eval_user_input
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.evaluate.ranking import topk_items
from crosstower.index import ExactInnerProductIndex
from crosstower.models import build_model
from crosstower.models.mvke import MVKE, MVKEConfig
from crosstower.train.trainer import Trainer
from tests.helpers import random_dataset

torch.set_num_threads(1)

DIM, KERNELS = 8, 3


def small_model(dataset, seed: int = 0, sharpen: bool = True, **overrides) -> MVKE:
    """A small MVKE; ``sharpen`` re-draws the kernels, the Q/K/V maps and the field embeddings at
    unit scale, so that the field attention and the item gate are far from uniform and differ
    between users and items (at the released N(0, 0.01) initialisation both softmaxes start
    almost flat), and the tests exercise them."""
    torch.manual_seed(seed)
    settings = MVKEConfig(**{"kernels": KERNELS, "dim": DIM, "expert_hidden": [16], "item_hidden": [16], **overrides})
    model = MVKE(dataset, settings).eval()
    if sharpen:
        with torch.no_grad():
            model.attention.kernels.normal_(std=1.0)
            model.attention.query.weight.normal_(std=1.0)
            model.attention.key.weight.normal_(std=1.0)
            model.attention.value.weight.normal_(std=0.5)
            for embedder in (model.user_fields, model.item_fields):
                for table in embedder.embeddings.values():
                    table.weight[1:].normal_(std=1.0)
    return model


def eval_users(dataset, length: int = 10):
    split = make_split(dataset, "p2")
    return split, eval_user_input(split.test, np.arange(len(split.test)), length)


def test_factorised_score_equals_the_mixture_score():
    ds = random_dataset(num_users=30, num_items=25, rows=500)
    model = small_model(ds)
    _, user = eval_users(ds)
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        served = model.score(user, items)
        mixture = model.mixture_score(user, items)
        ranged = model.item_scorer()(user, 4, 19)
        beta = model.gate(model.item_vector(items))
    assert served.shape == (len(user), ds.num_items) and model.encode_users(user).shape[1] == KERNELS * DIM
    assert torch.allclose(served, mixture, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ranged, served[:, 4:19], atol=1e-6)
    # the gate really mixes: it is neither uniform nor the same for every item
    assert (beta.max(1).values - beta.min(1).values).mean() > 0.1
    assert beta.std(0).max() > 0.05


def reference_user_tokens(model: MVKE, user: UserInput, row: int) -> torch.Tensor:
    """User ``row``'s tokens one at a time: each field's embedding, then the mean over its real
    history items of the sum of their item-field embeddings."""
    tokens = [model.user_fields(user.users[row : row + 1])[0, f] for f in range(model.user_fields.num_fields)]
    history = [int(i) for i in user.history[row] if i >= 0]
    mean = torch.zeros(DIM)
    for item in history:
        mean = mean + model.item_fields(torch.tensor([item]))[0].sum(0) / len(history)
    return torch.stack([*tokens, mean])


def test_field_softmax_kernel_gate_and_experts_match_a_per_pair_loop():
    ds = random_dataset(num_users=30, num_items=25, rows=500)
    model = small_model(ds)
    att = model.attention
    _, user = eval_users(ds)
    items = torch.arange(6)
    with torch.no_grad():
        tokens = model.user_tokens(user)
        alpha, hidden, experts = att.weights(tokens), att(tokens), model.expert_vectors(user)
        t, beta = model.item_vector(items), model.gate(model.item_vector(items))
        for row in (0, len(user) - 1):
            e = reference_user_tokens(model, user, row)
            assert torch.allclose(tokens[row], e, atol=1e-6)
            for k in range(KERNELS):
                q = att.query.weight @ att.kernels[k] + att.query.bias
                logits = [float((att.key.weight @ e[f] + att.key.bias) @ q) / math.sqrt(DIM) for f in range(len(e))]
                total = sum(math.exp(x) for x in logits)
                h = []
                for f, x in enumerate(logits):
                    a = math.exp(x) / total
                    assert alpha[row, f, k].item() == pytest.approx(a, abs=1e-5)
                    v = att.value.weight @ e[f] + att.value.bias
                    h.append(F.layer_norm(a * v + e[f], (DIM,), att.norm.weight, att.norm.bias, att.norm.eps))
                    assert torch.allclose(hidden[row, f, k], h[-1], atol=1e-5)
                assert torch.allclose(experts[row, k], model.experts[k](torch.cat(h)), atol=1e-5)
        for n in range(len(items)):
            gate_logits = [float(t[n] @ att.kernels[k]) for k in range(KERNELS)]
            total = sum(math.exp(x) for x in gate_logits)
            for k, x in enumerate(gate_logits):
                assert beta[n, k].item() == pytest.approx(math.exp(x) / total, abs=1e-5)
    # the attention is far from flat (1/3 each) and each kernel's weights sum to one over fields
    assert alpha.max() > 0.9 and torch.allclose(alpha.sum(1), torch.ones(len(user), KERNELS))


def test_padding_and_empty_history():
    ds = random_dataset(num_users=30, num_items=25, rows=500)
    model = small_model(ds)
    users = torch.tensor([3, 5])
    history = torch.tensor([[-1, -1, -1, -1, 7, 2], [-1, -1, -1, -1, -1, -1]])  # left-padded; empty
    with torch.no_grad():
        padded = model.encode_users(UserInput(users[:1], history[:1]))
        short = model.encode_users(UserInput(users[:1], history[:1, -2:]))
        empty = model.encode_users(UserInput(users[1:], history[1:]))
        no_columns = model.encode_users(UserInput(users[1:], history[1:, :0]))
        tokens = model.user_tokens(UserInput(users[1:], history[1:]))
        scores = model.score(UserInput(users, history), torch.arange(ds.num_items))
    assert torch.allclose(padded, short, atol=1e-6)
    assert torch.isfinite(empty).all() and torch.allclose(empty, no_columns, atol=1e-6)
    assert torch.equal(tokens[0, -1], torch.zeros(DIM))  # the empty history's token is zero
    assert torch.isfinite(scores).all() and not torch.allclose(padded, empty)


def test_short_training_lowers_the_loss(tmp_path):
    """60 Adam steps on the tiny synthetic set take the sampled softmax (20 negatives) well
    below its starting value, ln 21, on a fixed probe batch of training examples."""
    from crosstower.data.loaders import load_dataset
    from tests.test_training import TINY

    ds = load_dataset("synthetic", None, TINY)
    split = make_split(ds, "p2")
    config = parse_config({"model": {"name": "mvke"}, "train": {"batch_size": 64, "history_length": 10,
                                                                "negatives": {"num": 20}}})
    trainer = Trainer(None, ds, split, config, tmp_path)
    generator, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    num_examples = len(trainer.examples.items)
    probe = trainer.make_batch(np.arange(0, num_examples, num_examples // 256)[:256], generator)
    model = small_model(ds, sharpen=False).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(model.loss(probe)[0])
    for _ in range(60):
        optimizer.zero_grad()
        loss, parts = model.loss(trainer.make_batch(rng.choice(num_examples, 64, replace=False), generator))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(model.loss(probe)[0])
    assert set(parts) == {"softmax"} and model.attention.kernels.grad is not None
    assert model.experts[0][0].weight.grad.abs().sum() > 0
    assert after < before - 0.2, (before, after)


def test_builds_from_a_config_and_validates_it():
    ds = random_dataset(num_users=30, num_items=25, rows=500)
    config = parse_config({"model": {"name": "mvke", "kernels": 2, "dim": 4, "expert_hidden": [], "item_hidden": [8]}})
    model = build_model(config.model, ds, "p2")
    assert isinstance(model, MVKE) and len(model.experts) == 2
    assert "user_id" not in model.user_fields.names and model.use_history
    _, user = eval_users(ds)
    assert model.encode_users(user).shape == (len(user), 8) and model.encode_items(torch.arange(3)).shape == (3, 8)
    assert "user_id" in build_model(config.model, ds, "p1").user_fields.names
    assert not build_model(config.model, ds, "p3").use_history
    with pytest.raises(ConfigError, match=r"model\.experts: unknown key"):
        parse_config({"model": {"name": "mvke", "experts": 3}})
    with pytest.raises(ConfigError, match=r"model\.kernels"):
        parse_config({"model": {"name": "mvke", "kernels": 0}})
    with pytest.raises(ConfigError, match="user_id"):
        build_model(parse_config({"model": {"name": "mvke", "user_fields": ["user_id"]}}).model, ds, "p2")
    with pytest.raises(ConfigError, match="no field"):
        build_model(parse_config({"model": {"name": "mvke", "user_fields": []}}).model, ds, "p3")


def test_exact_index_serves_the_exhaustive_top_k():
    ds = random_dataset(num_users=30, num_items=25, rows=500)
    model = small_model(ds, seed=1)
    split, user = eval_users(ds)
    with torch.no_grad():
        index = ExactInnerProductIndex(model.item_vectors())
        served = index.search(model.encode_users(user), 10, split.test.exclude, user_batch=3, item_chunk=7)
        mixture = model.mixture_score(user, torch.arange(ds.num_items))
    expected = topk_items(lambda rows, lo, hi: mixture[torch.from_numpy(rows), lo:hi], len(user), ds.num_items,
                          split.test.exclude, 10)
    assert torch.equal(served[1], expected[1])
    assert torch.allclose(served[0], expected[0], atol=1e-5)


def test_run_trains_and_reports_the_exact_index(tmp_path):
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "mvke", "kernels": 2, "dim": 8, "expert_hidden": [16], "item_hidden": [16]},
        "train": {"epochs": 1, "threads": 1, "batch_size": 256, "history_length": 10, "negatives": {"num": 10}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert results["model"] == "mvke" and results["metrics"]["test"]["recall@50"] > 0
    assert results["index"]["kind"] == "exact_inner_product" and results["index"]["dim"] == 16
