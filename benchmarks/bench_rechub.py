"""Training speed of torch-rechub's DSSM against crosstower's DSSM, at equal sizes on MovieLens-100K.

Why: crosstower trains its towers with a loop of its own (one user encoding per training example,
each distinct item of a batch encoded once, a softmax over the sampled negatives). Whether that
is fast is only known against a library that people use for the same model. This runs both on
the same training examples, with the same tower sizes, batch, number of uniform negatives per
positive and torch thread count, alternately in one run on one machine, so the ratio it prints
is not a comparison across machines or days.

    python benchmarks/bench_rechub.py [--threads 1] [--steps 20] [--repeats 3] [--batch 512] [--negatives 200]
    python benchmarks/bench_rechub.py --quick      # a smoke run: a few small steps each

What is measured: training examples per second (samples/s). A sample is one training
interaction of the ML-100K P1 split (configs/ml100k-dssm-p1.yaml, crosstower's loading) trained
against --negatives uniformly drawn items. Both sides visit the examples in the same order
(Trainer._train_epoch's permutation) and time --steps batches of --batch examples per repeat,
after --warmup steps, batch building (history gather, negative draws) included on both sides;
validation, evaluation, start-up and data loading are never timed. --steps 0 times whole epochs.
Repeats alternate between the sides.

* crosstower: the body of Trainer._train_epoch, step by step (Trainer._batch_loss: history,
  uniform negatives, accidental-hit mask, logQ, listwise softmax; then zero_grad, backward,
  Adam.step), without its progress bar; with --steps 0, Trainer._train_epoch itself.
* torch-rechub "pointwise": torch_rechub.models.matching.DSSM trained by MatchTrainer mode=0
  (BCE), the DSSM recipe of its examples: each example becomes 1 positive row and --negatives
  negative rows (uniform items, label 0), so a step of --batch examples holds
  batch x (1 + negatives) rows, each through both towers.
* torch-rechub "inbatch": the same DSSM, MatchTrainer mode=0 with in_batch_neg=True and
  in_batch_neg_ratio=--negatives: a softmax over the positive and --negatives of the other rows'
  positives (not uniform over the catalogue; needs --negatives < --batch). DSSM has no list-wise
  form (mode=2): its forward returns one sigmoid score per row.

The torch-rechub side is MatchTrainer.train_one_epoch over batches that this script builds with
numpy as they are consumed; its own pipeline (generate_seq_feature_match, a DataLoader collating
row by row) would materialise 14M rows at 200 negatives, so this favours torch-rechub.

torch-rechub is not a dependency of crosstower: it is installed in a virtualenv of its own
(--venv, made on first use: torch==2.13.0 first, the CPU wheel on this disk, then
torch-rechub==0.9.0) and runs there as a worker process (this file, --worker), reading the
examples that crosstower loaded from a file and reporting its timings as JSON lines.

Writes benchmarks/out/bench_rechub.json (--out) and prints a markdown table. Run it alone on the
machine: at the defaults, 1 thread, a torch-rechub point-wise step (102,912 rows) took about 7 s
and 2.7 GB on a shared 2-core machine, so the whole run takes about 8 minutes, most of it there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

# crosstower is imported inside the functions that use it: this file also runs as the
# torch-rechub worker, in a virtualenv where crosstower is not installed.

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "ml100k-dssm-p1.yaml"
DEFAULT_VENV = ROOT / "benchmarks" / "out" / "rechub-venv"
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "bench_rechub.json"
TORCH_PIN, RECHUB_PIN = "2.13.0", "0.9.0"
RECHUB_MODES = ("pointwise", "inbatch")
ITEM_ID, HISTORY = "item_id", "hist_item_id"
SUPPORTED_KINDS = ("categorical", "multi_categorical")
FULL = {"steps": 20, "warmup": 2, "repeats": 3, "batch": 512, "negatives": 200}
QUICK = {"steps": 2, "warmup": 1, "repeats": 1, "batch": 64, "negatives": 20}
VERSION_PROBE = (
    "import importlib.metadata as m, json\n"
    "try: print(json.dumps({n: m.version(n) for n in ('torch', 'torch-rechub')}))\n"
    "except m.PackageNotFoundError: print('{}')"
)


class BenchError(Exception):
    """A problem with this benchmark's input or environment, printed as one line."""


