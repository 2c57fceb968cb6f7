"""Distillation under protocol P4 (pre-ranking on labelled rows) and VIRT's adapted interaction."""

from __future__ import annotations

import copy

import pytest
import torch

from crosstower.config import parse_config
from crosstower.data.batching import UserInput
from crosstower.errors import ConfigError
from crosstower.models import build_model
from crosstower.models.dual_encoder import DualEncoderConfig
from crosstower.run import run_experiment
from tests.helpers import rated_dataset, rated_frames
from tests.test_distill import MODELS

TRAIN = {"epochs": 1, "batch_size": 128, "threads": 1, "history_length": 10}


def p4_config(tmp_path, model: str | dict, distill: dict | None = None) -> dict:
    """Rated interactions as a generic data set, labelled under P4 (ratings >= 4 positive)."""
    data = tmp_path.parent / "rated"
    if not data.exists():
        data.mkdir()
        frame, _, items = rated_frames(num_users=80, num_items=60, rows=2500)
        frame.to_csv(data / "log.csv", index=False)
        items.reset_index().to_csv(data / "items.csv", index=False)
    raw = {
        "dataset": {"name": "generic", "path": str(data), "options": {
            "interactions": "log.csv", "columns": {"rating": "rating"},
            "item_features": {"file": "items.csv", "id_column": "item_id",
                              "fields": [{"column": "genre", "kind": "categorical"}]}}},
        "split": {"protocol": "p4"},
        "model": copy.deepcopy(MODELS[model]) if isinstance(model, str) else model,
        "train": dict(TRAIN),
        "evaluate": {"ks": [10]},
    }
    if distill is not None:
        raw["distill"] = distill
    return raw


@pytest.fixture(scope="module")
def p4_teachers(tmp_path_factory):
    """A cross-encoder and a late-interaction teacher trained pointwise under P4, once."""
    root = tmp_path_factory.mktemp("p4") / "teachers"
    root.mkdir()
    for name in ("cross", "colbert"):
        run_experiment(parse_config(p4_config(root, name)), root / name)
    return root


ADAPTED_DUAL = {**MODELS["dual"], "adapted_interaction": True}


@pytest.mark.parametrize("model, distill", [
    ("dssm", {"method": "kd", "teacher": {"run": "cross"}, "temperature": 2.0}),
    ("dual", {"method": "virt", "teacher": {"run": "cross"}}),
    (ADAPTED_DUAL, {"method": "virt", "teacher": {"run": "cross"}}),
    ("trmd", {"method": "trmd", "teacher": {"run": "cross"}, "colbert_teacher": {"run": "colbert"}}),
])
def test_pointwise_distillation_trains_end_to_end(p4_teachers, tmp_path, model, distill):
    distill = copy.deepcopy(distill)
    for key in ("teacher", "colbert_teacher"):
        if key in distill:
            distill[key]["run"] = str(p4_teachers / distill[key]["run"])
    results = run_experiment(parse_config(p4_config(p4_teachers, model, distill)), tmp_path / "run")
    epoch = results["training_history"][0]
    teacher_terms = {"kd": ["kd"], "virt": ["virt"], "trmd": ["cls", "tokens"]}[distill["method"]]
    assert epoch["loss_supervised"] > 0 and all(epoch[f"loss_{term}"] > 0 for term in teacher_terms)
    assert {"auc", "gauc", "logloss"} <= results["metrics"]["test"].keys()


