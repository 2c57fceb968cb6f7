"""ONNX export: the exported user tower, run by onnxruntime, matches PyTorch to 1e-5; the item
vectors and the faiss index answer what the run's retriever answers."""

from __future__ import annotations

import json

import faiss
import numpy as np
import onnxruntime
import pytest
import torch

import crosstower
from crosstower.data.batching import UserInput
from crosstower.export import export_run
from crosstower.index import CodeQueries, Index
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def exported(finished_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "dssm-onnx"
    result = run_cli(["export", str(finished_runs / "dssm"), "--out", str(out)], out.parent)
    assert result.returncode == 0, result.stderr
    return crosstower.load_run(finished_runs / "dssm"), out


def test_the_onnx_user_tower_matches_pytorch(exported):
    retriever, out = exported
    session = onnxruntime.InferenceSession(str(out / "user_tower.onnx"))
    histories = np.load(out / "user_histories.npy")
    rng = np.random.default_rng(0)
    users = rng.choice(retriever.run.dataset.num_users, 37, replace=False)
    history = histories[users]
    history[:5] = rng.integers(-1, retriever.num_items, history[:5].shape)  # new histories, padding inside too
    got = session.run(None, {"users": users.astype(np.int64), "history": history})[0]
    with torch.no_grad():
        expected = retriever.model.encode_users(UserInput(torch.from_numpy(users), torch.from_numpy(history),
                                                          torch.zeros(len(users)))).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5
    single = session.run(None, {"users": users[:1].astype(np.int64), "history": history[:1]})[0]
    assert np.abs(single - expected[:1]).max() <= 1e-5


def test_the_faiss_index_answers_what_the_run_recommends(exported):
    retriever, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    ids = json.loads((out / "ids.json").read_text())
    assert manifest["dim"] == np.load(out / "item_vectors.npy").shape[1] and manifest["history_length"] == 10
    session = onnxruntime.InferenceSession(str(out / "user_tower.onnx"))
    index = faiss.read_index(str(out / "items.faiss"))
    users = np.arange(0, retriever.run.dataset.num_users, 25)
    vectors = session.run(None, {"users": users, "history": np.load(out / "user_histories.npy")[users]})[0]
    scores, rows = index.search(vectors, 10)
    expected = retriever.recommend(users=[ids["users"][u] for u in users], k=10, exclude_seen=False)
    for row_scores, row_items, answer in zip(scores, rows, expected):
        assert np.allclose(row_scores, answer.scores, atol=1e-4)
        assert [ids["items"][i] for i in row_items] == answer.items


def test_a_late_interaction_export_holds_its_token_tower_and_index(finished_runs, tmp_path):
    retriever = crosstower.load_run(finished_runs / "colbert")
    out = export_run(retriever, tmp_path / "colbert-onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"] == ["user_tokens", "user_token_mask"] and (out / "index" / "item_tokens.npy").exists()
    candidates = faiss.deserialize_index(np.load(out / "index" / "candidate_index.npy"))
    assert candidates.ntotal == int(np.load(out / "index" / "item_mask.npy").sum())
    session = onnxruntime.InferenceSession(str(out / "user_tower.onnx"))
    users = np.arange(0, retriever.run.dataset.num_users, 7)
    history = np.load(out / "user_histories.npy")[users]
    tokens, mask = session.run(None, {"users": users, "history": history})
    with torch.no_grad():
        expected = retriever.model.index_query(UserInput(torch.from_numpy(users), torch.from_numpy(history),
                                                         torch.zeros(len(users))))
    assert np.array_equal(mask, expected.mask.numpy())
    assert np.abs(tokens - expected.tokens.numpy())[mask].max() <= 1e-5


def test_a_sparcode_export_holds_its_code_encoder_and_index(finished_runs, tmp_path):
    retriever = crosstower.load_run(finished_runs / "sparcode")
    out = export_run(retriever, tmp_path / "sparcode-onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    ids = json.loads((out / "ids.json").read_text())
    assert manifest["outputs"] == ["user_codes", "user_code_vectors"] and "posting list" in manifest["score"]
    session = onnxruntime.InferenceSession(str(out / "user_tower.onnx"))
    rng = np.random.default_rng(1)
    users = np.arange(0, retriever.run.dataset.num_users, 7)
    history = np.load(out / "user_histories.npy")[users]
    history[:3] = rng.integers(-1, retriever.num_items, history[:3].shape)  # new histories, padding inside too
    codes, vectors = session.run(None, {"users": users, "history": history})
    with torch.no_grad():
        expected = retriever.model.index_query(UserInput(torch.from_numpy(users), torch.from_numpy(history),
                                                         torch.zeros(len(users))))
    assert np.array_equal(codes, expected.codes.numpy())
    assert np.abs(vectors - expected.vectors.numpy()).max() <= 1e-5
    single = session.run(None, {"users": users[:1], "history": history[:1]})[0]
    assert np.array_equal(single, codes[:1])
    # The exported index folder, searched with the exported encoder's outputs, is the run's index.
    index = Index.load(out / "index")
    _, items = index.search(CodeQueries(torch.from_numpy(codes[3:]), torch.from_numpy(vectors[3:])), 10)
    answers = retriever.recommend(users=[ids["users"][u] for u in users[3:]], k=10, exclude_seen=False)
    assert [[ids["items"][i] for i in row] for row in items.numpy()] == [a.items for a in answers]


@pytest.mark.parametrize("name, message", [
    ("cross", "scores each (user, item) pair with a network"),
])
def test_what_cannot_be_exported_is_refused_in_one_line(finished_runs, tmp_path, name, message):
    assert_one_line_error(run_cli(["export", str(finished_runs / name), "--out", str(tmp_path / "x")], tmp_path), message)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_an_existing_folder_that_is_no_export_is_never_replaced(finished_runs, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(crosstower.recommend.CrosstowerError, match="is not a crosstower export"):
        export_run(crosstower.load_run(finished_runs / "dssm"), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
