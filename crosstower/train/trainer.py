"""The training loop: Adam (with an optional plateau learning-rate schedule and an optional moving
average of the weights), sampled softmax batches, early stopping on validation, resumable.

Under protocol P4 (pre-ranking) the same loop trains pointwise instead: each epoch visits the
labelled training rows in shuffled :class:`~crosstower.data.batching.PointwiseBatch` es and
minimises ``model.pointwise_loss`` (never a BCE of its own, so a model can add terms such as
IntTower's contrastive one); validation computes AUC, GAUC and log loss on the labelled
validation rows, and early stopping follows ``evaluate.early_stopping_metric`` in its direction
(log loss falls). Sampled negatives are not drawn: the labels give the negatives.

Determinism: the example order, the negatives and torch's global generator (dropout) of epoch
``e`` are all seeded by ``(seed, e)``, so two runs with one seed train identically, and a run
resumed from the checkpoint of epoch ``e`` continues exactly as if it had never stopped. A
checkpoint records the config and a fingerprint of the data; resuming under a different one is
refused rather than silently stitching two runs together.

Several processes (``torchrun``) train one model together: each takes its share of every global
batch and the gradients are reduced (:mod:`crosstower.train.distributed`); rank 0 validates and
writes the checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from crosstower.config import RunConfig
from crosstower.data.batching import PointwiseRows, TrainBatch, TrainExamples
from crosstower.data.dataset import Dataset
from crosstower.data.features import part_row_statistics
from crosstower.data.sampling import (
    CandidatePool,
    NegativeSampler,
    accidental_hits,
    in_batch_hits,
    popularity_sampler,
    uniform_sampler,
)
from crosstower.data.splits import Split
from crosstower.environment import cpu_has_bfloat16
from crosstower.errors import CheckpointError, ConfigError, TrainingError
from crosstower.evaluate.model_eval import evaluate_split
from crosstower.evaluate.pre_ranking import evaluate_rows, higher_is_better, part_rows
from crosstower.models.base import Recommender
from crosstower.nn.fields import row_values
from crosstower.train.averaging import WeightAverage
from crosstower.train.checkpoint import load_checkpoint, save_checkpoint
from crosstower.train.distributed import (
    SINGLE,
    Ranks,
    any_rank,
    broadcast,
    broadcast_model,
    learned_buffers,
    from_main,
    rank_device,
    reduce_gradients,
    summed,
)
from crosstower.train.optimizer import make_optimizer

log = logging.getLogger("crosstower.train")
PROGRESS_LOG_SECONDS = 60.0  # a log line this often inside an epoch where no progress bar shows


@dataclass
class TrainReport:
    epochs_run: int = 0
    best_epoch: int = -1
    best_value: float = -math.inf
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    out_of_time: bool = False  # stopped by train.max_minutes (resumable with a larger budget)
    resumed_from_epoch: int | None = None


def training_device(name: str) -> torch.device:
    """``train.device`` as a torch device; a GPU that is not there is a config error, not a crash."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' asked for, but torch sees no CUDA device; use 'cpu'")
    return device


# Train settings a resumed run may change: the epoch and time budgets, and the device and thread
# count (a run started on the CPU can go on on a GPU; the loss it optimises is the same).
RESUMABLE_CHANGES = ("epochs", "max_minutes", "device", "threads")


def _comparable_on_resume(config: dict) -> dict:
    train = {k: v for k, v in config.get("train", {}).items() if k not in RESUMABLE_CHANGES}
    return {**config, "train": train}


