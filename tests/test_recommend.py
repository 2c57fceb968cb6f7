"""Recommendations from a finished run: raw ids in and out, answers equal to the run's own index
search, to exhaustive top-k where that index is exact, and bounded against it where it is not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import crosstower
from crosstower.config import parse_config
from crosstower.data.batching import UserInput
from crosstower.errors import CrosstowerError
from crosstower.evaluate.ranking import topk_items
from crosstower.recommend import RequestError
from crosstower.run import run_experiment
from tests.helpers import rated_frames
from tests.test_cli import assert_one_line_error, run_cli

K = 10


def known_users(retriever, count: int = 40) -> list:
    """Raw ids of users the data set holds, some of them with long histories."""
    return list(retriever.run.dataset.user_ids[:: max(1, retriever.run.dataset.num_users // count)])


def reference_input(retriever, raw_users: list) -> UserInput:
    """The users' model input built directly from the data set (every interaction, by time)."""
    dataset = retriever.run.dataset
    index = {raw: i for i, raw in enumerate(dataset.user_ids)}
    rows = np.array([index[u] for u in raw_users])
    frame = dataset.interactions.sort_values(["user", "timestamp", "item"], kind="stable")
    length = retriever.run.config.train.history_length
    history = np.full((len(rows), length), -1)
    for r, user in enumerate(rows):
        items = frame.loc[frame["user"] == user, "item"].to_numpy()[-length:]
        history[r, length - len(items):] = items
    return UserInput(torch.from_numpy(rows), torch.from_numpy(history), torch.zeros(len(rows)))


def as_indices(retriever, answers) -> list[list[int]]:
    index = {raw: i for i, raw in enumerate(retriever.run.dataset.item_ids.tolist())}
    return [[index[item] for item in answer.items] for answer in answers]


def exhaustive(retriever, user: UserInput, exclude, k: int = K) -> list[list[int]]:
    model = retriever.model
    scores, items = topk_items(lambda rows, lo, hi: model.score(
        UserInput(user.users[rows], user.history[rows], user.example_age[rows]), torch.arange(lo, hi)),
        len(user), retriever.num_items, exclude, k)
    return [row[row >= 0].tolist() for row in items.numpy()]


@pytest.mark.parametrize("name, served_by", [("dssm", "exact_inner_product index (exact)"),
                                             ("cross", "exhaustive scoring of every item")])
def test_exact_answers_equal_the_index_search_and_exhaustive_top_k(finished_runs, name, served_by):
    retriever = crosstower.load_run(finished_runs / name)
    assert retriever.served_by == served_by
    users = known_users(retriever)
    answers = retriever.recommend(users=users, k=K)
    assert [a.user for a in answers] == users
    user = reference_input(retriever, users)
    seen = retriever.seen.take(user.users.numpy())
    got = as_indices(retriever, answers)
    if retriever.index is not None:
        searched = retriever.index.search(retriever.model.index_query(user), K, seen)[1]
        assert got == [row[row >= 0].tolist() for row in searched.numpy()]
    assert got == exhaustive(retriever, user, seen)
    for answer, row_seen in zip(got, (seen.row(r) for r in range(len(users)))):
        assert len(answer) == K and not set(answer) & set(row_seen.tolist())
    assert all(a.scores == sorted(a.scores, reverse=True) for a in answers)


def test_a_sparse_code_index_keeping_every_score_answers_the_exhaustive_top_k(finished_runs):
    """Every (code, item) score of every code is kept, in float16: the answer is the index's
    search, and the exhaustive top-k up to that rounding (items may swap only within it)."""
    retriever = crosstower.load_run(finished_runs / "sparcode")
    assert retriever.served_by == "sparse_code index (approximate)"
    users = known_users(retriever)
    user = reference_input(retriever, users)
    seen = retriever.seen.take(user.users.numpy())
    answers = retriever.recommend(users=users, k=K)
    got = as_indices(retriever, answers)
    searched = retriever.index.search(retriever.model.index_query(user), K, seen)[1]
    assert got == [row[row >= 0].tolist() for row in searched.numpy()]
    with torch.no_grad():
        scores = retriever.model.score(user, torch.arange(retriever.num_items))
    for r, (answer, items) in enumerate(zip(answers, got)):
        row = scores[r].clone()
        row[torch.from_numpy(seen.row(r))] = float("-inf")
        kth = row.topk(K).values[-1]
        tolerance = 2e-3 * float(row[torch.isfinite(row)].abs().max()) + 1e-3
        assert len(items) == K and bool((row[items] >= kth - tolerance).all())
        assert np.allclose(answer.scores, row[items].numpy(), atol=tolerance)


