"""Training speed of every model family on one data set: training examples per second.

Why: a model's accuracy under a time budget depends on how many epochs the budget buys, and a
slow training step hides behind "it needs more epochs". This times the training step of each
config (its own batch size, negatives and history) on the same data, one after another in one
process, so the rows are comparable.

    python benchmarks/bench_training.py [--threads 1] [--steps 20] [--warmup 3] [CONFIG ...]
    python benchmarks/bench_training.py --steps 2 --warmup 1        # a quick look

Default configs: MovieLens-100K under P2 (every family's ML-100K config, the P1 ones moved to
P2 with ``split.protocol=p2``). What is timed per step is the trainer's step: building the batch
(history gather, negatives, masks), the model's loss, backward and the optimiser's step (Adam, or
with ``train.sparse_embeddings`` lazy Adam on the embedding tables); validation is not. SparCode is timed quantised (its k-means start is run first, untimed); Airbnb's sessions
are set by its epoch hook first, as training does. Writes ``benchmarks/out/training.json``
(``--out``) and prints a markdown table; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
P2 = ["dssm", "mvke", "inttower", "colbert", "cross", "sparcode-dnn", "sparcode-sa", "sparcode-late"]
MOVED_TO_P2 = ["youtubednn", "dual", "airbnb"]
DEFAULT_CONFIGS = ([ROOT / "configs" / f"ml100k-{name}-p2.yaml" for name in P2]
                   + [ROOT / "configs" / f"ml100k-{name}-p1.yaml" for name in MOVED_TO_P2])


def time_config(path: Path, data_dir: Path | None, steps: int, warmup: int, overrides: list[str]) -> dict:
    """Examples per second of ``steps`` training steps of config ``path`` after ``warmup`` steps."""
    from crosstower.config import load_config
    from crosstower.data.run_data import load_data
    from crosstower.models import build_model
    from crosstower.train.optimizer import make_optimizer
    from crosstower.train.trainer import Trainer

    moved = ["split.protocol=p2"] if path.name.endswith("-p1.yaml") else []
    config = load_config(path, [*moved, *overrides])
    dataset, split = load_data(config, data_dir)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, dataset, split.protocol, config.train.history_length)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(model, dataset, split, config, Path(workdir))
    optimizer = make_optimizer(model, config.train)  # as training builds it (train.sparse_embeddings)
    model.begin_epoch(model.warmup_epochs, trainer.examples)  # SparCode: k-means start; Airbnb: sessions
    model.train()
    size = config.train.batch_size
    order = np.random.default_rng([config.train.seed, 0]).permutation(len(trainer.examples))
    batches = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
    if len(batches) < warmup + steps:
        raise SystemExit(f"error: {path}: {len(batches)} full batches, fewer than --warmup + --steps")
    generator = torch.Generator().manual_seed(0)
    seconds = 0.0
    for step, index in enumerate(batches[: warmup + steps]):
        started = time.perf_counter()
        loss, _ = trainer._batch_loss(index, generator, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seconds += time.perf_counter() - started
    examples = steps * size
    return {"config": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "model": config.model.name, "batch": size, "negatives": config.train.negatives.num,
            "in_batch": config.train.negatives.in_batch, "history": config.train.history_length,
            "sparse_embeddings": config.train.sparse_embeddings,
            "steps": steps, "seconds": seconds, "examples_per_second": examples / seconds,
            "epoch_seconds": len(trainer.examples) / (examples / seconds)}


def table(rows: list[dict]) -> str:
    lines = ["| config | model | batch | negatives | optimiser | samples/s | s / epoch (train only) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        negatives = f"{r['negatives']}" + (" + in-batch" if r["in_batch"] else "")
        optimiser = "Adam, lazy Adam on the tables" if r["sparse_embeddings"] else "Adam"
        lines.append(f"| {r['config']} | {r['model']} | {r['batch']} | {negatives} | {optimiser} | "
                     f"{r['examples_per_second']:,.0f} | {r['epoch_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="configs to time (default: every ML-100K family)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data sets folder (default ../shared/data)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override applied to every config (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "training.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from crosstower.errors import CrosstowerError

    rows = []
    for path in args.configs or DEFAULT_CONFIGS:
        try:
            rows.append(time_config(path, args.data_dir, args.steps, args.warmup, args.overrides))
        except CrosstowerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{rows[-1]['config']}: {rows[-1]['examples_per_second']:,.0f} samples/s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
