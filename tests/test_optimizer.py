"""``train.sparse_embeddings``: embedding tables with sparse gradients stepped by lazy Adam, the
rest by Adam, checked against dense Adam and a per-row reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from crosstower.config import parse_config
from crosstower.errors import ConfigError, TrainingError
from crosstower.models import build_model
from crosstower.run import run_experiment
from crosstower.train.distributed import Ranks
from crosstower.train.optimizer import DenseAndSparseAdam, make_optimizer
from crosstower.train.trainer import Trainer
from tests.test_training import tiny_config, tiny_data  # noqa: F401 - the fixture

LR = 0.01


def _model_and_trainer(tiny_data, tmp_path, sparse: bool):  # noqa: F811
    dataset, split = tiny_data
    config = parse_config(tiny_config(lr=LR, sparse_embeddings=sparse))
    torch.manual_seed(0)
    model = build_model(config.model, dataset, "p2", config.train.history_length)
    return model, Trainer(model, dataset, split, config, tmp_path), config


def _step(model, trainer, optimizer, rows: np.ndarray, seed: int) -> None:
    model.train()
    batch = trainer.make_batch(rows, torch.Generator().manual_seed(seed))
    optimizer.zero_grad(set_to_none=True)
    model.loss(batch)[0].backward()  # (loss, named terms)
    optimizer.step()


def test_off_by_default_and_plain_adam():
    assert parse_config(tiny_config()).train.sparse_embeddings is False
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1))
    optimizer = make_optimizer(model, parse_config(tiny_config()).train)
    assert type(optimizer) is torch.optim.Adam and not model[0].sparse


def _lazy_adam_rows(optimizer: DenseAndSparseAdam, before: dict) -> None:
    """Per-row reference of lazy Adam (torch's SparseAdam): the rows a step's gradient names
    follow Adam with their own moments, eps added before the bias correction of the second
    moment (where SparseAdam adds it); every other row keeps its value."""
    sparse = optimizer.parts["sparse"]
    beta1, beta2 = sparse.defaults["betas"]
    eps = sparse.defaults["eps"]
    for p in sparse.param_groups[0]["params"]:
        old, state = before[id(p)]
        grad = p.grad.coalesce()
        used = grad.indices()[0]
        untouched = torch.ones(len(p), dtype=torch.bool)
        untouched[used] = False
        assert untouched.any() and torch.equal(p.detach()[untouched], old[untouched])
        g = grad.values()
        m = beta1 * state.get("exp_avg", torch.zeros_like(p))[used] + (1 - beta1) * g
        v = beta2 * state.get("exp_avg_sq", torch.zeros_like(p))[used] + (1 - beta2) * g * g
        step = state.get("step", 0) + 1
        size = LR * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        torch.testing.assert_close(p.detach()[used], old[used] - size * m / (v.sqrt() + eps), rtol=1e-5, atol=1e-7)


def _snapshot(optimizer: DenseAndSparseAdam) -> dict:
    sparse = optimizer.parts["sparse"]
    return {id(p): (p.detach().clone(), copy.deepcopy(sparse.state[p])) for p in sparse.param_groups[0]["params"]}


def test_tables_get_sparse_gradients_and_the_rest_steps_as_adam(tiny_data, tmp_path):  # noqa: F811
    rows = np.arange(0, 256)
    dense_model, dense_trainer, dense_cfg = _model_and_trainer(tiny_data, tmp_path / "d", sparse=False)
    sparse_model, sparse_trainer, sparse_cfg = _model_and_trainer(tiny_data, tmp_path / "s", sparse=True)
    dense_opt, sparse_opt = make_optimizer(dense_model, dense_cfg.train), make_optimizer(sparse_model, sparse_cfg.train)
    assert isinstance(sparse_opt, DenseAndSparseAdam) and set(sparse_opt.parts) == {"dense", "sparse"}
    before = _snapshot(sparse_opt)
    _step(dense_model, dense_trainer, dense_opt, rows, seed=1)
    _step(sparse_model, sparse_trainer, sparse_opt, rows, seed=1)
    tables = {id(p) for p in sparse_opt.parts["sparse"].param_groups[0]["params"]}
    assert tables and all(p.grad.is_sparse for p in sparse_model.parameters() if id(p) in tables)
    for (name, a), b in zip(dense_model.named_parameters(), sparse_model.parameters()):
        if id(b) in tables:  # the same gradient, densely
            torch.testing.assert_close(a.grad, b.grad.to_dense(), msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    _lazy_adam_rows(sparse_opt, before)


def test_a_later_step_moves_only_the_rows_its_batch_used(tiny_data, tmp_path):  # noqa: F811
    """Dense Adam would move every row a past step used, by momentum."""
    model, trainer, config = _model_and_trainer(tiny_data, tmp_path, sparse=True)
    optimizer = make_optimizer(model, config.train)
    _step(model, trainer, optimizer, np.arange(0, 256), seed=1)
    before = _snapshot(optimizer)
    _step(model, trainer, optimizer, np.arange(256, 300), seed=2)
    _lazy_adam_rows(optimizer, before)


def test_a_learning_rate_change_reaches_both_parts(tiny_data, tmp_path):  # noqa: F811
    model, _, config = _model_and_trainer(tiny_data, tmp_path, sparse=True)
    optimizer = make_optimizer(model, config.train)
    scheduler = ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0, threshold=0.0)
    scheduler.step(1.0)
    scheduler.step(0.5)  # no improvement: the rate halves
    assert [g["lr"] for part in optimizer.parts.values() for g in part.param_groups] == [LR / 2, LR / 2]


def test_state_round_trips_and_a_foreign_state_is_refused(tiny_data, tmp_path):  # noqa: F811
    model, trainer, config = _model_and_trainer(tiny_data, tmp_path, sparse=True)
    optimizer = make_optimizer(model, config.train)
    _step(model, trainer, optimizer, np.arange(0, 64), seed=1)
    state = optimizer.state_dict()
    again = make_optimizer(model, config.train)
    again.load_state_dict(state)
    assert again.state_dict()["sparse"]["state"].keys() == state["sparse"]["state"].keys()
    with pytest.raises(TrainingError, match="expected"):
        again.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def test_a_table_read_other_than_by_lookup_is_a_clear_error():
    class ReadsTheTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.items = nn.Embedding(10, 4)

        def forward(self, index):
            return (self.items(index) @ self.items.weight.T).sum()

    model = ReadsTheTable()
    optimizer = make_optimizer(model, parse_config(tiny_config(sparse_embeddings=True)).train)
    model(torch.tensor([1, 2])).backward()
    with pytest.raises(TrainingError, match="items.weight received a dense gradient"):
        optimizer.step()


def test_resume_continues_exactly(tiny_data, tmp_path):  # noqa: F811
    dataset, split = tiny_data

    def config(epochs):
        return parse_config(tiny_config(epochs=epochs, sparse_embeddings=True))

    torch.manual_seed(0)
    full = Trainer(build_model(config(3).model, dataset, "p2"), dataset, split, config(3), tmp_path).fit()
    work = tmp_path / "resumed"
    work.mkdir()
    torch.manual_seed(0)
    Trainer(build_model(config(3).model, dataset, "p2"), dataset, split, config(1), work).fit()
    torch.manual_seed(123)
    report = Trainer(build_model(config(3).model, dataset, "p2"), dataset, split, config(3), work).fit(resume=True)
    assert report.resumed_from_epoch == 1
    assert [h["loss"] for h in report.history] == [h["loss"] for h in full.history]
    assert [h["val_recall@50"] for h in report.history] == [h["val_recall@50"] for h in full.history]


def test_several_ranks_are_refused(tmp_path):
    config = parse_config(tiny_config("dssm", sparse_embeddings=True))
    with pytest.raises(ConfigError, match="train.sparse_embeddings: sparse gradients train in one process"):
        run_experiment(config, tmp_path / "run", ranks=Ranks(0, 2))
