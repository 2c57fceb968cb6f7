"""The training loop: Adam, sampled softmax batches, early stopping on validation, resumable.

Determinism: the example order and the negatives of epoch ``e`` come from generators seeded by
``(seed, e)``, so two runs with one seed train identically, and a run resumed from the
checkpoint of epoch ``e`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crosstower.config import RunConfig
from crosstower.data.batching import TrainBatch, TrainExamples
from crosstower.data.dataset import Dataset
from crosstower.data.sampling import (
    CandidatePool,
    NegativeSampler,
    accidental_hits,
    popularity_sampler,
    uniform_sampler,
)
from crosstower.data.splits import Split
from crosstower.evaluate.model_eval import evaluate_model
from crosstower.models.base import Recommender
from crosstower.train.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("crosstower.train")


@dataclass
class TrainReport:
    epochs_run: int = 0
    best_epoch: int = -1
    best_value: float = -math.inf
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from_epoch: int | None = None


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    def __init__(self, model: Recommender, dataset: Dataset, split: Split, config: RunConfig, workdir: Path):
        self.model, self.dataset, self.split, self.config = model, dataset, split, config
        self.train_cfg, self.eval_cfg = config.train, config.evaluate
        self.workdir = workdir
        self.examples = TrainExamples(split.train, self.train_cfg.history_length, dataset.num_users)
        counts = np.bincount(self.examples.items, minlength=dataset.num_items)
        self.sampler = self._make_sampler(counts)
        unigram = torch.as_tensor(counts + 1e-12, dtype=torch.float64)
        self.unigram_log_prob = torch.log(unigram / unigram.sum())

    def _make_sampler(self, counts: np.ndarray) -> NegativeSampler | None:
        negatives = self.train_cfg.negatives
        if negatives.sampler == "none" or negatives.num == 0:
            return None
        if negatives.sampler == "uniform":
            return uniform_sampler(self.dataset.num_items)
        return popularity_sampler(counts, negatives.alpha)

    # ---- batches -------------------------------------------------------------------------
    def make_batch(self, index: np.ndarray, generator: torch.Generator) -> TrainBatch:
        neg_cfg = self.train_cfg.negatives
        user = self.examples.user_input(index)
        positives = torch.from_numpy(self.examples.items[index])
        if self.sampler is not None:
            negatives = self.sampler.sample(len(index), neg_cfg.num, generator)
            mask = accidental_hits(user.users, positives, negatives)
        else:
            negatives = torch.empty(len(index), 0, dtype=torch.long)
            mask = torch.zeros(negatives.shape, dtype=torch.bool)
        in_batch_mask = None
        if neg_cfg.in_batch:
            in_batch_mask = accidental_hits(user.users, positives, positives[None, :].expand(len(index), -1))
        positive_log_q = negative_log_q = None
        if neg_cfg.logq:
            pool = CandidatePool(
                self.sampler,
                neg_cfg.num if self.sampler is not None else 0,
                self.unigram_log_prob if neg_cfg.in_batch else None,
                len(index),
            )
            positive_log_q, negative_log_q = pool.log_expected_count(positives), pool.log_expected_count(negatives)
        return TrainBatch(user, positives, negatives, mask, positive_log_q, negative_log_q, in_batch_mask)

    # ---- loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainReport:
        cfg = self.train_cfg
        torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        report, best_state, bad_epochs = TrainReport(), copy.deepcopy(self.model.state_dict()), 0
        checkpoint_path = self.workdir / "checkpoint.pt"
        start_epoch = 0
        if resume and checkpoint_path.exists():
            state = load_checkpoint(checkpoint_path, self.config.model.name)
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            report, best_state, bad_epochs = state["report"], state["best_state"], state["bad_epochs"]
            start_epoch = report.epochs_run
            report.resumed_from_epoch = start_epoch
            log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)
        started = time.perf_counter() - report.seconds
        for epoch in range(start_epoch, cfg.epochs):
            loss = self._train_epoch(epoch, optimizer)
            metrics, _ = evaluate_model(
                self.model, self.split.val, self.dataset.num_items, cfg.history_length,
                self.eval_cfg.ks, self.eval_cfg.user_batch, self.eval_cfg.item_chunk,
            )
            value = metrics[self.eval_cfg.early_stopping_metric]
            report.history.append({"epoch": epoch, "loss": loss, **{f"val_{k}": v for k, v in metrics.items()}})
            report.epochs_run = epoch + 1
            log.info("epoch %d loss %.4f val %s %.4f", epoch, loss, self.eval_cfg.early_stopping_metric, value)
            if value > report.best_value:
                report.best_value, report.best_epoch, bad_epochs = value, epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                bad_epochs += 1
            report.seconds = time.perf_counter() - started
            out_of_time = cfg.max_minutes is not None and report.seconds > 60 * cfg.max_minutes
            report.stopped_early = bad_epochs >= cfg.patience or out_of_time
            save_checkpoint(checkpoint_path, {
                "model_name": self.config.model.name, "model": self.model.state_dict(),
                "optimizer": optimizer.state_dict(), "report": report,
                "best_state": best_state, "bad_epochs": bad_epochs,
            })
            if report.stopped_early:
                break
        self.model.load_state_dict(best_state)
        return report

    def _train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> float:
        cfg = self.train_cfg
        self.model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.examples))
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        total, progress = 0.0, tqdm(batches, desc=f"epoch {epoch}", leave=False, mininterval=1.0, disable=None)
        for index in progress:
            batch = self.make_batch(index, generator)
            loss, _ = self.model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        return total / max(1, len(order))
