"""The HTTP service, started and stopped on a loopback port: answers equal `recommend`, bad
requests get a 4xx that says what is wrong, and the service keeps answering after them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import crosstower
from tests.test_cli import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def service(finished_runs, tmp_path_factory):
    """`crosstower serve` on the two-tower run, on a free loopback port (its log in a file: a
    pipe nobody reads would block the service once full)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path_factory.mktemp("service") / "log.txt"
    process = subprocess.Popen([sys.executable, "-m", "crosstower.cli", "serve", str(finished_runs / "dssm"), "--port", str(port)],
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if call(url + "/health")[0] == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the service did not start:\n{log.read_text()}")
        time.sleep(0.5)
    yield url
    process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown, exit status 0
    assert process.wait(timeout=30) == 0
    assert "Finished server process" in log.read_text()


def test_answers_equal_recommend(service, finished_runs):
    retriever = crosstower.load_run(finished_runs / "dssm")
    users = [int(u) for u in retriever.run.dataset.user_ids[:3]]
    items = retriever.run.dataset.item_ids.tolist()
    status, single = call(service + "/recommend", {"user_id": str(users[0]), "k": 7})
    assert status == 200 and single["served_by"] == retriever.served_by
    expected = retriever.recommend(users=[users[0]], k=7)[0]
    assert single["user_id"] == users[0] and single["items"] == expected.items
    assert single["scores"] == pytest.approx(expected.scores, abs=1e-5)
    status, batch = call(service + "/recommend", {"requests": [
        {"user_id": users[1]}, {"history": [items[0], str(items[1])], "k": 3, "exclude_seen": False}]})
    assert status == 200 and [r["items"] for r in batch["results"]] == [
        retriever.recommend(users=[users[1]], k=10)[0].items,
        retriever.recommend(histories=[[items[0], items[1]]], k=3, exclude_seen=False)[0].items]
    status, info = call(service + "/info")
    assert status == 200 and info["model"] == "dssm" and info["items"] == retriever.num_items
    assert "recall@50" in info["metrics"]["test"]
    status, _ = call(service + "/openapi.json")
    assert status == 200


@pytest.mark.parametrize("body, status, message", [
    ({"user_id": "nobody"}, 404, "unknown user id: 'nobody'"),
    ({"history": [3, "no such item"]}, 404, "unknown item id: 'no such item'"),
    ({"user_id": 1, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"user_id": 1, "k": 10**6}, 422, "k: 1000000 is above the catalogue's"),
    (b'{"user_id": 1, "k": ', 400, "the body is not valid JSON"),
    ({"requests": []}, 422, "requests: List should have at least 1 item"),
    ({"user_id": 1, "history": [3]}, 422, "give either user_id or history"),
    ({"user_id": 1, "kk": 3}, 422, "kk: unknown key"),
    ({"user_id": 1.5}, 422, "user_id"),
])
def test_bad_requests_get_a_4xx_that_says_why_and_the_service_goes_on(service, body, status, message):
    got, answer = call(service + "/recommend", body)
    assert got == status and message in answer["error"], answer
    assert call(service + "/recommend", {"user_id": 1, "k": 2})[0] == 200
