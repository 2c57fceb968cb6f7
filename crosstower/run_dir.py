"""A run folder: its layout, written once by ``crosstower run`` and read by everything after it.

::

    DIR/
      config.yaml     the run's config, every default written out
      split.npz       which interactions trained, validated and tested
      model.pt        the trained weights (the best epoch)
      index/          the index that serves the model, where it has one
      metrics.json    the results contract (metrics, timing, index, data fingerprint, history)
      checkpoint.pt   only in a run stopped by its time budget: ``--resume`` trains on from it

A run is written into the hidden ``.DIR.partial`` beside ``DIR`` (which also holds the training
checkpoint while it trains) and renamed into place at the end, so ``DIR`` is always a finished
run or absent. :func:`open_run` opens a finished run with its data, split, model and index; this
module is the only one that knows the file names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosstower.config import RunConfig, dump_config, load_config
from crosstower.data.batching import UserInput
from crosstower.data.dataset import Dataset
from crosstower.data.ragged import Ragged
from crosstower.data.run_data import data_fingerprint, load_dataset_of, with_split_features
from crosstower.data.splits import Split
from crosstower.errors import ConfigError, DataError
from crosstower.index import Index
from crosstower.models import Recommender, build_model
from crosstower.train.checkpoint import load_checkpoint

CONFIG, SPLIT, MODEL, INDEX, METRICS, CHECKPOINT = (
    "config.yaml", "split.npz", "model.pt", "index", "metrics.json", "checkpoint.pt")


class RunFolder:
    """The paths of one run folder and of the partial folder it is written in."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def partial(self) -> Path:
        """Where the run is written (and its training checkpoint kept) until it is finished."""
        return self.path.parent / f".{self.path.name}.partial"

    def file(self, name: str, partial: bool = False) -> Path:
        return (self.partial if partial else self.path) / name

    @property
    def checkpoints(self) -> list[Path]:
        """Where a run to resume keeps its checkpoint: an interrupted run's partial folder, or a
        finished run that its time budget stopped."""
        return [self.file(CHECKPOINT, partial=True), self.file(CHECKPOINT)]

    def check_replaceable(self) -> None:
        """Refuse to replace a folder that crosstower did not write (it would be deleted).

        Every folder crosstower writes (a run, a prepared split) holds its ``split.npz``.
        """
        if self.path.exists() and not self.file(SPLIT).exists():
            raise ConfigError(f"--out {self.path}: exists and is not a crosstower run folder; choose another --out")

    def write(self, config: RunConfig, split: Split, model: Recommender, index: Any, results: dict) -> None:
        """Write a finished run's files into the partial folder (:meth:`finish` moves it)."""
        (self.partial / CONFIG).write_text(dump_config(config))
        split.save(self.partial / SPLIT)
        torch.save({"model_name": config.model.name, "model": model.state_dict()}, self.partial / MODEL)
        if index is not None:
            index.save(self.partial / INDEX)
        (self.partial / METRICS).write_text(json.dumps(results, indent=2))

    def read_config(self) -> RunConfig:
        if not self.file(METRICS).exists():
            raise DataError(f"{self.path}: not a finished run (no {METRICS})")
        return load_config(self.file(CONFIG))

    def read_metrics(self) -> dict:
        try:
            return json.loads(self.file(METRICS).read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise DataError(f"{self.path}: not a finished run (no {METRICS})") from None
        except ValueError:
            raise DataError(f"{self.path}: {METRICS} is not valid JSON") from None


@dataclass
class Run:
    """A finished run, opened: what it was, what it measured, and the trained model on its data."""

    folder: RunFolder
    config: RunConfig
    metrics: dict
    dataset: Dataset
    split: Split
    model: Recommender

    def index(self, mmap: bool = True) -> Any:
        """The serving index: the saved one, or (for a run saved before its model had one) built
        now; None where the model is served by exhaustive scoring."""
        path = self.folder.file(INDEX)
        if path.exists():
            return Index.load(path, mmap=mmap)
        return build_serving_index(self.model, self.dataset, self.split, self.config)


def training_users(dataset: Dataset, split: Split, config: RunConfig) -> UserInput:
    """Every training user with its whole training history (to ``history_length``) as input:
    the users whose codes a user-side index (SparCode's) holds."""
    users = np.unique(split.train["user"].to_numpy())
    history = Ragged.from_groups(split.train["user"].to_numpy(), split.train["item"].to_numpy(), dataset.num_users)
    return UserInput(torch.from_numpy(users), torch.from_numpy(history.take(users).padded_tail(config.train.history_length)))


def build_serving_index(model: Recommender, dataset: Dataset, split: Split, config: RunConfig) -> Index | None:
    """The index that serves ``model``, or None: for models served by exhaustive scoring, and
    for P4 (pre-ranking) runs, which score given pairs only."""
    if split.protocol == "p4":
        return None
    return model.build_index(training_users(dataset, split, config))


def open_run(run_dir: Path | str, data_dir: Path | None = None) -> Run:
    """A finished run's config, saved results, data set (checked against the one it was trained
    on), split and trained model (in eval mode), ready to evaluate or serve."""
    folder = RunFolder(run_dir)
    config, metrics = folder.read_config(), folder.read_metrics()
    torch.set_num_threads(config.train.threads)
    dataset = load_dataset_of(config, data_dir)
    if data_fingerprint(dataset) != metrics.get("data"):
        raise DataError(f"{folder.path}: the data set differs from the one this run was trained on")
    split = Split.load(folder.file(SPLIT))
    dataset = with_split_features(dataset, split, config.split.statistics)
    model = build_model(config.model, dataset, split.protocol, config.train.history_length)
    model.load_state_dict(load_checkpoint(folder.file(MODEL), config.model.name)["model"])
    return Run(folder, config, metrics, dataset, split, model.eval())