def test_late_interaction_answers_are_the_index_search_with_bounded_recall(finished_runs):
    retriever = crosstower.load_run(finished_runs / "colbert")
    assert retriever.served_by == "late_interaction index (approximate)"
    users = known_users(retriever)
    user = reference_input(retriever, users)
    seen = retriever.seen.take(user.users.numpy())
    got = as_indices(retriever, retriever.recommend(users=users, k=K))
    searched = retriever.index.search(retriever.model.index_query(user), K, seen)[1]
    assert got == [row[row >= 0].tolist() for row in searched.numpy()]
    truth = exhaustive(retriever, user, seen)
    recall = np.mean([len(set(a) & set(t)) / len(t) for a, t in zip(got, truth)])
    print(f"late-interaction index recall@{K} against exhaustive: {recall:.3f}")
    assert recall >= 0.8


def test_raw_ids_in_and_out_and_seen_items_optional(finished_runs):
    retriever = crosstower.load_run(finished_runs / "dssm")
    raw = retriever.run.dataset.user_ids[5]
    by_int, by_text = retriever.recommend(users=[int(raw)], k=K)[0], retriever.recommend(users=[str(raw)], k=K)[0]
    assert by_int == by_text and by_int.user == int(raw)
    assert set(by_int.items) <= set(retriever.run.dataset.item_ids.tolist())
    everything = retriever.recommend(users=[raw], k=retriever.num_items, exclude_seen=False)[0]
    assert len(everything.items) == retriever.num_items  # seen items included when asked
    rest = retriever.recommend(users=[raw], k=retriever.num_items)[0]
    assert len(rest.items) == retriever.num_items - len(set(retriever.seen.row(5).tolist()))


def test_a_history_request_equals_the_user_request_when_no_user_field_is_read(finished_runs):
    retriever = crosstower.load_run(finished_runs / "dssm_no_user_fields")
    users = known_users(retriever, 10)
    items = retriever.run.dataset.item_ids
    histories = [[items[i] for i in retriever.seen.row(u)] for u in range(0, retriever.run.dataset.num_users, 30)]
    by_user = retriever.recommend(users=list(retriever.run.dataset.user_ids[::30]), k=K)
    by_history = retriever.recommend(histories=histories, k=K)
    assert [a.items for a in by_user] == [a.items for a in by_history]
    assert all(a.user is None for a in by_history) and users


def test_a_history_request_reads_missing_user_fields(finished_runs):
    retriever = crosstower.load_run(finished_runs / "dssm")  # reads segment, age_bucket and region
    items = retriever.run.dataset.item_ids.tolist()
    answers = retriever.recommend(histories=[items[:3], [], [items[7], str(items[8])]], k=K)
    assert [len(a.items) for a in answers] == [K, K, K]
    assert not set(answers[0].items) & set(items[:3])
    # No user feature: every empty history gets the same answer.
    alone = retriever.recommend(histories=[[]], k=K)[0]
    assert alone.items == answers[1].items and np.allclose(alone.scores, answers[1].scores, atol=1e-5)


@pytest.mark.parametrize("request_, message", [
    ({"users": ["nobody", 10**9]}, "unknown user ids: 'nobody', 1000000000"),
    ({"histories": [["no such item"]]}, "unknown item id: 'no such item'"),
    ({"users": [1.5]}, "unknown user id: 1.5"),
    ({"users": "12"}, "expected a list of user ids"),
    ({"users": [1], "k": 0}, "k: expected a whole number >= 1"),
    ({"users": [1], "k": "too many"}, "k: {} is above the catalogue's {} items"),
    ({}, "give either users or histories"),
])
def test_bad_requests_name_what_is_wrong(finished_runs, request_, message):
    retriever = crosstower.load_run(finished_runs / "dssm")
    if request_.get("k") == "too many":
        request_ = {**request_, "k": retriever.num_items + 1}
        message = message.format(retriever.num_items + 1, retriever.num_items)
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        retriever.recommend(**{"k": K, **request_})


