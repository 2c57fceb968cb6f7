"""A bounded loopback load against `crosstower serve`, beside the in-process `recommend` latency.

    python benchmarks/bench_service.py RUN_DIR... [--requests 2000] [--concurrency 1 4] \
        [--threads 1] [--data-dir ../shared/data] [--out benchmarks/out/bench_service.json]

For each run: the in-process latency of ``Retriever.recommend`` for one known user at a time
(``--requests`` calls, users drawn at random with a fixed seed), then the service started on a free
loopback port (``crosstower serve``, its own process, ``--threads`` torch threads) and loaded, at
each ``--concurrency``, by that many clients, each with its own keep-alive connection, sending the
same number of ``POST /recommend`` requests in total. One client measures what HTTP adds to a
request; several measure throughput, and their latency includes waiting behind each other (the
service answers one request at a time per process). It reports the throughput, p50 / p99 latency and the count
of errors (any answer but 200) of both, written to ``--out`` and printed as a table. The load
stops by itself after its request count; nothing else should run on the machine while it does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstower.environment import describe_environment, source_revision  # noqa: E402
from crosstower.files import write_json  # noqa: E402
from crosstower.recommend import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 10


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def in_process(retriever, users: list, requests: int) -> dict:
    for user in users[:20]:  # warm-up: first calls pay for lazy initialisation
        retriever.recommend(users=[user], k=K)
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        retriever.recommend(users=[users[i % len(users)]], k=K)
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {"requests": requests, "requests_per_second": round(requests / total, 1), **percentiles(latencies), "errors": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(run_dir: Path, port: int, threads: int, data_dir: Path | None, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "crosstower.cli", "serve", str(run_dir), "--port", str(port), "--threads", str(threads)]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the service for {run_dir} did not start; see {log.name}")


def load(port: int, users: list, requests: int, concurrency: int) -> dict:
    """``concurrency`` clients share ``requests`` requests, one keep-alive connection each."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = json.dumps({"user_id": users[i % len(users)], "k": K})
            t = time.perf_counter()
            try:
                connection.request("POST", "/recommend", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok

    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    total = time.perf_counter() - start
    return {"requests": requests, "concurrency": concurrency, "requests_per_second": round(requests / total, 1),
            **percentiles(latencies), "errors": errors[0]}


def bench(run_dir: Path, args: argparse.Namespace) -> dict:
    retriever = load_run(run_dir, args.data_dir)
    torch.set_num_threads(args.threads)  # load_run set the run's own count
    rng = np.random.default_rng(0)
    ids = retriever.run.dataset.user_ids
    users = [v.item() if isinstance(v, np.generic) else v for v in ids[rng.choice(len(ids), min(len(ids), 1000), replace=False)]]
    local = in_process(retriever, users, args.requests)
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        port = free_port()
        process = start_service(run_dir, port, args.threads, args.data_dir, log)
        try:
            load(port, users, min(200, args.requests), max(args.concurrency))  # warm-up
            served = [load(port, users, args.requests, c) for c in args.concurrency]
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"run": str(run_dir), "model": retriever.run.config.model.name, "dataset": retriever.run.dataset.name,
            "served_by": retriever.served_by, "in_process": local, "service": served}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="clients at once, one load each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in process and in the service")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/bench_service.json"))
    args = parser.parse_args(argv)
    results = []
    for run_dir in args.runs:
        results.append(bench(run_dir, args))
    report = {"settings": {"requests": args.requests, "concurrency": args.concurrency, "threads": args.threads, "k": K},
              **describe_environment(), **source_revision(), "results": results}
    write_json(args.out, report)
    print("| run | served by | in-process req/s | in-process p50 / p99 ms | clients | service req/s | service p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        local = r["in_process"]
        for served in r["service"]:
            print(f"| {Path(r['run']).name} | {r['served_by']} | {local['requests_per_second']:.0f} | "
                  f"{local['p50_ms']:.2f} / {local['p99_ms']:.2f} | {served['concurrency']} | "
                  f"{served['requests_per_second']:.0f} | {served['p50_ms']:.2f} / {served['p99_ms']:.2f} | {served['errors']} |")


if __name__ == "__main__":
    main()
