"""Print the distillation tables of docs/results.md from finished run folders.

    python benchmarks/distill_table.py runs/distill/ml100k-*        # one row per run
    python benchmarks/distill_table.py --seeds runs/distill/ml100k-*  # mean +- std over seeds

A row is a run: its student, method and teacher, test Recall@20 / Recall@50 / NDCG@50, served
Recall@50 (the run's index), the student's training seconds (with what the method computed once,
such as a teacher-score cache) and the teacher's (a teacher shared by several students is
counted in each), epochs, what serves the student (an inner-product index, which nearest-neighbour
search can serve, or another index), and its serving cost from the run's ``metrics.json``:
multiply-adds per (user, item) pair and bytes stored per item (runs written before costs were
recorded: the multiply-adds of one inner product, no bytes). A row's command is its config file
plus a ``--set`` for every setting the run changed (read from the run's saved config). With ``--seeds`` runs whose configs differ only in
``train.seed`` are one row: mean +- sample standard deviation, and the number of seeds. Runs of
protocol P4 (pre-ranking) get the pointwise columns instead: test AUC, GAUC and log loss, and no
cost column (a pre-ranker scores each given pair).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosstower.compare import group_key, mean_std  # noqa: E402
from crosstower.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Settings a row's command leaves out: the seed (its own column) and where the run ran.
RUNTIME = {"train.seed", "train.threads", "train.device"}

RANKING = (("test", "recall@20"), ("test", "recall@50"), ("test", "ndcg@50"), ("test_served", "recall@50"))
POINTWISE = (("test", "auc"), ("test", "gauc"), ("test", "logloss"))
LABELS = {"recall@20": "Recall@20", "recall@50": "Recall@50", "ndcg@50": "NDCG@50", "auc": "test AUC",
          "gauc": "test GAUC", "logloss": "test log loss"}


# How a run's index serves it, by index kind: "ANN" where an inner-product (nearest-neighbour)
# index can serve it, else what serves it.
SERVED_BY = {"exact_inner_product": "inner product (ANN)", "faiss_inner_product": "inner product (ANN)",
             "sparse_code": "sparse code index", "late_interaction": "token index + exact MaxSim",
             "two_rankers": "token index + exact re-scoring", "exhaustive": "exhaustive only"}


def head(metrics: tuple) -> list[str]:
    names = [("served " if part == "test_served" else "") + LABELS[metric] for part, metric in metrics]
    cost = ["served by", "MACs / pair", "bytes / item"] if metrics is RANKING else []
    return ["dataset", "protocol", "student", "method", "teacher", *names, "student train s", "teacher train s",
            "epochs", *cost, "seeds", "command"]


def describe(run_dir: Path) -> dict:
    r = json.loads((run_dir / "metrics.json").read_text())
    metrics = POINTWISE if r["protocol"] == "p4" else RANKING
    config, timing = r["config"], r["timing"]
    distill = config.get("distill") or {}
    teacher = distill.get("teacher") or {}
    model = config["model"]
    width = model.get("output_dim", model.get("embedding_dim", 0)) + (1 if model.get("item_bias") else 0)
    cost = r.get("cost") or {}  # runs written before costs were recorded: an inner product's width
    kind = (r.get("index") or {}).get("kind", "exhaustive")
    return {
        "key": group_key(r),
        "cells": [r["dataset"], r["protocol"].upper(), r["model"], distill.get("method", "none"),
                  # a teacher named but never read (every teacher term off) was not loaded
                  Path(teacher.get("config") or teacher.get("run") or "-").stem
                  if "teacher_train_seconds" in timing else "-"],
        "metrics": metrics, "values": [r["metrics"].get(part, {}).get(metric) for part, metric in metrics],
        "train": timing["train_seconds"] + timing.get("distill_setup_seconds", 0.0),
        "teacher": timing.get("teacher_train_seconds", 0.0),
        "epochs": timing.get("epochs", 0), "name": config.get("name") or run_dir.name,
        "cost": [SERVED_BY.get(kind, kind), f"{cost.get('macs_per_pair', width):,.0f}",
                 f"{cost['bytes_per_item']:,.0f}" if "bytes_per_item" in cost else "-"],
        "seed": config["train"]["seed"], "overrides": overrides(config, config.get("name") or run_dir.name),
    }


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def overrides(config: dict, name: str) -> list[str]:
    """The ``--set`` arguments that turn ``configs/<name>.yaml`` into the run's config (the seed
    and runtime settings aside), so that a row's command reproduces the run; none where the
    config file is not there."""
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.exists():
        return []
    base = _flat(load_config(path, []).model_dump(mode="json"))
    return [f"--set {key}={json.dumps(value)}" for key, value in sorted(_flat(config).items())
            if key not in RUNTIME and key in base and base[key] != value]


def rows(runs: list[dict], by_seed: bool) -> list[list[str]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[run["key"] if by_seed else f"{run['key']}{run['seed']}{id(run)}"].append(run)
    out = []
    for group in groups.values():
        first = group[0]
        seeds = sorted(r["seed"] for r in group)
        base = " ".join([f"crosstower run configs/{first['name']}.yaml", *first["overrides"]])
        command = f"`{base}`"
        if len(seeds) == 1 and seeds != [0]:
            command = f"`{base} --set train.seed={seeds[0]}`"
        elif len(seeds) > 1:
            command = f"{command} with `--set train.seed=S`, S in {', '.join(map(str, seeds))}"
        cost = first["cost"] if first["metrics"] is RANKING else []
        out.append([*first["cells"], *(mean_std([r["values"][i] for r in group]) for i in range(len(first["values"]))),
                    f"{statistics.mean(r['train'] for r in group):.0f}", f"{first['teacher']:.0f}",
                    "/".join(str(r["epochs"]) for r in group), *cost, str(len(group)), command])
    return out


def main(argv: list[str]) -> None:
    by_seed = "--seeds" in argv
    runs = [describe(Path(p)) for p in argv if p != "--seeds" and (Path(p) / "metrics.json").exists()]
    for metrics in (RANKING, POINTWISE):  # one table per kind of protocol
        chosen = [run for run in runs if run["metrics"] is metrics]
        if not chosen:
            continue
        columns = head(metrics)
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for cells in rows(chosen, by_seed):
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