def _with_defaults(saved: dict) -> dict:
    """A checkpoint's config with the defaults of settings added since it was written, so that it
    resumes under them; one that no longer validates is returned as written (and refused)."""
    try:
        return RunConfig.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def epoch_order(seed: int, epoch: int, size: int, per_epoch: int | None = None) -> np.ndarray:
    """The positions of the examples epoch ``epoch`` trains on, in order.

    Training is a stream of passes over the ``size`` examples, pass ``p`` shuffled by the
    generator seeded ``[seed, p]``; epoch ``e`` is the ``e``-th slice of ``per_epoch`` positions
    of that stream (``per_epoch`` None: the whole pass ``e``, one epoch per pass). A slice that
    crosses the end of a pass takes the rest from the next one, so every example comes once a
    pass whatever the epoch length.
    """
    per_epoch = size if per_epoch is None else per_epoch
    start, parts, wanted = epoch * per_epoch, [], per_epoch
    while wanted > 0 and size > 0:
        pass_index, offset = divmod(start, size)
        taken = np.random.default_rng([seed, pass_index]).permutation(size)[offset : offset + wanted]
        parts.append(taken)
        start, wanted = start + len(taken), wanted - len(taken)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Trainer:
    def __init__(
        self, model: Recommender, dataset: Dataset, split: Split, config: RunConfig, workdir: Path,
        data_fingerprint: dict | None = None, ranks: Ranks = SINGLE,
    ):
        self.model, self.dataset, self.split, self.config = model, dataset, split, config
        self.ranks = ranks
        self.data_fingerprint = data_fingerprint or {}
        self.train_cfg, self.eval_cfg = config.train, config.evaluate
        self.workdir = workdir
        self.examples = TrainExamples(split.train, self.train_cfg.history_length, dataset.num_users)
        counts = np.bincount(self.examples.items, minlength=dataset.num_items)
        # P4: labelled rows to train and validate on; no sampled negatives.
        self.pointwise = split.protocol == "p4"
        self.train_rows: PointwiseRows | None = None
        self.val_rows: PointwiseRows | None = None
        if self.pointwise:
            length = self.train_cfg.history_length
            self.train_rows, self.val_rows = (
                part_rows(split, part, dataset.num_users, length,
                          part_row_statistics(dataset, split, part, config.split.statistics))
                for part in ("train", "val")
            )
        self.sampler = None if self.pointwise else self._make_sampler(counts)
        unigram = torch.as_tensor(counts + 1e-12, dtype=torch.float64)
        self.unigram_log_prob = torch.log(unigram / unigram.sum())
        if self.train_cfg.precision == "bf16" and model.device.type == "cpu" and cpu_has_bfloat16() is False:
            log.warning("train.precision bf16: this CPU has no bfloat16 instructions, so bfloat16 autocast "
                        "emulates them and trains several times slower than fp32 (8x for the cross encoder "
                        "on an AVX2 CPU); set train.precision=fp32 here")

    def _make_sampler(self, counts: np.ndarray) -> NegativeSampler | None:
        negatives = self.train_cfg.negatives
        if negatives.sampler == "none" or negatives.num == 0:
            return None
        if negatives.sampler == "uniform":
            return uniform_sampler(self.dataset.num_items)
        return popularity_sampler(counts, negatives.alpha)

    # ---- batches -------------------------------------------------------------------------
    def make_batch(self, index: np.ndarray, generator: torch.Generator, rows: slice | None = None) -> TrainBatch:
        """The batch of examples ``index``; with ``rows``, only those rows of it (a rank's share),
        their negatives drawn as for the whole batch, so that the shares of all ranks together are
        the batch of one process. In-batch negatives and their log-Q are the share's own."""
        neg_cfg = self.train_cfg.negatives
        negatives = mask = None
        if self.sampler is not None:
            negatives = self.sampler.sample(len(index), neg_cfg.num, generator)
            mask = accidental_hits(torch.from_numpy(self.examples.users[index]),
                                   torch.from_numpy(self.examples.items[index]), negatives)
        if rows is not None:  # a negative that is another share's positive of the same user stays masked
            index = index[rows]
            negatives, mask = (None, None) if negatives is None else (negatives[rows], mask[rows])
        user = self.examples.user_input(index)
        positives = torch.from_numpy(self.examples.items[index])
        if negatives is None:
            negatives = torch.empty(len(index), 0, dtype=torch.long)
            mask = torch.zeros(negatives.shape, dtype=torch.bool)
        in_batch_mask = None
        if neg_cfg.in_batch:
            in_batch_mask = in_batch_hits(user.users, positives)
        positive_log_q = negative_log_q = None
        if neg_cfg.logq:
            pool = CandidatePool(
                self.sampler,
                neg_cfg.num if self.sampler is not None else 0,
                self.unigram_log_prob if neg_cfg.in_batch else None,
                len(index),
            )
            positive_log_q, negative_log_q = pool.log_expected_count(positives), pool.log_expected_count(negatives)
        return TrainBatch(user, positives, negatives, mask, positive_log_q, negative_log_q, in_batch_mask,
                          torch.from_numpy(index), dense_scores=self.train_cfg.candidate_scoring == "auto")

    # ---- loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainReport:
        cfg = self.train_cfg
        torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed)
        self.model.to(training_device(rank_device(cfg.device, self.ranks)))
        if self.ranks.active:
            broadcast_model(self.model)  # every rank starts from rank 0's initialisation
        optimizer = make_optimizer(self.model, cfg)
        metric = self.eval_cfg.early_stopping_metric
        higher = higher_is_better(metric)
        scheduler = self._make_scheduler(optimizer, higher)
        report = TrainReport(best_value=-math.inf if higher else math.inf)
        best_state, bad_epochs = copy.deepcopy(self.model.state_dict()), 0
        average: WeightAverage | None = None
        checkpoint_path = self.workdir / "checkpoint.pt"
        if resume and checkpoint_path.exists():
            report, best_state, bad_epochs, average = self._resume(checkpoint_path, optimizer, scheduler)
        started = time.perf_counter() - report.seconds
        for epoch in range(report.epochs_run, cfg.epochs):
            if report.stopped_early:
                break
            if average is None:
                average = self._start_average(epoch)
            # A budget is also checked between batches, except in a warm-up epoch (see below).
            deadline = None
            if cfg.max_minutes is not None and epoch >= self.model.warmup_epochs:
                deadline = started + 60 * cfg.max_minutes
            epoch_started = time.perf_counter()
            loss, terms, examples = self._train_epoch(epoch, optimizer, average, deadline)
            speed = {"examples": examples, "train_seconds": round(time.perf_counter() - epoch_started, 3)}
            # A warm-up epoch trains another model (SparCode unquantised): never the best, no patience.
            selectable = epoch >= self.model.warmup_epochs
            with average.swapped_in() if average is not None else contextlib.nullcontext():
                metrics = self.validate() if self.ranks.main else {}
                report.seconds = time.perf_counter() - started
                if self.ranks.active:  # rank 0's value and clock: every rank decides alike
                    value, report.seconds = from_main([metrics.get(metric, 0.0), report.seconds], self.model.device)
                    metrics = metrics or {metric: value}
                value = metrics[metric]
                improved = selectable and ((value > report.best_value) if higher else (value < report.best_value))
                if improved:
                    best_state = copy.deepcopy(self.model.state_dict())
            stats = self.model.training_stats()
            lr = optimizer.param_groups[0]["lr"]
            report.history.append({"epoch": epoch, "loss": loss, "lr": lr, **speed, **terms, **stats,
                                   **{f"val_{k}": v for k, v in metrics.items()}})
            report.epochs_run = epoch + 1
            extra = "".join(f" {k} {v:.3g}" for k, v in {**terms, **stats}.items() if not k.endswith("_weight"))
            log.info("epoch %d loss %.4f val %s %.4f lr %.3g%s", epoch, loss, metric, value, lr, extra)
            if improved:
                report.best_value, report.best_epoch, bad_epochs = value, epoch, 0
            elif selectable:
                bad_epochs += 1
            if selectable and scheduler is not None:
                scheduler.step(value)
            out_of_time = self._over_budget(report.seconds)
            if out_of_time and epoch < self.model.warmup_epochs:
                # Stopping now would leave no selectable epoch (nothing to restore, evaluate or index).
                log.warning("train.max_minutes reached in warm-up epoch %d: training on to the first epoch after "
                            "the warm-up (%d)", epoch, self.model.warmup_epochs)
                out_of_time = False
            report.stopped_early = bad_epochs >= cfg.patience or out_of_time
            report.out_of_time = out_of_time and bad_epochs < cfg.patience and epoch + 1 < cfg.epochs
            if not self.ranks.main:
                continue
            save_checkpoint(checkpoint_path, {
                "model_name": self.config.model.name, "model": self.model.state_dict(),
                "optimizer": optimizer.state_dict(), "report": dataclasses.asdict(report),
                "best_state": best_state, "bad_epochs": bad_epochs,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "average": average.state_dict() if average is not None else None,
                "config": self._resumable_config(), "data": self.data_fingerprint,
            })
        self.model.load_state_dict(best_state)
        return report

    def _make_scheduler(self, optimizer: torch.optim.Optimizer, higher: bool) -> ReduceLROnPlateau | None:
        """The plateau schedule of ``train.lr_decay`` (None for a constant rate).

        ``threshold=0``: an epoch counts as an improvement exactly when early stopping says so.
        """
        cfg = self.train_cfg
        if cfg.lr_decay >= 1:
            return None
        return ReduceLROnPlateau(
            optimizer, mode="max" if higher else "min", factor=cfg.lr_decay, patience=cfg.lr_patience, threshold=0.0
        )

    def _start_average(self, epoch: int) -> WeightAverage | None:
        """The moving average of ``train.ema_decay``, started at the first selectable epoch (a
        warm-up epoch trains another model, which the average must not remember)."""
        if self.train_cfg.ema_decay == 0 or epoch < self.model.warmup_epochs:
            return None
        return WeightAverage(self.model, self.train_cfg.ema_decay, self.model.averaged_buffers())

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current model: pointwise under P4, full ranking otherwise."""
        if self.pointwise:
            return evaluate_rows(self.model, self.val_rows)[0]
        return evaluate_split(self.model, self.split.val, self.dataset.num_items, self.config)[0]

    def _over_budget(self, seconds: float) -> bool:
        """Whether ``seconds`` of training (earlier sittings included) exceed ``train.max_minutes``."""
        budget = self.train_cfg.max_minutes
        return budget is not None and seconds > 60 * budget

    def _resumable_config(self) -> dict:
        """The config a resumed run must share: everything but the budgets and where it runs."""
        return _comparable_on_resume(self.config.model_dump(mode="json"))

    def _resume(
        self, path: Path, optimizer: torch.optim.Optimizer, scheduler: ReduceLROnPlateau | None
    ) -> tuple[TrainReport, dict, int, WeightAverage | None]:
        state = load_checkpoint(path, self.config.model.name)
        if _comparable_on_resume(_with_defaults(state.get("config") or {})) != self._resumable_config():
            raise CheckpointError(f"{path}: written under a different config; rerun without --resume")
        if state.get("data") != self.data_fingerprint:
            raise CheckpointError(f"{path}: written for different data; rerun without --resume")
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        average = None
        if state.get("average") is not None:
            average = WeightAverage(self.model, self.train_cfg.ema_decay, self.model.averaged_buffers())
            average.load_state_dict(state["average"])
        report = TrainReport(**state["report"])
        # A run stopped by its time budget goes on when resumed with a larger budget (or none),
        # so a long CPU training can be spread over several sessions; a patience stop stands.
        if report.stopped_early and state["bad_epochs"] < self.train_cfg.patience:
            report.stopped_early = report.out_of_time = self._over_budget(report.seconds)
        report.resumed_from_epoch = report.epochs_run
        log.info("resumed from %s after epoch %d", path, report.epochs_run)
        return report, state["best_state"], state["bad_epochs"], average

    def _train_epoch(
        self, epoch: int, optimizer: torch.optim.Optimizer, average: WeightAverage | None,
        deadline: float | None = None,
    ) -> tuple[float, dict[str, float], int]:
        """One epoch: its mean loss, the mean of every named loss term (``loss_NAME``; a term's
        weight as ``loss_NAME_weight``), so each term of a composite objective is logged, and how
        many examples it trained on (every rank's).

        Past ``deadline`` (a ``time.perf_counter`` value: ``train.max_minutes``) the epoch ends
        after the current batch, so a budget is kept to about one batch, not one epoch. Where no
        progress bar shows (output to a file or a pipe), a log line every minute says how far
        the epoch is."""
        cfg = self.train_cfg
        size = len(self.train_rows) if self.pointwise else len(self.examples)
        order = epoch_order(cfg.seed, epoch, size, cfg.examples_per_epoch)
        epoch_seed = cfg.seed * 1_000_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)  # the negatives: one stream for all ranks
        # dropout and any other use of the global generator: the rank's own stream (rank 0's is one process's)
        torch.manual_seed(epoch_seed + 7_919 * self.ranks.rank)
        self.model.begin_epoch(epoch, self.examples)
        shared: list[torch.Tensor] = []
        if self.ranks.active:  # what the hook set (SparCode's k-means codebooks) is rank 0's on every rank
            broadcast_model(self.model)
            shared = learned_buffers(self.model)
        self.model.train()
        batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        terms: dict[str, float] = {}
        total, progress = 0.0, tqdm(batches, desc=f"epoch {epoch}", leave=False, mininterval=1.0,
                                    disable=None if self.ranks.main else True)
        device = self.model.device
        trained, last_log = 0, time.perf_counter()
        for step, index in enumerate(progress):
            now = time.perf_counter()
            late = deadline is not None and now > deadline and step > 0  # every epoch trains a batch at least
            if deadline is not None and self.ranks.active:
                late = any_rank(late, device)
            if late:
                log.warning("epoch %d: train.max_minutes reached after %d of %d batches; the epoch ends here",
                            epoch, step, len(batches))
                break
            if step > 0 and progress.disable and now - last_log >= PROGRESS_LOG_SECONDS:
                log.info("epoch %d: %d/%d batches, loss %.4f", epoch, step, len(batches), total / max(1, trained))
                last_log = now
            if len(index) < self.ranks.world:  # a last batch too small to give every rank a row
                break
            share = self.ranks.shard(len(index))
            rows = share.stop - share.start
            loss, parts = self._batch_loss(index, generator, share if self.ranks.active else None)
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch}: the loss became {float(loss)}; lower train.lr (now {cfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.ranks.active:
                reduce_gradients(self.model, rows / len(index))
            optimizer.step()
            if self.ranks.active:  # buffers a step changed (codebooks) stay rank 0's everywhere
                broadcast(shared)
            if average is not None:
                average.update()
            total += float(loss.detach()) * rows
            trained += rows
            for name, value in parts.items():
                terms[name] = terms.get(name, 0.0) + value * rows
        if self.ranks.active:  # the epoch's mean loss and terms over every rank's rows
            names = sorted(terms)
            total, trained, *sums = summed([total, trained, *(terms[n] for n in names)], device)
            terms = dict(zip(names, sums))
        size = max(1, trained)
        return total / size, {f"loss_{name}": value / size for name, value in terms.items()}, int(trained)

    def _batch_loss(self, index: np.ndarray, generator: torch.Generator,
                    share: slice | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss (and its named terms) of examples ``index``, or of their rows ``share``."""
        if self.pointwise:
            batch = self.train_rows.batch(index if share is None else index[share])
        else:
            batch = self.make_batch(index, generator, share)
        batch = batch.to(self.model.device)
        autocast = torch.autocast(self.model.device.type, dtype=torch.bfloat16,
                                  enabled=self.train_cfg.precision == "bf16")
        rows = row_values(self.model, batch.row_values()) if self.pointwise else contextlib.nullcontext()
        with autocast, rows:
            return self.model.pointwise_loss(batch) if self.pointwise else self.model.loss(batch)
