"""One experiment end to end: load, split, build, train, evaluate, write the results contract.

Output is atomic: everything is written into a hidden ``.NAME.partial`` folder beside the
requested output folder and renamed into place at the very end, so an interrupted or failed
run never leaves a half-written ``metrics.json``. The partial folder keeps the training
checkpoint so ``--resume`` can continue an interrupted run; a run that fails on bad input
removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from crosstower.config import IndexBudget, RunConfig, dump_config
from crosstower.data.dataset import Dataset
from crosstower.data.features import add_train_statistics
from crosstower.data.loaders import LOADERS, load_dataset
from crosstower.data.splits import Split, make_split
from crosstower.data.batching import UserInput
from crosstower.data.ragged import Ragged
from crosstower.environment import describe_environment
from crosstower.errors import ConfigError, CrosstowerError, DataError
from crosstower.evaluate.model_eval import evaluate_served, evaluate_split
from crosstower.evaluate.pre_ranking import evaluate_labelled
from crosstower.models import EmbeddingRecommender, Popularity, Recommender, SparCode, build_model
from crosstower.models.late_interaction import LateInteraction
from crosstower.train.checkpoint import load_checkpoint
from crosstower.train.trainer import Trainer, set_seed

log = logging.getLogger("crosstower.run")


def default_data_dir() -> Path:
    """``$CROSSTOWER_DATA_DIR``, else ``../shared/data`` where it exists, else ``./data``."""
    env = os.environ.get("CROSSTOWER_DATA_DIR")
    if env:
        return Path(env)
    shared = Path("..") / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def resolve_dataset_path(config: RunConfig, data_dir: Path | None) -> Path | None:
    """``dataset.path`` (relative to the data folder), else the data folder itself: loaders
    accept either the data root or the release's own folder."""
    if config.dataset.name == "synthetic" and config.dataset.path is None:
        return None
    root = data_dir or default_data_dir()
    if config.dataset.path is None:
        return root
    relative = Path(config.dataset.path)
    return relative if relative.is_absolute() else root / relative


def load_data(config: RunConfig, data_dir: Path | None) -> tuple[Dataset, Split]:
    if config.dataset.name not in LOADERS:
        raise DataError(f"dataset.name: unknown dataset '{config.dataset.name}'; valid names: {', '.join(sorted(LOADERS))}")
    path = resolve_dataset_path(config, data_dir)
    if path is not None and not path.exists():
        raise DataError(f"dataset '{config.dataset.name}': directory {path} not found; pass --data-dir")
    dataset = load_dataset(config.dataset.name, path, dict(config.dataset.options))
    p4_settings = {"positive_min": config.split.positive_min, "negative_max": config.split.negative_max,
                   "order": config.split.order}
    split = make_split(dataset, config.split.protocol, config.split.seed,
                       **{k: v for k, v in p4_settings.items() if v is not None})
    if config.split.statistics in ("all_labels", "in_split"):
        log.warning("split.statistics=%s: validation and test rows read statistics of their own labels; "
                    "these figures measure that leak, they are not results", config.split.statistics)
    return with_split_features(dataset, split, config.split.statistics), split


def with_split_features(dataset: Dataset, split: Split, statistics: str | None = "ordered") -> Dataset:
    """The data set a model of ``split`` reads: under P4, with the rating statistics (mean
    rating, log count per user and item; from the training rows, or from every labelled row
    under ``statistics="all_labels"``) as extra numeric fields; otherwise unchanged."""
    if split.protocol != "p4":
        return dataset
    return add_train_statistics(dataset, split, leak_held_out_labels=statistics == "all_labels")


def evaluate_part(model: Recommender, dataset: Dataset, split: Split, part: str, config: RunConfig,
                  progress: bool = False) -> tuple[dict, float]:
    """The metrics of ``part`` ("val" or "test") and their seconds: AUC, GAUC and log loss of the
    labelled rows under P4, full-ranking metrics otherwise."""
    if split.protocol == "p4":
        return evaluate_labelled(model, dataset, split, part, config)
    return evaluate_split(model, getattr(split, part), dataset.num_items, config, progress=progress)