def test_pointwise_kd_is_the_tempered_bce_to_the_teacher(p4_teachers, tmp_path):
    """The kd term of one batch, recomputed by hand from both models' logits."""
    from crosstower.data.run_data import load_data
    from crosstower.distill import build_distiller
    from crosstower.evaluate.pre_ranking import part_rows

    raw = p4_config(p4_teachers, "dssm", {"method": "kd", "teacher": {"run": str(p4_teachers / "cross")},
                                          "temperature": 2.0})
    config = parse_config(raw)
    dataset, split = load_data(config, None)
    student = build_model(config.model, dataset, "p4", config.train.history_length)
    distiller = build_distiller(config, student, dataset, split, tmp_path / "out", tmp_path, None)
    rows = part_rows(split, "train", dataset.num_users, config.train.history_length)
    batch = rows.batch(torch.arange(16).numpy())
    terms = distiller.pointwise_terms(batch)
    teacher = distiller.teacher.model.score_pairs(batch.user, batch.items) / 2.0
    mine = student.score_pairs(batch.user, batch.items) / 2.0
    p, log_q, log_not_q = torch.sigmoid(teacher), torch.nn.functional.logsigmoid(mine), torch.nn.functional.logsigmoid(-mine)
    expected = 4.0 * -(p * log_q + (1 - p) * log_not_q).mean()
    assert float(terms["kd"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_methods_without_a_pointwise_form_are_refused_under_p4(tmp_path):
    raw = p4_config(tmp_path, "dssm", {"method": "endx", "teacher": {"run": str(tmp_path / "t")}})
    with pytest.raises(ConfigError, match="endx distils over sampled candidates; under protocol p4 .*kd.*trmd.*virt"):
        parse_config(raw)
    cached = p4_config(tmp_path, "dssm", {"method": "kd", "teacher": {"run": str(tmp_path / "t")},
                                          "cache_candidates": 50})
    with pytest.raises(ConfigError, match="cache_candidates"):
        parse_config(cached)
    faithful = p4_config(tmp_path, "trmd", {"method": "trmd", "teacher": {"run": str(tmp_path / "t")}, "ranking": "faithful",
                                            "terms": {"tokens": 0}})
    with pytest.raises(ConfigError, match="distill.ranking: faithful"):
        parse_config(faithful)


def test_adapted_interaction_is_for_pre_ranking_only():
    raw = {"dataset": {"name": "synthetic", "options": {"num_users": 50, "num_items": 40}}, "split": {"protocol": "p2"},
           "model": ADAPTED_DUAL, "train": dict(TRAIN), "evaluate": {"ks": [10, 50]}}
    with pytest.raises(ConfigError, match="adapted_interaction.*p4"):
        parse_config(raw)


def test_adapted_interaction_matches_a_per_head_reference():
    """Each pair's adapted score recomputed from the towers' last-layer queries, keys and final
    states with explicit loops over heads and tokens, padded tokens skipped."""
    dataset = rated_dataset(num_users=20, num_items=15, rows=300)
    config = DualEncoderConfig.model_validate({**ADAPTED_DUAL, "item_bias": True})
    torch.manual_seed(0)
    model = build_model(config, dataset, "p4", 4).eval()
    with torch.no_grad():
        model.bias.weight.normal_()
    user = UserInput(torch.tensor([0, 1, 2]), torch.tensor([[-1, -1, 3, 4], [1, 2, 3, 4], [-1, -1, -1, 5]]))
    items = torch.tensor([3, 7, 7])
    with torch.no_grad():
        scores = model.score_pairs(user, items)
        user_seq, user_traces = model._user_pass(user)
        item_seq, item_traces = model._item_pass(items)
        expected = []
        for b in range(len(items)):
            mixed = []
            for queries, keys, mask, values in (
                (user_traces[-1].queries[b], item_traces[-1].keys[b], item_seq.mask[b], item_seq.tokens[b]),
                (item_traces[-1].queries[b], user_traces[-1].keys[b], user_seq.mask[b], user_seq.tokens[b]),
            ):
                heads = []
                for h in range(queries.shape[0]):
                    real = [j for j in range(keys.shape[1]) if mask[j]]
                    logits = torch.stack([queries[h, 0] @ keys[h, j] / queries.shape[-1] ** 0.5 for j in real])
                    weights = torch.softmax(logits, 0)
                    heads.append(sum(w * values[j] for w, j in zip(weights, real)))
                mixed.append(torch.stack(heads).mean(0))
            u = model.adapted_user_head(torch.cat([user_seq.tokens[b, 0], mixed[0]]))
            i = model.adapted_item_head(torch.cat([item_seq.tokens[b, 0], mixed[1]]))
            u, i = torch.nn.functional.normalize(u, dim=0), torch.nn.functional.normalize(i, dim=0)
            expected.append(u @ i / config.temperature + model.bias.weight[items[b], 0])
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-5)
