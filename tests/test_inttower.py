"""IntTower: Light-SE by hand, the FE-Block score against a per-pair loop, CIR against a hand
InfoNCE, both losses against the model's own scores, BatchNorm edge cases, config and a run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crosstower.config import parse_config
from crosstower.data.batching import PointwiseBatch, UserInput, eval_user_input
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.losses import sampled_softmax
from crosstower.models import build_model
from crosstower.losses import info_nce
from crosstower.models.inttower import IntTower, IntTowerConfig, LightSE
from crosstower.train.trainer import Trainer
from tests.helpers import random_dataset

torch.set_num_threads(1)

DIM, HU, HI, DH, HISTORY = 6, 3, 2, 5, 6


@pytest.fixture(scope="module")
def data():
    ds = random_dataset(num_users=30, num_items=25, rows=500)
    split = make_split(ds, "p2")
    user = eval_user_input(split.test, np.arange(len(split.test)), HISTORY)
    return ds, split, user


def small_model(ds, seed: int = 0, **overrides) -> IntTower:
    """A small IntTower in eval mode, with unit-scale embeddings and random BatchNorm running
    statistics and affine maps, so that eval-mode BatchNorm is not the identity and the field
    attention is far from uniform."""
    torch.manual_seed(seed)
    settings = IntTowerConfig(**{
        "embedding_dim": DIM, "user_hidden": [12, 10, 7], "item_hidden": [9, 8], "heads_user": HU,
        "heads_item": HI, "head_dim": DH, "dropout": 0.2, **overrides,
    })
    model = IntTower(ds, settings).eval()
    with torch.no_grad():
        for embedder in (model.user_fields, model.item_fields):
            if embedder is not None:
                for table in embedder.embeddings.values():
                    if isinstance(table, torch.nn.Embedding):
                        table.weight[1:].normal_(std=1.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(std=0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.2)
        for se in (model.user_se, model.item_se):
            if se is not None:
                se.weight.weight.normal_(std=3.0)
        model.bias.fill_(0.7)
    return model


# ---------------------------------------------------------------------------------- Light-SE


def test_light_se_matches_a_hand_computation():
    torch.manual_seed(0)
    num_fields, dim = 4, 3
    se = LightSE(num_fields)
    with torch.no_grad():
        se.weight.weight.normal_(std=2.0)
    tokens = torch.randn(2, num_fields, dim)
    out = se(tokens)
    w = se.weight.weight.tolist()
    for b in range(2):
        z = [sum(tokens[b, f].tolist()) / dim for f in range(num_fields)]
        logits = [sum(w[g][f] * z[f] for f in range(num_fields)) for g in range(num_fields)]
        total = sum(math.exp(x) for x in logits)
        for f in range(num_fields):
            a = math.exp(logits[f]) / total
            for k in range(dim):
                assert out[b, f, k].item() == pytest.approx(tokens[b, f, k].item() * (1 + a), abs=1e-5)
    assert se.weight.bias is None
    assert not torch.allclose(se.attention(tokens)[0], torch.full((num_fields,), 1 / num_fields), atol=0.05)


# ---------------------------------------------------------------------------------- scores


def reference_layer_heads(model: IntTower, user: UserInput, row: int) -> list[torch.Tensor]:
    """User ``row``'s FE heads one at a time: Light-SE over its tokens (each field, then the mean
    of its history items' summed field embeddings), then layer by layer, each head on the layer's
    input."""
    tokens = [model.user_fields(user.users[row : row + 1])[0, f] for f in range(model.user_fields.num_fields)]
    history = [int(i) for i in user.history[row] if i >= 0]
    mean = torch.zeros(DIM)
    for item in history:
        mean = mean + model.item_fields(torch.tensor([item]))[0].sum(0) / len(history)
    hidden = model.user_se(torch.stack([*tokens, mean])[None]).flatten(1)
    heads = []
    for l, head in enumerate(model.user_heads):
        heads.append(head(hidden)[0].view(HU, DH))
        if l < len(model.user_layers):
            hidden = model.user_layers[l](hidden)
    return heads


def reference_scores(model: IntTower, user: UserInput, items: torch.Tensor) -> torch.Tensor:
    """Sum over user layers and heads of the max over item heads of the dot product, per pair."""
    item_heads = [model.encode_item_heads(items[n : n + 1])[0] for n in range(len(items))]
    scores = torch.zeros(len(user), len(items))
    for u in range(len(user)):
        layers = reference_layer_heads(model, user, u)
        for n, p_item in enumerate(item_heads):
            total = 0.0
            for p_user in layers:
                for a in range(HU):
                    total += max(float(p_user[a] @ p_item[b]) for b in range(HI))
            prior = 0.0 if model.item_prior is None else float(model.item_prior.weight[items[n], 0])
            scores[u, n] = total + float(model.bias) + prior
    return scores


@pytest.mark.parametrize("item_bias", [False, True])
def test_fe_score_equals_a_per_pair_loop(data, item_bias):
    ds, _, user = data
    model = small_model(ds, item_bias=item_bias)
    if item_bias:
        with torch.no_grad():
            model.item_prior.weight.normal_()
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        heads = model.user_layer_heads(user)
        batched = model.score(user, items)
        reference = reference_scores(model, user, items)
        pair_items = torch.randint(0, ds.num_items, (len(user),), generator=torch.Generator().manual_seed(1))
        pairs = model.score_pairs(user, pair_items)
        scorer = model.item_scorer()
        ranged = [scorer(user, lo, hi) for lo, hi in ((0, 7), (7, 19), (19, ds.num_items))]
    assert model.num_user_layers == 3 and heads.shape == (len(user), 3, HU, DH)
    for row in (0, len(user) - 1):
        for got, expected in zip(heads[row], reference_layer_heads(model, user, row)):
            assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(batched, reference, atol=1e-4)
    assert torch.allclose(pairs, reference[torch.arange(len(user)), pair_items], atol=1e-4)
    assert torch.allclose(torch.cat(ranged, dim=1), reference, atol=1e-4)
    assert torch.allclose(scorer(user, 3, 3), torch.zeros(len(user), 0))
    if not item_bias:  # (the prior's draws change the seeded weights this check was sized for)
        # MaxSim is neither the sum over all head pairs nor the max over user heads
        user_heads, item_heads = heads.flatten(1, 2), model.catalogue_heads()
        all_pairs = torch.einsum("bad,nkd->bn", user_heads, item_heads) + model.bias
        assert not torch.allclose(batched, all_pairs, atol=1e-2)


def test_padding_empty_history_and_batchnorm_modes(data):
    ds, _, _ = data
    model = small_model(ds)
    users = torch.tensor([3, 5])
    history = torch.tensor([[-1, -1, -1, -1, 7, 2], [-1, -1, -1, -1, -1, -1]])  # left-padded; empty
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        padded = model.score(UserInput(users[:1], history[:1]), items)
        short = model.score(UserInput(users[:1], history[:1, -2:]), items)
        empty = model.score(UserInput(users[1:], history[1:]), items)
        no_columns = model.score(UserInput(users[1:], history[1:, :0]), items)
        tokens = model.user_tokens(UserInput(users[1:], history[1:]))
    assert torch.allclose(padded, short, atol=1e-5)
    assert torch.isfinite(empty).all() and torch.allclose(empty, no_columns, atol=1e-5)
    assert torch.equal(tokens[0, -1], torch.zeros(DIM))
    # training mode: batch statistics (scores differ from eval mode), and a one-row batch
    # (the last batch of an epoch) falls back to the running statistics instead of failing
    model.train()
    torch.manual_seed(0)
    one_row = model.score_pairs(UserInput(users[:1], history[:1]), items[:1])
    assert torch.isfinite(one_row).all()
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.train()
        train_scores = model.score(UserInput(users, history), items)
        model.eval()
        eval_scores = model.score(UserInput(users, history), items)
    assert not torch.allclose(train_scores, eval_scores, atol=1e-3)


# ---------------------------------------------------------------------------------- CIR and losses


def hand_info_nce(z_users, z_items, items, tau):
    """Per row: -log exp(cos_rr / tau) / sum over kept columns of exp(cos_rj / tau)."""
    rows = len(items)
    total = 0.0
    for r in range(rows):
        u = z_users[r].tolist()
        nu = math.sqrt(sum(x * x for x in u))
        logits = []
        for j in range(rows):
            if j != r and int(items[j]) == int(items[r]):
                continue
            v = z_items[j].tolist()
            cos = sum(a * b for a, b in zip(u, v)) / (nu * math.sqrt(sum(x * x for x in v)))
            logits.append((j, cos / tau))
        positive = next(x for j, x in logits if j == r)
        total += -(positive - math.log(sum(math.exp(x) for _, x in logits)))
    return total / rows


def test_cir_is_a_hand_computed_info_nce():
    torch.manual_seed(0)
    z_users, z_items = torch.randn(6, 4), torch.randn(6, 4)
    items = torch.tensor([3, 8, 3, 1, 9, 2])  # rows 0 and 2 share an item: not each other's negative
    got = info_nce(z_users, z_items, items, 0.5)
    assert float(got) == pytest.approx(hand_info_nce(z_users, z_items, items, 0.5), rel=1e-5)
    unmasked = F.cross_entropy(F.normalize(z_users, dim=-1) @ F.normalize(z_items, dim=-1).T / 0.5, torch.arange(6))
    assert not torch.isclose(got, unmasked)
    assert float(info_nce(z_users[:1], z_items[:1], items[:1], 0.07)) == 0.0


def pointwise_batch(ds, user, seed: int = 0) -> PointwiseBatch:
    generator = torch.Generator().manual_seed(seed)
    items = torch.randint(0, ds.num_items, (len(user),), generator=generator)
    labels = (torch.rand(len(user), generator=generator) < 0.5).float()
    labels[:3] = torch.tensor([1.0, 1.0, 0.0])
    return PointwiseBatch(user, items, labels)


@pytest.mark.parametrize("cir_weight", [0.0, 0.3])
def test_pointwise_loss_is_bce_of_score_pairs_plus_weighted_cir(data, cir_weight):
    ds, _, user = data
    model = small_model(ds, cir_weight=cir_weight, cir_temperature=0.2)
    batch = pointwise_batch(ds, user)
    loss, parts = model.pointwise_loss(batch)
    loss.backward()
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(model.score_pairs(batch.user, batch.items), batch.labels)
        positive = batch.labels > 0.5
        # z_u: the mean over heads of the last user FE layer; z_i: the mean over the item heads
        z_users = model.user_layer_heads(batch.user)[:, -1].mean(1)[positive]
        z_items = model.encode_item_heads(batch.items).mean(1)[positive]
        cir = hand_info_nce(z_users, z_items, batch.items[positive], 0.2)
    assert float(loss.detach()) == pytest.approx(float(bce) + cir_weight * cir, rel=1e-5)
    assert parts["bce"] == pytest.approx(float(bce), rel=1e-5)
    assert ("cir" in parts) == (cir_weight > 0) and cir > 0.1
    assert model.user_se.weight.weight.grad.abs().sum() > 0 and model.bias.grad is not None
    assert model.item_fields.embeddings["genre"].weight.grad.abs().sum() > 0


def train_batch(ds, split, tmp_path, in_batch: bool):
    config = parse_config({"model": {"name": "inttower"}, "train": {
        "batch_size": 8, "history_length": HISTORY, "negatives": {"num": 4, "in_batch": in_batch}}})
    trainer = Trainer(None, ds, split, config, tmp_path)
    # examples are sorted by user: spread the rows over users, so that in-batch columns are not
    # all the row user's own items (which the in-batch mask drops)
    rows = np.linspace(0, len(trainer.examples) - 1, 8).astype(np.int64)
    return trainer.make_batch(rows, torch.Generator().manual_seed(0))


def expected_loss(model, batch) -> torch.Tensor:
    """The sampled softmax of the model's own full scores at the batch's candidates."""
    with torch.no_grad():
        direct = model.score(batch.user, torch.arange(model.num_items))
    rows = torch.arange(len(batch.positives))
    in_batch = direct[:, batch.positives] if batch.in_batch_mask is not None else None
    negatives, mask, log_q = batch.logits(direct[rows, batch.positives], direct.gather(1, batch.negatives), in_batch).negatives()
    return sampled_softmax(direct[rows, batch.positives], negatives, mask, batch.positive_log_q, log_q)


@pytest.mark.parametrize("in_batch,cir_weight,item_bias", [(False, 0.0, False), (True, 0.0, True), (True, 0.5, False)])
def test_listwise_loss_is_sampled_softmax_of_its_scores(data, tmp_path, in_batch, cir_weight, item_bias):
    ds, split, _ = data
    batch = train_batch(ds, split, tmp_path, in_batch)
    model = small_model(ds, cir_weight=cir_weight, item_bias=item_bias)
    if item_bias:
        with torch.no_grad():
            model.item_prior.weight.normal_()
    if in_batch:
        assert not batch.in_batch_mask.all() and len(set(batch.user.users.tolist())) == 8
    loss, parts = model.loss(batch)  # eval mode: running statistics, no dropout
    loss.backward()
    expected = expected_loss(model, batch)
    assert parts["softmax"] == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        z_users = model.user_layer_heads(batch.user)[:, -1].mean(1)
        z_items = model.encode_item_heads(batch.positives).mean(1)
    cir = hand_info_nce(z_users, z_items, batch.positives, 0.07) if cir_weight else 0.0
    assert float(loss.detach()) == pytest.approx(float(expected) + cir_weight * cir, rel=1e-5)
    assert ("cir" in parts) == (cir_weight > 0)
    assert model.user_heads[0].weight.grad.abs().sum() > 0 and model.item_head.weight.grad.abs().sum() > 0
    if item_bias:
        assert model.item_prior.weight.grad[batch.positives].abs().sum() > 0


# ---------------------------------------------------------------------------------- config and run


def test_builds_from_a_config_and_validates_it(data):
    ds, _, user = data
    config = parse_config({"model": {"name": "inttower", "embedding_dim": 4, "user_hidden": [8, 6],
                                     "item_hidden": [8], "heads_user": 2, "heads_item": 3, "head_dim": 5}})
    model = build_model(config.model, ds, "p2")
    assert isinstance(model, IntTower) and model.num_user_layers == 2
    assert "user_id" not in model.user_fields.names and model.use_history
    assert model.config.dropout == 0.3 and model.config.cir_weight == 0.0
    assert model.eval().score(user, torch.arange(4)).shape == (len(user), 4)
    assert model.catalogue_heads().shape == (ds.num_items, 3, 5)
    assert "user_id" in build_model(config.model, ds, "p1").user_fields.names
    assert not build_model(config.model, ds, "p3").use_history
    with pytest.raises(ConfigError, match=r"model\.heads: unknown key"):
        parse_config({"model": {"name": "inttower", "heads": 3}})
    with pytest.raises(ConfigError, match=r"model\.head_dim"):
        parse_config({"model": {"name": "inttower", "head_dim": 0}})
    with pytest.raises(ConfigError, match=r"model\.user_hidden"):
        parse_config({"model": {"name": "inttower", "user_hidden": []}})
    with pytest.raises(ConfigError, match="user_id"):
        build_model(parse_config({"model": {"name": "inttower", "user_fields": ["user_id"]}}).model, ds, "p2")
    with pytest.raises(ConfigError, match="no field"):
        build_model(parse_config({"model": {"name": "inttower", "user_fields": []}}).model, ds, "p3")


def test_run_trains_and_ranks(tmp_path):
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "inttower", "embedding_dim": 8, "user_hidden": [32, 16], "item_hidden": [32, 16],
                  "heads_user": 2, "heads_item": 2, "head_dim": 8, "cir_weight": 0.1},
        "train": {"epochs": 1, "threads": 1, "batch_size": 256, "history_length": 10, "negatives": {"num": 10}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert results["model"] == "inttower" and results["metrics"]["test"]["recall@50"] > 0
    assert results["metrics"]["val"]["recall@50"] > 0 and results["index"]["kind"] == "exhaustive"