# ---- the order both sides train in --------------------------------------------------------


class BatchCursor:
    """Batches of example positions: epoch ``e`` visits the examples in
    ``default_rng([seed, e]).permutation`` (as Trainer._train_epoch does); ``take`` goes on where
    the previous call stopped, with full batches only; ``take(0)`` is the next whole epoch."""

    def __init__(self, size: int, batch: int, seed: int):
        self.size, self.batch, self.seed = size, batch, seed
        self.epoch, self.pending = -1, []

    def take(self, steps: int) -> list[np.ndarray]:
        if steps == 0:
            return self._next_epoch(full_only=False)
        out = []
        while len(out) < steps:
            if not self.pending:
                self.pending = self._next_epoch(full_only=True)
            out.append(self.pending.pop(0))
        return out

    def _next_epoch(self, full_only: bool) -> list[np.ndarray]:
        self.epoch += 1
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        stop = self.size - self.batch + 1 if full_only else self.size
        return [order[i : i + self.batch] for i in range(0, stop, self.batch)]


def timed(seconds: float, batches: list[np.ndarray], rows: int, loss: float) -> dict:
    examples = int(sum(len(b) for b in batches))
    return {"seconds": seconds, "steps": len(batches), "examples": examples, "rows": rows,
            "samples_per_s": examples / seconds, "loss": loss}


# ---- the torch-rechub worker (runs in the rechub virtualenv) -------------------------------


@dataclass
class RechubData:
    """The training examples as crosstower loaded them, in the codes both sides embed."""

    users: np.ndarray  # [N] user index of each example
    items: np.ndarray  # [N] item index of its positive
    history: np.ndarray  # [N, L] item_id codes of the user's earlier items, 0 = padding
    user_tables: dict[str, np.ndarray]  # field -> codes per user index
    item_tables: dict[str, np.ndarray]  # field -> codes (or [n, slots] codes) per item index
    meta: dict

    @classmethod
    def load(cls, path: Path) -> RechubData:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            return cls(f["users"], f["items"], f["history"],
                       {n: f[f"user:{n}"] for n in meta["user_fields"]},
                       {n: f[f"item:{n}"] for n in meta["item_fields"]}, meta)

    def inputs(self, rows: np.ndarray, items: np.ndarray) -> dict[str, torch.Tensor]:
        """The x_dict of examples ``rows`` scored against ``items`` (one item per row)."""
        users = self.users[rows]
        x = {name: torch.from_numpy(table[users]) for name, table in self.user_tables.items()}
        x[HISTORY] = torch.from_numpy(self.history[rows])
        x.update({name: torch.from_numpy(table[items]) for name, table in self.item_tables.items()})
        return x


