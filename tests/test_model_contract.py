"""The model contract, checked for every registered model (no list here: a new model's module is
picked up by its registration).

Each model is built from its default config on a tiny data set, trained one step (which also
sets data-dependent state: codebooks, BatchNorm statistics), and then, in eval mode:
- its ``loss`` is the pure listwise loss of its ``candidate_logits`` plus its extra terms, and
  those logits are its own ``score`` at the candidates (up to one positive scale: a training
  temperature);
- ``score`` on the diagonal equals ``score_pairs``;
- its index (where it has one) serves the top-k of exhaustive scoring: the same items for an
  exact index, at least ``APPROXIMATE_RECALL`` of them for an approximate one;
- saving and loading the weights (and the index) gives the same scores (and answers).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from crosstower.config import model_names, parse_config
from crosstower.data.batching import UserInput
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.evaluate.ranking import topk_items
from crosstower.index import Index
from crosstower.index.base import no_exclusions
from crosstower.losses import listwise_softmax
from crosstower.models import build_model
from crosstower.run_dir import training_users
from crosstower.train.trainer import Trainer
from tests.helpers import random_dataset

HISTORY = 10
K = 10
APPROXIMATE_RECALL = 0.9  # what the approximate (late-interaction) index must keep of the exact top-k


@pytest.fixture(scope="module")
def data():
    dataset = random_dataset(num_users=40, num_items=60, rows=900)
    return dataset, make_split(dataset, "p1")


def config_of(name: str):
    """The model's default config, with in-batch negatives and log-Q where the model takes them."""
    def parsed(negatives: dict):
        return parse_config({"model": {"name": name}, "split": {"protocol": "p1"}, "train": {
            "batch_size": 16, "history_length": HISTORY, "threads": 1, "negatives": negatives}})
    try:
        return parsed({"num": 5, "in_batch": True, "logq": True})
    except ConfigError as error:
        assert "train.negatives" in str(error)  # a model that trains on sampled negatives only
        return parsed({"num": 5})


def trained_one_step(name: str, data, tmp_path):
    """The model of ``name``'s default config, after one training step, in eval mode, with a
    batch of training candidates."""
    dataset, split = data
    config = config_of(name)
    torch.manual_seed(0)
    model = build_model(config.model, dataset, "p1", HISTORY)
    trainer = Trainer(model, dataset, split, config, tmp_path)
    rows = np.linspace(0, len(trainer.examples) - 1, 16).astype(np.int64)  # spread over users
    batch = trainer.make_batch(rows, torch.Generator().manual_seed(0))
    if model.trainable:
        model.begin_epoch(0, trainer.examples)  # as the trainer does before every epoch
        model.train()
        loss, _ = model.loss(batch)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=1e-3).step()
    else:
        model.fit(split.train["item"].to_numpy())
    return model.eval(), config, batch


def proportional(logits: torch.Tensor, scores: torch.Tensor) -> bool:
    """Whether ``logits == scores / t`` for one ``t > 0`` (fitted), within float tolerance."""
    if not logits.abs().any():
        return not scores.abs().any()
    scale = float((logits * scores).sum() / (logits * logits).sum())
    return scale > 0 and torch.allclose(logits * scale, scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", model_names())
def test_loss_is_the_pure_loss_of_candidate_logits_which_are_the_scores(name, data, tmp_path):
    model, _, batch = trained_one_step(name, data, tmp_path)
    if not model.trainable:
        with pytest.raises(NotImplementedError):
            model.candidate_logits(batch)
        return
    with torch.no_grad():
        loss, parts = model.loss(batch)
        logits = model.candidate_logits(batch)
        expected = listwise_softmax(logits)
        for value, weight in model.extra_losses(batch, logits).values():
            expected = expected + weight * value
        scores = model.score(batch.user, torch.arange(model.num_items))
    if model.own_loss:  # its own objective (Airbnb's skip-gram): a finite sum of its named parts
        assert math.isfinite(float(loss)) and float(loss) == pytest.approx(sum(parts.values()), rel=1e-5)
    else:
        assert float(loss) == pytest.approx(float(expected), rel=1e-6) and parts["softmax"] > 0
    rows = torch.arange(len(batch.positives))
    at_candidates = torch.cat([scores[rows, batch.positives][:, None], scores.gather(1, batch.negatives)], dim=1)
    assert proportional(torch.cat([logits.positive[:, None], logits.sampled], dim=1), at_candidates)
    if batch.in_batch_mask is not None:
        assert logits.in_batch is not None and proportional(logits.in_batch, scores[:, batch.positives])
    with torch.no_grad():
        states = model.candidate_logits(batch, with_states=True).states
    assert states, "with_states returns the states a teacher can expose"


@pytest.mark.parametrize("name", model_names())
def test_score_on_the_diagonal_is_score_pairs(name, data, tmp_path):
    model, _, batch = trained_one_step(name, data, tmp_path)
    with torch.no_grad():
        full = model.score(batch.user, batch.positives)
        pairs = model.score_pairs(batch.user, batch.positives)
    assert torch.allclose(torch.diagonal(full), pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", model_names())
def test_index_serves_the_exhaustive_top_k(name, data, tmp_path):
    dataset, split = data
    model, config, _ = trained_one_step(name, data, tmp_path)
    users = training_users(dataset, split, config)
    index = model.build_index(users)
    if index is None:
        with pytest.raises(NotImplementedError):
            model.index_query(users)
        return
    with torch.no_grad():
        scorer = model.ranking_scorer(lambda rows: users_at(users, rows), len(users))
        exact = topk_items(scorer, len(users), dataset.num_items, no_exclusions(len(users)), K)[1]
        served = index.search(model.index_query(users), K)[1]
    if index.exact:
        assert torch.equal(served, exact)
    else:
        overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(served, exact)])
        assert overlap >= APPROXIMATE_RECALL
    index.save(tmp_path / "index")
    loaded = Index.load(tmp_path / "index")
    assert torch.equal(loaded.search(model.index_query(users), K)[1], served)


@pytest.mark.parametrize("name", model_names())
def test_saved_and_loaded_weights_give_the_same_scores(name, data, tmp_path):
    dataset, _ = data
    model, config, batch = trained_one_step(name, data, tmp_path)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(1)  # another initialisation, which the loaded weights must replace
    loaded = build_model(config.model, dataset, "p1", HISTORY)
    buffer.seek(0)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    items = torch.arange(dataset.num_items)
    with torch.no_grad():
        assert torch.equal(loaded.eval().score(batch.user, items), model.score(batch.user, items))


def users_at(users: UserInput, rows: np.ndarray) -> UserInput:
    index = torch.from_numpy(rows)
    return UserInput(users.users[index], users.history[index])