def run_experiment(config: RunConfig, out_dir: Path, data_dir: Path | None = None, resume: bool = False) -> dict:
    """Train and evaluate ``config``; write ``out_dir/metrics.json`` (and friends) atomically."""
    check_output_dir(out_dir)
    torch.set_num_threads(config.train.threads)
    set_seed(config.train.seed)
    log.info("loading %s", config.dataset.name)
    dataset, split = load_data(config, data_dir)
    model = build_model(config.model, dataset, split.protocol, config.train.history_length)
    partial = out_dir.parent / f".{out_dir.name}.partial"
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    kept = out_dir / "checkpoint.pt"  # a finished run stopped by its time budget, to train on
    if resume and kept.exists() and not (partial / "checkpoint.pt").exists():
        shutil.copy2(kept, partial / "checkpoint.pt")
    try:
        results = _train_and_evaluate(config, dataset, split, model, partial, resume)
    except CrosstowerError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not results["timing"].get("out_of_time"):
        (partial / "checkpoint.pt").unlink(missing_ok=True)
    replace_dir(partial, out_dir)
    return results


def check_output_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that crosstower did not write (it would be deleted).

    Every folder crosstower writes (a run, a prepared split) holds its ``split.npz``.
    """
    if out_dir.exists() and not (out_dir / "split.npz").exists():
        raise ConfigError(f"--out {out_dir}: exists and is not a crosstower run folder; choose another --out")


def data_fingerprint(dataset: Dataset) -> dict:
    """What a checkpoint or a saved split must match: sizes and a hash of the id order."""
    digest = hashlib.sha256()
    for ids in (dataset.user_ids, dataset.item_ids):
        digest.update(np.asarray(ids).astype(str).astype("U").tobytes())
    return {"name": dataset.name, "users": dataset.num_users, "items": dataset.num_items,
            "interactions": len(dataset.interactions), "ids_sha256": digest.hexdigest()[:16]}


def _train_and_evaluate(
    config: RunConfig, dataset: Dataset, split: Split, model: Recommender, workdir: Path, resume: bool
) -> dict:
    fingerprint = data_fingerprint(dataset)
    report = None
    if isinstance(model, Popularity):
        model.fit_counts(split.train["item"].to_numpy())
    if model.trainable:
        report = Trainer(model, dataset, split, config, workdir, fingerprint).fit(resume=resume)
    metrics, timing = {}, {"train_seconds": report.seconds if report else 0.0}
    for part in ("val", "test"):
        metrics[part], timing[f"{part}_eval_seconds"] = evaluate_part(
            model, dataset, split, part, config, progress=True
        )
    model.cpu()  # trained on train.device; indexed, served and saved on the CPU
    index_summary = _index_summary(model)
    # A model with its own index is also evaluated as served.
    index = _build_index(model, dataset, split, config)
    if index is not None:
        index.save(workdir / "index")
        metrics["test_served"], timing["test_served_eval_seconds"] = evaluate_served(
            model, index, split.test, dataset.num_items, config
        )
        index_summary = index.describe()
        if isinstance(model, LateInteraction):
            index_summary["scored_fraction"] = index.mean_scored_fraction
        timing["index_build_seconds"] = index.build_seconds
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
        "data": fingerprint,
        "training_history": report.history if report else [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": describe_environment(),
    }
    (workdir / "config.yaml").write_text(dump_config(config))
    split.save(workdir / "split.npz")
    torch.save({"model_name": config.model.name, "model": model.state_dict()}, workdir / "model.pt")
    (workdir / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def _build_index(model: Recommender, dataset: Dataset, split: Split, config: RunConfig):
    """The index that serves ``model``, or None for models served by exhaustive or exact scoring
    and for P4 (pre-ranking) runs, which score given pairs only."""
    if split.protocol == "p4":
        return None
    if isinstance(model, SparCode) and model.quantizer is not None:
        return _build_sparcode_index(model, dataset, split, config)
    if isinstance(model, LateInteraction):
        settings = config.model.index
        log.info("building the late-interaction index (%s)", settings.candidate_index)
        return model.build_index(settings.candidate_index, settings.tokens_per_query, settings.max_candidates,
                                 settings.nprobe, settings.store, settings.nbits)
    return None


def indexing_users(dataset: Dataset, split: Split, config: RunConfig) -> UserInput:
    """The users whose codes a SparCode index holds: every training user, with its whole
    training history (to ``history_length``) as input."""
    users = np.unique(split.train["user"].to_numpy())
    history = Ragged.from_groups(split.train["user"].to_numpy(), split.train["item"].to_numpy(), dataset.num_users)
    return UserInput(torch.from_numpy(users), torch.from_numpy(history.take(users).padded_tail(config.train.history_length)))


def _build_sparcode_index(model: SparCode, dataset: Dataset, split: Split, config: RunConfig):
    """Index the codes of every training user's tokens (or every code, with ``index_codes: all``)."""
    user = indexing_users(dataset, split, config)
    log.info("building the sparse code index from %d training users", len(user))
    settings = config.model
    keep = settings.index_keep.model_dump() if isinstance(settings.index_keep, IndexBudget) else settings.index_keep
    return model.build_index(user, keep=keep, workers=settings.index_workers, codes=settings.index_codes)


