"""The embedded default: a three-minute tour of crosstower's range on a small synthetic world.

``crosstower run`` with no config trains, in order, a popularity baseline, a two-tower model
(YouTubeDNN), an interaction-rich scorer (MVKE) and the same two-tower model distilled from that
scorer's scores, then prints a table comparing them. The world is the synthetic generator at a
third of its default size (2,000 users, 1,000 items) so that the four fit in about three minutes
on two CPU cores; the full-size comparisons are the ``configs/synthetic-*-p2.yaml`` runs. The same
four runs are spelled out as YAML in ``configs/tour-*.yaml`` (the test suite keeps them equal).
"""

from __future__ import annotations

import copy
from pathlib import Path

DEFAULT_OUT = Path("runs/synthetic-default")

TOUR_DATA = {"name": "synthetic", "options": {"num_users": 2000, "num_items": 1000}}
TOUR_TRAIN = {"batch_size": 512, "lr": 0.005, "patience": 2, "history_length": 50}
TOWER_NEGATIVES = {"sampler": "uniform", "num": 100, "in_batch": True, "logq": True}

# (folder under the output directory, run config); a run's teacher is the folder named in it.
DEFAULT_SUITE: list[tuple[str, dict]] = [
    ("popularity", {"name": "tour-popularity", "dataset": TOUR_DATA, "split": {"protocol": "p2"},
                    "model": {"name": "popularity"}}),
    ("youtubednn", {"name": "tour-youtubednn", "dataset": TOUR_DATA, "split": {"protocol": "p2"},
                    "model": {"name": "youtubednn"},
                    "train": {**TOUR_TRAIN, "epochs": 8, "negatives": TOWER_NEGATIVES}}),
    ("mvke", {"name": "tour-mvke", "dataset": TOUR_DATA, "split": {"protocol": "p2"},
              "model": {"name": "mvke", "kernels": 3, "dim": 64, "expert_hidden": [128], "item_hidden": [128]},
              "train": {**TOUR_TRAIN, "lr": 0.002, "epochs": 6, "batch_size": 256, "history_length": 20,
                        "negatives": {"sampler": "uniform", "num": 30}}}),
    ("youtubednn-distilled", {"name": "tour-youtubednn-distilled", "dataset": TOUR_DATA, "split": {"protocol": "p2"},
                              "model": {"name": "youtubednn"},
                              "train": {**TOUR_TRAIN, "epochs": 8, "negatives": TOWER_NEGATIVES},
                              "distill": {"method": "kd", "teacher": {"run": str(DEFAULT_OUT / "mvke")},
                                          "temperature": 1.0, "terms": {"supervised": 1.0, "kd": 1.0}}}),
]


def default_suite(out: Path = DEFAULT_OUT) -> list[tuple[Path, dict]]:
    """The suite's run folders under ``out`` and their raw configs, teachers read from ``out``."""
    suite = []
    for folder, raw in DEFAULT_SUITE:
        raw = copy.deepcopy(raw)
        teacher = raw.get("distill", {}).get("teacher")
        if teacher is not None:
            teacher["run"] = str(out / Path(teacher["run"]).name)
        suite.append((out / folder, raw))
    return suite