class RechubBatches:
    """What MatchTrainer.train_one_epoch iterates: (x_dict, y) per batch, built when consumed.
    Point-wise: the batch's positives (label 1), then each example's negatives (label 0)."""

    def __init__(self, data: RechubData, batches: list[np.ndarray], negatives: int, pointwise: bool,
                 generator: torch.Generator):
        self.data, self.batches, self.negatives = data, batches, negatives
        self.pointwise, self.generator, self.rows = pointwise, generator, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for index in self.batches:
            x, y = self._pointwise(index) if self.pointwise else self._inbatch(index)
            self.rows += len(y)
            yield x, y

    def _pointwise(self, index: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        num_items = self.data.meta["num_items"]
        drawn = torch.randint(0, num_items, (len(index), self.negatives), generator=self.generator).numpy()
        rows = np.concatenate([index, np.repeat(index, self.negatives)])
        items = np.concatenate([self.data.items[index], drawn.reshape(-1)])
        labels = torch.cat([torch.ones(len(index)), torch.zeros(drawn.size)])
        return self.data.inputs(rows, items), labels

    def _inbatch(self, index: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.data.inputs(index, self.data.items[index]), torch.ones(len(index))


def rechub_features(meta: dict, dim: int) -> tuple[list, list]:
    """torch-rechub features mirroring crosstower's tower inputs: a categorical field is a
    SparseFeature, a multi-categorical one a mean-pooled SequenceFeature; the history is a
    mean-pooled SequenceFeature sharing the item_id table."""
    from torch_rechub.basic.features import SequenceFeature, SparseFeature

    def feature(name: str, spec: dict):
        if spec["kind"] == "categorical":
            return SparseFeature(name, spec["vocab"], dim, padding_idx=0)
        return SequenceFeature(name, spec["vocab"], dim, pooling="mean", padding_idx=0)

    history = SequenceFeature(HISTORY, meta["item_fields"][ITEM_ID]["vocab"], dim, pooling="mean",
                              shared_with=ITEM_ID, padding_idx=0)
    users = [feature(n, s) for n, s in meta["user_fields"].items()] + [history]
    return users, [feature(n, s) for n, s in meta["item_fields"].items()]


def rechub_trainer(meta: dict, settings: dict):
    """DSSM and its MatchTrainer (mode 0; in-batch negatives in mode "inbatch")."""
    from torch_rechub.models.matching import DSSM
    from torch_rechub.trainers import MatchTrainer

    model_cfg, inbatch = meta["model"], settings["mode"] == "inbatch"
    user_features, item_features = rechub_features(meta, model_cfg["embedding_dim"])
    out = model_cfg["output_dim"]
    model = DSSM(user_features, item_features, temperature=model_cfg["temperature"],
                 user_params={"dims": [*model_cfg["user_hidden"], out]},
                 item_params={"dims": [*model_cfg["item_hidden"], out]})
    return MatchTrainer(model, mode=0, in_batch_neg=inbatch,
                        in_batch_neg_ratio=settings["negatives"] if inbatch else None,
                        sampler_seed=settings["seed"] if inbatch else None,
                        optimizer_params={"lr": settings["lr"], "weight_decay": 0.0}, device="cpu")


def worker(data_path: Path, settings: dict) -> None:
    """Answer each JSON request line ``{"steps": n}`` on stdin with one timed run as a JSON line.
    Everything torch-rechub prints goes to stderr, so stdout carries only the answers."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    import torch_rechub

    data = RechubData.load(data_path)
    trainer = rechub_trainer(data.meta, settings)
    generator = torch.Generator().manual_seed(settings["seed"])
    cursor = BatchCursor(len(data.items), settings["batch"], settings["seed"])
    parameters = sum(p.numel() for p in trainer.model.parameters())

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    send({"ready": True, "version": torch_rechub.__version__, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "parameters": parameters, "model": repr(trainer.model)})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        batches = cursor.take(request["steps"])
        loader = RechubBatches(data, batches, settings["negatives"], settings["mode"] == "pointwise", generator)
        start = time.perf_counter()
        loss = trainer.train_one_epoch(loader)
        send(timed(time.perf_counter() - start, batches, loader.rows, float(loss)))


# ---- the sides, as the benchmark drives them ----------------------------------------------


class CrosstowerSide:
    """crosstower's DSSM and Trainer, in this process."""

    def __init__(self, config, dataset, split, workdir: Path):
        from crosstower.models import build_model
        from crosstower.train.trainer import Trainer, set_seed

        set_seed(config.train.seed)
        self.config = config
        self.model = build_model(config.model, dataset, split.protocol, config.train.history_length)
        self.trainer = Trainer(self.model, dataset, split, config, workdir)
        cfg = config.train
        if cfg.batch_size > len(self.trainer.examples):
            raise BenchError(f"--batch {cfg.batch_size} exceeds the {len(self.trainer.examples)} training examples")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.cursor = BatchCursor(len(self.trainer.examples), cfg.batch_size, cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def run(self, steps: int) -> dict:
        if steps == 0:
            return self._epoch()
        from crosstower.errors import TrainingError

        batches = self.cursor.take(steps)
        self.model.train()
        total, start = 0.0, time.perf_counter()
        for index in batches:  # Trainer._train_epoch's step, on one process
            loss, _ = self.trainer._batch_loss(index, self.generator, None)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss became {float(loss)}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
        return timed(time.perf_counter() - start, batches, sum(len(b) for b in batches), total / len(batches))

    def _epoch(self) -> dict:
        batches = self.cursor.take(0)  # the order _train_epoch(epoch) visits
        start = time.perf_counter()
        loss, _ = self.trainer._train_epoch(self.cursor.epoch, self.optimizer, None)
        return timed(time.perf_counter() - start, batches, sum(len(b) for b in batches), loss)

    def reads(self) -> str:
        model, m = self.model, self.config.model
        items = ", ".join(model.item_fields.names)
        users = ", ".join(model.user_fields.names) if model.user_fields else "no user field"
        hist = self.config.train.history_length
        return (f"user tower: {users} + mean of the last {hist} training items (each the sum of its {items} "
                f"embeddings), MLP {model.user_input_dim}-{'-'.join(map(str, m.user_hidden))}-{m.output_dim}; "
                f"item tower: {items} (genres mean-pooled), MLP {model.item_input_dim}-"
                f"{'-'.join(map(str, m.item_hidden))}-{m.output_dim}; cosine / {m.temperature}, softmax over the "
                f"positive and {self.config.train.negatives.num} uniform negatives (accidental hits masked, logQ)")


class RechubSide:
    """torch-rechub's DSSM in its worker process."""

    def __init__(self, python: Path, data_path: Path, settings: dict):
        self.mode = settings["mode"]
        threads = str(settings["threads"])
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1",
               "PYTHONNOUSERSITE": "1"}
        command = [str(python), str(Path(__file__).resolve()), "--worker", str(data_path), json.dumps(settings)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._receive()

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise BenchError(f"the torch-rechub worker ({self.mode}) exited with status {self.process.wait()}; "
                             f"its error is above")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.process.stdin.flush()
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()

    def reads(self, meta: dict, negatives: int) -> str:
        model = meta["model"]
        users, items = ", ".join([*meta["user_fields"], HISTORY]), ", ".join(meta["item_fields"])
        dims = {side: [*model[f"{side}_hidden"], model["output_dim"]] for side in ("user", "item")}
        how = (f"MatchTrainer mode=0 (BCE on sigmoid(cosine)), each example as 1 positive row + {negatives} "
               f"uniform negative rows" if self.mode == "pointwise" else
               f"MatchTrainer mode=0, in_batch_neg=True, in_batch_neg_ratio={negatives} (cross-entropy over the "
               f"positive and {negatives} other rows' positives)")
        return (f"DSSM; user features: {users} (SparseFeature each; {HISTORY}: SequenceFeature, mean pooling, "
                f"shared with item_id, the same last-{meta['history_length']} items); item features: {items} "
                f"(genres: SequenceFeature, mean pooling); MLP dims user {dims['user']}, item {dims['item']}, "
                f"BatchNorm+ReLU after each layer; {how}")


# ---- setting up -----------------------------------------------------------------------------


def installed_versions(python: Path) -> dict:
    if not python.exists():
        return {}
    done = subprocess.run([str(python), "-c", VERSION_PROBE], capture_output=True, text=True)
    return json.loads(done.stdout or "{}") if done.returncode == 0 else {}


def pinned(versions: dict) -> bool:
    return versions.get("torch", "").split("+")[0] == TORCH_PIN and versions.get("torch-rechub") == RECHUB_PIN


def rechub_python(venv: Path) -> tuple[Path, dict]:
    """The interpreter of ``venv`` with torch==TORCH_PIN and torch-rechub==RECHUB_PIN, installed
    there first if need be (torch first: any other torch spec downloads a CUDA build)."""
    python = venv / "bin" / "python"
    versions = installed_versions(python)
    if pinned(versions):
        return python, versions
    print(f"setting up {venv}: torch=={TORCH_PIN}, then torch-rechub=={RECHUB_PIN}", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for spec in (f"torch=={TORCH_PIN}", f"torch-rechub=={RECHUB_PIN}"):
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", spec], stdout=sys.stderr)
        if done.returncode != 0:
            raise BenchError(f"pip install {spec} failed in {venv} (status {done.returncode})")
    versions = installed_versions(python)
    if not pinned(versions):
        raise BenchError(f"{venv} has {versions} after installing, not torch {TORCH_PIN} and torch-rechub {RECHUB_PIN}")
    return python, versions


def load_run(args: argparse.Namespace):
    """crosstower's config (with this run's sizes) and its data set and split."""
    from crosstower.config import load_config
    from crosstower.data.run_data import load_data

    if not args.config.is_file():
        raise BenchError(f"config {args.config} not found")
    overrides = [f"train.batch_size={args.batch}", f"train.negatives.num={args.negatives}",
                 "train.negatives.sampler=uniform", f"train.threads={args.threads}"]
    config = load_config(args.config, overrides)
    if config.model.name != "dssm":
        raise BenchError(f"{args.config}: model.name is '{config.model.name}'; this compares DSSM")
    if args.user_id and config.model.user_fields is not None and "user_id" not in config.model.user_fields:
        config = load_config(args.config, [*overrides, f"model.user_fields={['user_id', *config.model.user_fields]}"])
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise BenchError(f"data directory {args.data_dir} not found")
    dataset, split = load_data(config, args.data_dir)
    return config, dataset, split


def field_specs(embedder) -> dict:
    specs = {}
    for name in embedder.names:
        kind = embedder.kinds[name]
        if kind.value not in SUPPORTED_KINDS:
            raise BenchError(f"field '{name}' is {kind.value}; the comparison mirrors only "
                             f"{', '.join(SUPPORTED_KINDS)} fields")
        specs[name] = {"kind": kind.value, "vocab": embedder.embeddings[name].num_embeddings}
    return specs


def export_examples(side: CrosstowerSide, path: Path) -> dict:
    """Write what the torch-rechub worker reads (crosstower's examples, histories and field
    codes) to ``path``; return its metadata."""
    model, examples, config = side.model, side.trainer.examples, side.config
    if ITEM_ID not in model.item_fields.names:
        raise BenchError("the item tower reads no item_id; the history has no table to share")
    history = examples.user_input(np.arange(len(examples))).history.numpy()
    item_codes = model.item_fields.values_item_id.numpy()
    codes = np.where(history >= 0, item_codes[history.clip(0)], 0)
    user_names = model.user_fields.names if model.user_fields else []
    meta = {"num_items": side.trainer.dataset.num_items, "history_length": config.train.history_length,
            "user_fields": field_specs(model.user_fields) if model.user_fields else {},
            "item_fields": field_specs(model.item_fields),
            "model": {k: getattr(config.model, k) for k in ("embedding_dim", "output_dim", "user_hidden",
                                                            "item_hidden", "temperature")}}
    arrays = {f"user:{n}": getattr(model.user_fields, f"values_{n}").numpy() for n in user_names}
    arrays |= {f"item:{n}": getattr(model.item_fields, f"values_{n}").numpy() for n in model.item_fields.names}
    np.savez(path, users=examples.users, items=examples.items, history=codes, meta=np.array(json.dumps(meta)), **arrays)
    return meta


# ---- measuring and reporting ----------------------------------------------------------------


def measure(sides: dict[str, Any], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Warm every side up, then time ``repeats`` runs of each, side after side."""
    for name, side in sides.items():
        print(f"warm-up: {name}, {args.warmup} step(s)", file=sys.stderr)
        side.run(args.warmup)
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, side in sides.items():
            result = side.run(args.steps)
            runs[name].append(result)
            print(f"repeat {repeat + 1}/{args.repeats}: {name} {result['samples_per_s']:.0f} samples/s "
                  f"({result['steps']} steps, {result['seconds']:.2f} s)", file=sys.stderr)
    return runs


def summary(runs: list[dict]) -> dict:
    rates = [r["samples_per_s"] for r in runs]
    return {"samples_per_s": {"mean": statistics.fmean(rates), "min": min(rates), "max": max(rates)},
            "seconds_timed": sum(r["seconds"] for r in runs), "steps_timed": sum(r["steps"] for r in runs),
            "examples_timed": sum(r["examples"] for r in runs), "rows_timed": sum(r["rows"] for r in runs),
            "repeats": runs}


def table(contenders: list[dict], args: argparse.Namespace) -> str:
    lines = ["| library | version | training | samples/s mean (min–max) | seconds timed | steps | threads | batch | "
             "negatives | crosstower / this |", "|---|---|---|---|---|---|---|---|---|---|"]
    reference = contenders[0]["samples_per_s"]["mean"]
    for c in contenders:
        rate = c["samples_per_s"]
        lines.append(f"| {c['library']} | {c['version']} | {c['training']} | {rate['mean']:,.0f} "
                     f"({rate['min']:,.0f}–{rate['max']:,.0f}) | {c['seconds_timed']:.2f} | {c['steps_timed']} | "
                     f"{args.threads} | {args.batch} | {args.negatives} | {reference / rate['mean']:.2f} |")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> None:
    from crosstower.environment import describe_environment, source_revision
    from crosstower.files import write_json

    torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"
    if "inbatch" in args.rechub_modes and args.negatives >= args.batch:
        raise BenchError(f"--rechub-modes inbatch draws negatives from the batch: --negatives ({args.negatives}) "
                         f"must be below --batch ({args.batch})")
    load_start = os.getloadavg()[0]
    config, dataset, split = load_run(args)
    python, versions = rechub_python(args.venv)
    rechub: dict[str, RechubSide] = {}
    with tempfile.TemporaryDirectory(prefix="bench_rechub_") as tmp:
        ct = CrosstowerSide(config, dataset, split, Path(tmp))
        meta = export_examples(ct, Path(tmp) / "examples.npz")
        settings = {"threads": args.threads, "batch": args.batch, "negatives": args.negatives,
                    "seed": config.train.seed, "lr": config.train.lr}
        try:
            for mode in args.rechub_modes:
                rechub[mode] = RechubSide(python, Path(tmp) / "examples.npz", {**settings, "mode": mode})
            runs = measure({"crosstower": ct, **{f"torch-rechub {m}": s for m, s in rechub.items()}}, args)
        finally:
            for side in rechub.values():
                side.close()
    contenders = [{"library": "crosstower", "version": _crosstower_version(), "torch": torch.__version__,
                   "training": "listwise softmax", "reads": ct.reads(),
                   "parameters": sum(p.numel() for p in ct.model.parameters()), **summary(runs["crosstower"])}]
    for mode, side in rechub.items():
        contenders.append({"library": "torch-rechub", "version": side.info["version"], "torch": side.info["torch"],
                           "training": f"DSSM {mode}", "reads": side.reads(meta, args.negatives),
                           "parameters": side.info["parameters"], **summary(runs[f"torch-rechub {mode}"])})
    reference = contenders[0]["samples_per_s"]["mean"]
    for c in contenders:
        c["crosstower_over_this"] = reference / c["samples_per_s"]["mean"]
    report = {"benchmark": "DSSM training speed, crosstower vs torch-rechub, ML-100K P1",
              "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
              "samples": "training examples (one positive interaction with its negatives) per second",
              "timed": "--steps batches per repeat after --warmup steps; batch building included; no validation",
              "rechub_venv": {"path": str(args.venv), **versions},
              "machine": {**describe_environment(), **source_revision()},
              "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
              "contenders": contenders}
    write_json(args.out, report)
    print(table(contenders, args))
    print()
    for c in contenders:
        print(f"- {c['library']} ({c['training']}, {c['parameters']:,} parameters): {c['reads']}")
    print(f"\nwrote {args.out}")


def _crosstower_version() -> str:
    import crosstower

    return crosstower.__version__


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--steps", type=int,
                        help=f"batches timed per repeat; 0: one whole epoch (default {FULL['steps']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per side first (default {FULL['warmup']})")
    parser.add_argument("--repeats", type=int, help=f"timed runs per side, alternating (default {FULL['repeats']})")
    parser.add_argument("--batch", type=int, help=f"training examples per step (default {FULL['batch']})")
    parser.add_argument("--negatives", type=int, help=f"negatives per positive (default {FULL['negatives']})")
    parser.add_argument("--rechub-modes", nargs="+", choices=RECHUB_MODES, default=list(RECHUB_MODES),
                        help="how torch-rechub's DSSM trains (default: both)")
    parser.add_argument("--user-id", action="store_true",
                        help="add user_id to the user fields of both sides (the config reads gender, age, occupation)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()) + " unless given")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data-dir", type=Path, default=None, help="data folder (default: crosstower's)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="torch-rechub's virtualenv (made if missing)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.threads, args.batch, args.negatives, args.repeats) < 1 or min(args.steps, args.warmup) < 0:
        parser.error("--threads, --batch, --negatives and --repeats must be positive; --steps and --warmup, "
                     "not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), json.loads(args.worker[1]))
        return 0
    from crosstower.errors import CrosstowerError

    try:
        run_benchmark(args)
    except (BenchError, CrosstowerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
