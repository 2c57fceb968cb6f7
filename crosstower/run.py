"""One experiment end to end: load, split, build, train, evaluate, serve, write the run folder.

The folder's layout and its atomic writing belong to :mod:`crosstower.run_dir`; this module
names no model: every model trains through the trainer (or its own ``fit``), is evaluated
exhaustively, and is served and evaluated again through whatever index its ``build_index``
returns. A run that fails on bad input removes the partial folder it created, never one it was
asked to resume: a refused ``--resume`` keeps the checkpoint it refused to train on.

Under ``torchrun`` every rank loads the data and trains its share; rank 0 alone prepares and
writes the folder, evaluates and serves (:mod:`crosstower.train.distributed`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from crosstower.config import RunConfig
from crosstower.cost import serving_cost
from crosstower.data.dataset import Dataset
from crosstower.data.run_data import data_fingerprint, load_data
from crosstower.data.splits import Split
from crosstower.distill import build_distiller
from crosstower.environment import describe_environment
from crosstower.errors import ConfigError, CrosstowerError
from crosstower.evaluate.model_eval import evaluate_served, evaluate_split
from crosstower.evaluate.pre_ranking import evaluate_labelled
from crosstower.files import replace_dir
from crosstower.models import Recommender, build_model
from crosstower.run_dir import CHECKPOINT, RunFolder, build_serving_index, open_run
from crosstower.train.distributed import SINGLE, Ranks
from crosstower.train.trainer import Trainer, set_seed

log = logging.getLogger("crosstower.run")


def evaluate_part(model: Recommender, dataset: Dataset, split: Split, part: str, config: RunConfig,
                  progress: bool = False) -> tuple[dict, float]:
    """The metrics of ``part`` ("val" or "test") and their seconds: AUC, GAUC and log loss of the
    labelled rows under P4, full-ranking metrics otherwise."""
    if split.protocol == "p4":
        return evaluate_labelled(model, dataset, split, part, config)
    return evaluate_split(model, getattr(split, part), dataset.num_items, config, progress=progress)


def run_experiment(config: RunConfig, out_dir: Path, data_dir: Path | None = None, resume: bool = False,
                   ranks: Ranks = SINGLE) -> dict | None:
    """Train and evaluate ``config``; write the run folder ``out_dir`` atomically.

    ``resume`` continues from the checkpoint of an interrupted run (or of a finished run that its
    time budget stopped); with no checkpoint to continue from it is refused. On a rank other than
    0 the model is trained and nothing is written or returned.
    """
    folder = RunFolder(out_dir)
    if ranks.active and config.distill is not None:
        raise ConfigError("distill: distillation trains in one process; run it without torchrun")
    if ranks.active and config.train.sparse_embeddings:
        raise ConfigError("train.sparse_embeddings: sparse gradients train in one process; run without torchrun "
                          "or set train.sparse_embeddings false")
    if ranks.main:
        folder.check_replaceable()
    if ranks.main and resume and not any(path.exists() for path in folder.checkpoints):
        raise ConfigError(f"--resume: nothing to resume for {out_dir} (no {' or '.join(map(str, folder.checkpoints))}); "
                          f"run without --resume to train from the start")
    torch.set_num_threads(config.train.threads)
    set_seed(config.train.seed)
    log.info("loading %s", config.dataset.name)
    dataset, split = load_data(config, data_dir)
    model = build_model(config.model, dataset, split.protocol, config.train.history_length)
    if not ranks.main:
        ranks.barrier()  # rank 0 has prepared the partial folder (and the checkpoint to resume from)
        if model.trainable:
            Trainer(model, dataset, split, config, folder.partial, data_fingerprint(dataset), ranks).fit(resume=resume)
        return None
    partial = folder.partial
    if partial.exists() and not resume:
        shutil.rmtree(partial)  # starting over: the interrupted run is not wanted
    created = not partial.exists()
    partial.mkdir(parents=True, exist_ok=True)
    kept, checkpoint = folder.file(CHECKPOINT), folder.file(CHECKPOINT, partial=True)
    if resume and kept.exists() and not checkpoint.exists():
        shutil.copy2(kept, checkpoint)
    ranks.barrier()
    try:
        results = _train_and_evaluate(config, dataset, split, model, folder, resume, data_dir, ranks)
    except CrosstowerError:
        if created:  # never delete a partial run (and its checkpoint) that this call did not create
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if not results["timing"].get("out_of_time"):
        checkpoint.unlink(missing_ok=True)
    replace_dir(partial, out_dir)
    return results


def _train_and_evaluate(
    config: RunConfig, dataset: Dataset, split: Split, model: Recommender, folder: RunFolder, resume: bool,
    data_dir: Path | None, ranks: Ranks = SINGLE,
) -> dict:
    fingerprint = data_fingerprint(dataset)
    report, distiller = None, None
    if config.distill is not None:
        # The student trains inside its distiller; the run evaluates, serves and saves the student.
        distiller = build_distiller(config, model, dataset, split, folder.path, folder.partial, data_dir)
    if model.trainable:
        report = Trainer(distiller or model, dataset, split, config, folder.partial, fingerprint, ranks).fit(resume=resume)
    else:
        model.fit(split.train["item"].to_numpy())
    metrics, timing = {}, {"train_seconds": report.seconds if report else 0.0, "processes": ranks.world}
    if distiller is not None:
        timing["distill_setup_seconds"] = distiller.setup_seconds
        if distiller.teacher is not None:
            timing["teacher_train_seconds"] = distiller.teacher.train_seconds
    for part in ("val", "test"):
        metrics[part], timing[f"{part}_eval_seconds"] = evaluate_part(
            model, dataset, split, part, config, progress=True
        )
    model.cpu()  # trained on train.device; indexed, served and saved on the CPU
    index = build_serving_index(model, dataset, split, config)
    index_summary = {"kind": "exhaustive"}
    if index is not None:
        metrics["test_served"], timing["test_served_eval_seconds"] = evaluate_served(
            model, index, split.test, dataset.num_items, config
        )
        index_summary = index.describe()
        timing["index_build_seconds"] = index.build_seconds
    cost = None
    if split.protocol != "p4":
        cost = serving_cost(model, config.model.name, index_summary, split.test, config.train.history_length)
    if report is not None:
        timing.update(epochs=report.epochs_run, best_epoch=report.best_epoch, stopped_early=report.stopped_early,
                      out_of_time=report.out_of_time,
                      resumed_from_epoch=report.resumed_from_epoch)
    results = {
        "model": config.model.name,
        "dataset": dataset.name,
        "protocol": split.protocol,
        "config": config.model_dump(mode="json"),
        "metrics": metrics,
        "timing": timing,
        "index": index_summary,
        "cost": cost,
        "data": fingerprint,
        "training_history": report.history if report else [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": describe_environment(),
    }
    folder.write(config, split, model, index, results)
    return results


def reevaluate(run_dir: Path, data_dir: Path | None = None) -> dict:
    """Recompute the metrics of a finished run from its saved config, split and model; a model
    with its own index is served again from an index rebuilt by the current code."""
    run = open_run(run_dir, data_dir)
    config, dataset, split, model = run.config, run.dataset, run.split, run.model
    metrics = {part: evaluate_part(model, dataset, split, part, config)[0] for part in ("val", "test")}
    index = build_serving_index(model, dataset, split, config)
    if index is not None:
        metrics["test_served"] = evaluate_served(model, index, split.test, dataset.num_items, config)[0]
    return metrics