def test_a_pre_ranking_run_is_refused(tmp_path):
    frame, _, items = rated_frames()
    frame.to_csv(tmp_path / "log.csv", index=False)
    items.reset_index().to_csv(tmp_path / "items.csv", index=False)
    raw = {"dataset": {"name": "generic", "path": str(tmp_path), "options": {
        "interactions": "log.csv", "columns": {"rating": "rating"},
        "item_features": {"file": "items.csv", "id_column": "item_id", "fields": [{"column": "genre", "kind": "categorical"}]}}},
        "split": {"protocol": "p4"}, "model": {"name": "dssm", "embedding_dim": 8, "output_dim": 8},
        "train": {"epochs": 1, "threads": 1, "history_length": 5}}
    run_experiment(parse_config(raw), tmp_path / "p4")
    with pytest.raises(CrosstowerError, match="P4 \\(pre-ranking\\) run scores given pairs only"):
        crosstower.load_run(tmp_path / "p4")


def test_the_recommend_command_prints_a_table_or_json_and_refuses_unknown_ids(finished_runs, tmp_path):
    retriever = crosstower.load_run(finished_runs / "dssm")
    user = str(retriever.run.dataset.user_ids[4])
    expected = retriever.recommend(users=[user], k=5)[0]
    table = run_cli(["recommend", str(finished_runs / "dssm"), "--user", user, "-k", "5"], tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "served by exact_inner_product index (exact)" in lines[0] and f"user {user}" in lines[0]
    assert [cell.strip() for cell in lines[1].split(" | ")][:3] == ["rank", "item", "score"]
    assert [line.split(" | ")[1].strip() for line in lines[3:]] == [str(i) for i in expected.items]
    answer = run_cli(["recommend", str(finished_runs / "dssm"), "--history", "3, 5,8", "--json"], tmp_path)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["items"] == retriever.recommend(histories=[["3", "5", "8"]], k=10)[0].items
    assert_one_line_error(run_cli(["recommend", str(finished_runs / "dssm"), "--user", "nobody"], tmp_path),
                          "unknown user id: 'nobody'")
    assert_one_line_error(run_cli(["recommend", str(tmp_path / "missing"), "--user", user], tmp_path),
                          "not a finished run")


@pytest.mark.parametrize("name", ["dssm", "colbert", "sparcode"])
def test_compiled_queries_answer_what_pytorch_answers(finished_runs, name):
    eager = crosstower.load_run(finished_runs / name)
    compiled = crosstower.load_run(finished_runs / name)
    assert compiled.compile() and compiled.describe()["queries_by"] == "onnxruntime"
    users = known_users(eager)
    for exclude_seen in (True, False):
        expected = eager.recommend(users=users, k=K, exclude_seen=exclude_seen)
        got = compiled.recommend(users=users, k=K, exclude_seen=exclude_seen)
        assert [a.items for a in got] == [a.items for a in expected]
        assert np.allclose([a.scores for a in got], [a.scores for a in expected], atol=1e-4)
    single = compiled.recommend(users=users[:1], k=K)  # batch 1: the graph's batch size is not fixed
    assert single[0].items == eager.recommend(users=users[:1], k=K)[0].items
    history = [eager.run.dataset.item_ids[0], eager.run.dataset.item_ids[3]]  # history requests: PyTorch
    assert compiled.recommend(histories=[history], k=K)[0].items == eager.recommend(histories=[history], k=K)[0].items


def test_a_model_without_a_query_graph_is_served_by_pytorch(finished_runs):
    retriever = crosstower.load_run(finished_runs / "cross")
    assert not retriever.compile() and retriever.describe()["queries_by"] == "pytorch"


def test_a_query_side_that_will_not_export_is_served_by_pytorch(finished_runs, monkeypatch, caplog):
    import crosstower.query_graph

    def fail(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(crosstower.query_graph, "CompiledQueries", fail)
    retriever = crosstower.load_run(finished_runs / "dssm")
    with caplog.at_level("WARNING", logger="crosstower.query_graph"):
        assert not retriever.compile()
    assert "cannot trace this" in caplog.text and retriever.describe()["queries_by"] == "pytorch"
    assert len(retriever.recommend(users=known_users(retriever)[:2], k=K)) == 2