def _index_summary(model: Recommender) -> dict:
    """How the model is served; exhaustive scoring until an index is configured."""
    if isinstance(model, EmbeddingRecommender):
        with torch.no_grad():
            dim = model.encode_items(torch.arange(1)).shape[1]
        return {"kind": "exact_inner_product", "dim": int(dim), "bytes": int(model.num_items * dim * 4)}
    return {"kind": "exhaustive"}


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with two renames."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def load_run(run_dir: Path) -> tuple[RunConfig, dict]:
    from crosstower.config import load_config

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise DataError(f"{run_dir}: not a finished run (no metrics.json)")
    return load_config(run_dir / "config.yaml"), json.loads(metrics_path.read_text())


def load_trained(run_dir: Path, data_dir: Path | None = None) -> tuple[RunConfig, dict, Dataset, Split, Recommender]:
    """A finished run's config, saved results, data set (checked against the run's), split and
    trained model, ready to evaluate or serve."""
    config, saved = load_run(run_dir)
    torch.set_num_threads(config.train.threads)
    path = resolve_dataset_path(config, data_dir)
    dataset = load_dataset(config.dataset.name, path, dict(config.dataset.options))
    if data_fingerprint(dataset) != saved.get("data"):
        raise DataError(f"{run_dir}: the data set differs from the one this run was trained on ({path})")
    split = Split.load(run_dir / "split.npz")
    dataset = with_split_features(dataset, split, config.split.statistics)
    model = build_model(config.model, dataset, split.protocol, config.train.history_length)
    model.load_state_dict(load_checkpoint(run_dir / "model.pt", config.model.name)["model"])
    return config, saved, dataset, split, model


def reevaluate(run_dir: Path, data_dir: Path | None = None) -> dict:
    """Recompute the metrics of a finished run from its saved config, split and model; a model
    with its own index is served again from an index rebuilt by the current code."""
    config, _, dataset, split, model = load_trained(run_dir, data_dir)
    metrics = {part: evaluate_part(model, dataset, split, part, config)[0] for part in ("val", "test")}
    index = _build_index(model, dataset, split, config)
    if index is not None:
        metrics["test_served"] = evaluate_served(model, index, split.test, dataset.num_items, config)[0]
    return metrics
