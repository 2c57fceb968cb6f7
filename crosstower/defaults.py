"""The embedded default: the three baselines on the synthetic default data set under P2.

``crosstower run`` with no config trains these and prints a table comparing them; the same
experiments are spelled out as YAML in ``configs/synthetic-*-p2.yaml``.
"""

from __future__ import annotations

SYNTHETIC_TRAIN = {"epochs": 12, "batch_size": 512, "lr": 0.002, "patience": 2, "history_length": 50}

DEFAULT_SUITE: list[dict] = [
    {"name": "synthetic-popularity-p2", "dataset": {"name": "synthetic"}, "split": {"protocol": "p2"},
     "model": {"name": "popularity"}},
    {"name": "synthetic-dssm-p2", "dataset": {"name": "synthetic"}, "split": {"protocol": "p2"},
     "model": {"name": "dssm"}, "train": {**SYNTHETIC_TRAIN, "negatives": {"sampler": "uniform", "num": 100}}},
    {"name": "synthetic-youtubednn-p2", "dataset": {"name": "synthetic"}, "split": {"protocol": "p2"},
     "model": {"name": "youtubednn"},
     "train": {**SYNTHETIC_TRAIN, "negatives": {"sampler": "uniform", "num": 100, "in_batch": True, "logq": True}}},
]
