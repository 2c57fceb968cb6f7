"""The whole pipeline at a million items: data, two trainings with their indexes, and serving.

Run it alone on the machine (about two and a half hours on two cores):

    python benchmarks/million_items.py

Stages, each a separate process whose wall time and peak memory are recorded:

1. ``data``: ``crosstower data synthetic`` streams the data set of the million configs
   (``configs/million-youtubednn-p2.yaml``'s ``dataset.options``) to ``OUT/data``.
2. ``youtubednn`` and ``sparcode``: ``crosstower run`` of ``configs/million-youtubednn-p2.yaml``
   and ``configs/million-sparcode-dnn-p2.yaml`` on that folder. Each trains within its budget,
   builds its index (the exact inner-product index; SparCode's sparse code index from the trained
   model, scored in spawned processes) and evaluates exhaustively and served; training samples
   per second, index build time and bytes come from the run's ``metrics.json``.
3. ``serving``: ``benchmarks/bench_serving.py --runs`` on the two trained runs, one thread: batch-1
   latency and throughput of SparCode's index against faiss IndexFlatIP and HNSW over the trained
   two-tower's item vectors.

Peak memory is sampled every half second over the stage's whole process tree (the spawned index
workers included): the sum of their resident sets (``peak_tree_rss_gib``) and the largest single
process (``peak_process_rss_gib``). Not the kernel's ``ru_maxrss``: a child forked from a large
parent starts its count at the parent's size. A stage whose output is already
there is skipped (``--redo`` runs it again), so an interrupted pipeline goes on where it stopped.
Writes ``OUT/pipeline.json`` (``--out``, default ``benchmarks/out/million``) after every stage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"youtubednn": ROOT / "configs" / "million-youtubednn-p2.yaml",
           "sparcode": ROOT / "configs" / "million-sparcode-dnn-p2.yaml"}
SAMPLE_SECONDS = 0.5
GIB = 2**30


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for task in tasks for c in (task / "children").read_text().split()]
    except OSError:  # the process ended between two reads
        return []


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of ``pid`` and all its descendants now, summed and of the largest process,
    read from Linux's ``/proc`` (by hand: psutil would do it, but it is not a dependency of the
    project, and this is a dozen lines)."""
    total, largest, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        rss = _rss_bytes(current)
        total, largest = total + rss, max(largest, rss)
        todo += _children(current)
    return total, largest


def run_stage(command: list[str], log_path: Path) -> dict[str, Any]:
    """Run ``command`` with its output in ``log_path``; its wall time, exit status and peaks."""
    peak = [0, 0]  # the tree's sum, the largest process
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                peak[:] = [max(p, now) for p, now in zip(peak, tree_rss(process.pid))]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        process.wait()
        done.set()
        sampler.join()
    return {
        "command": shlex.join(command), "exit": process.returncode,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_tree_rss_gib": round(peak[0] / GIB, 3),
        "peak_process_rss_gib": round(peak[1] / GIB, 3),
        "log": str(log_path),
    }


def data_options() -> dict[str, Any]:
    """The generator options both million configs name (they must agree)."""
    options = [yaml.safe_load(path.read_text())["dataset"]["options"] for path in CONFIGS.values()]
    if any(o != options[0] for o in options):
        raise SystemExit(f"error: {', '.join(map(str, CONFIGS.values()))} name different data sets")
    return options[0]


def stages(out: Path, threads: int, queries: int) -> dict[str, tuple[list[str], Path]]:
    """Each stage's command and the path whose existence means it is done."""
    cli = [sys.executable, "-m", "crosstower"]
    data = [*cli, "data", "synthetic", "--out", str(out / "data")]
    for key, value in data_options().items():
        data += ["--set", f"{key}={value}"]
    plan = {"data": (data, out / "data")}
    for name, config in CONFIGS.items():
        plan[name] = ([*cli, "run", str(config), "--data-dir", str(out), "--set", "dataset.path=data",
                       "--set", f"train.threads={threads}", "--out", str(out / name)], out / name / "metrics.json")
    serving = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--runs", str(out / "youtubednn"),
               str(out / "sparcode"), "--data-dir", str(out), "--threads", "1", "--queries", str(queries),
               "--out", str(out / "serving.json")]
    plan["serving"] = (serving, out / "serving.json")
    return plan


def run_summary(folder: Path) -> dict[str, Any]:
    """What a finished run says about its scale: samples/s, epochs, index build time and size,
    exhaustive and served Recall@50."""
    metrics = json.loads((folder / "metrics.json").read_text())
    timing, index = metrics.get("timing", {}), metrics.get("index", {})
    history = metrics.get("training_history", [])
    examples, seconds = sum(e["examples"] for e in history), sum(e["train_seconds"] for e in history)
    return {
        "train_seconds": timing.get("train_seconds"),  # validation included
        "epochs": len(history),
        "examples_trained": examples,
        "samples_per_second": round(examples / seconds, 1) if seconds else None,  # training steps only
        "index": index,
        "index_build_seconds": timing.get("index_build_seconds"),
        "test": {k: v for k, v in metrics["metrics"].get("test", {}).items() if k.startswith("recall@")},
        "test_served": {k: v for k, v in metrics["metrics"].get("test_served", {}).items() if k.startswith("recall@")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "million")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the two trainings")
    parser.add_argument("--queries", type=int, default=200, help="batch-1 queries of the serving benchmark")
    parser.add_argument("--only", nargs="+", choices=["data", *CONFIGS, "serving"], help="run these stages only")
    parser.add_argument("--redo", action="store_true", help="rerun stages whose output exists")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "pipeline.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"stages": {}}
    report["command"] = shlex.join(["python", "benchmarks/million_items.py", *(argv or sys.argv[1:])])
    for name, (command, done) in stages(out, args.threads, args.queries).items():
        if args.only and name not in args.only:
            continue
        if done.exists() and not args.redo:
            print(f"{name}: done already ({done})")
            continue
        print(f"{name}: {shlex.join(command)}", flush=True)
        result = run_stage(command, out / f"{name}.log")
        result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if name in CONFIGS and result["exit"] == 0:
            result["run"] = run_summary(out / name)
        report["stages"][name] = result
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"{name}: exit {result['exit']}, {result['wall_seconds']} s, peak {result['peak_tree_rss_gib']} GiB",
              flush=True)
        if result["exit"] != 0:
            print(f"error: stage {name} failed; see {result['log']}", file=sys.stderr)
            return 1
    print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
