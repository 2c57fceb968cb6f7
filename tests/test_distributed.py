"""Data-parallel training on two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crosstower.config import parse_config
from crosstower.data.loaders import load_dataset
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.models import build_model
from crosstower.run import run_experiment
from crosstower.train.distributed import Ranks
from crosstower.train.trainer import Trainer
from tests.test_distill_p4 import p4_config
from tests.test_training import TINY

WORLD = 2


def dssm_config(**train) -> dict:
    """Sampled negatives only (in-batch negatives are each rank's own rows by design); a batch
    of 63 rows splits 32 + 31, and the epoch's last batch is smaller still."""
    return {
        "dataset": {"name": "synthetic", "options": TINY},
        "split": {"protocol": "p2"},
        "model": {"name": "dssm", "embedding_dim": 16, "output_dim": 16, "user_hidden": [32], "item_hidden": [32]},
        "train": {"epochs": 1, "batch_size": 63, "threads": 1, "history_length": 20,
                  "negatives": {"sampler": "uniform", "num": 10, "in_batch": False, "logq": True}, **train},
        "evaluate": {"ks": [10, 50]},
    }


SPARCODE = {"name": "sparcode", "dim": 8, "user_tokens": 2, "item_tokens": 2, "tokenizer_hidden": [16],
            "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 4,
            "quantizer": {"warmup_epochs": 1, "kmeans_examples": 512}}


def _join(rank: int, init_file: Path) -> Ranks:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    return Ranks(rank, WORLD)


def _run_worker(rank: int, init_file: Path, raw: dict, out: Path, writes: Path, resume: bool) -> None:
    """``run_experiment`` on one rank, noting every checkpoint and run folder this rank writes."""
    import crosstower.run_dir as run_dir
    import crosstower.train.trainer as trainer

    def noted(function):
        def wrapper(*args, **kwargs):
            with writes.open("a") as log:
                log.write(f"{rank} {function.__name__}\n")
            return function(*args, **kwargs)
        return wrapper

    trainer.save_checkpoint = noted(trainer.save_checkpoint)
    run_dir.RunFolder.write = noted(run_dir.RunFolder.write)
    ranks = _join(rank, init_file)
    try:
        run_experiment(parse_config(raw), out, resume=resume, ranks=ranks)
    finally:
        dist.destroy_process_group()


def _state_worker(rank: int, init_file: Path, raw: dict, out: Path) -> None:
    """Train with the trainer alone and save this rank's whole state (weights and buffers)."""
    ranks = _join(rank, init_file)
    try:
        config = parse_config(raw)
        dataset = load_dataset("synthetic", None, TINY)
        split = make_split(dataset, "p2")
        torch.manual_seed(rank)  # a different initialisation on each rank: rank 0's must win
        model = build_model(config.model, dataset, "p2", config.train.history_length)
        workdir = out / f"work{rank}"
        workdir.mkdir()
        Trainer(model, dataset, split, config, workdir, ranks=ranks).fit()
        torch.save(model.state_dict(), out / f"state{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path: Path, *args) -> None:
    mp.spawn(worker, args=(tmp_path / "process-group", *args), nprocs=WORLD, join=True)


def _assert_same_weights(single: Path, ranks: Path) -> None:
    one, two = (torch.load(run / "model.pt", weights_only=True)["model"] for run in (single, ranks))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"weight {name}")


def test_one_epoch_on_two_ranks_equals_one_process_and_only_rank_0_writes(tmp_path):
    raw = dssm_config()
    single = run_experiment(parse_config(raw), tmp_path / "single")
    writes = tmp_path / "writes.txt"
    _spawn(_run_worker, tmp_path, raw, tmp_path / "ranks", writes, False)
    _assert_same_weights(tmp_path / "single", tmp_path / "ranks")
    assert single["training_history"][0]["epoch"] == 0
    history = json.loads((tmp_path / "ranks" / "metrics.json").read_text())["training_history"]
    # The logged loss is the mean over every rank's rows: one process's.
    assert history[0]["loss"] == pytest.approx(single["training_history"][0]["loss"], rel=1e-4)
    assert history[0]["examples"] == single["training_history"][0]["examples"]  # counted over every rank
    assert sorted(set(writes.read_text().split("\n")) - {""}) == ["0 save_checkpoint", "0 write"]


def test_pointwise_training_on_two_ranks_equals_one_process(tmp_path):
    """Protocol P4: labelled rows (with their per-row statistics) shared out like examples."""
    raw = p4_config(tmp_path, "dssm")
    raw["train"]["batch_size"] = 63
    run_experiment(parse_config(raw), tmp_path / "single")
    _spawn(_run_worker, tmp_path, raw, tmp_path / "ranks", tmp_path / "writes.txt", False)
    _assert_same_weights(tmp_path / "single", tmp_path / "ranks")


def test_two_ranks_resume_a_run_stopped_by_its_budget(tmp_path):
    """Stopped after its first epoch (a budget of a microminute), then resumed to three epochs on two
    ranks: every rank reads the checkpoint rank 0 kept, and the run trains on to the end."""
    out = tmp_path / "run"
    run_experiment(parse_config(dssm_config(epochs=3, max_minutes=1e-6)), out)
    assert (out / "checkpoint.pt").exists()
    _spawn(_run_worker, tmp_path, dssm_config(epochs=3), out, tmp_path / "writes.txt", True)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["timing"]["resumed_from_epoch"] == 1 and saved["timing"]["epochs"] == 3
    assert saved["timing"]["processes"] == WORLD


def test_sparcode_codebooks_and_k_means_start_are_the_same_on_every_rank(tmp_path):
    raw = copy.deepcopy(dssm_config(epochs=2, batch_size=64))
    raw["model"] = copy.deepcopy(SPARCODE)
    _spawn(_state_worker, tmp_path, raw, tmp_path)
    zero, one = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in range(WORLD))
    assert bool(zero["quantizing"])  # the k-means start ran, and training went on quantised
    for name in zero:
        torch.testing.assert_close(one[name], zero[name], rtol=0, atol=0, msg=f"state {name}")


def test_shards_cover_a_batch_once():
    for size in (1, 2, 5, 63, 64):
        for world in (1, 2, 3):
            rows = [list(range(size))[Ranks(r, world).shard(size)] for r in range(world)]
            assert sum(rows, []) == list(range(size))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_distillation_under_several_ranks_is_refused(tmp_path):
    raw = dssm_config()
    raw["distill"] = {"method": "kd", "teacher": {"run": str(tmp_path / "teacher")}}
    with pytest.raises(ConfigError, match="distill: distillation trains in one process"):
        run_experiment(parse_config(raw), tmp_path / "run", ranks=Ranks(0, 2))


def test_torchrun_runs_the_command_on_two_processes(tmp_path):
    """The command line under torchrun: the process group comes from the environment, rank 0
    prints the table once and writes the folder, and the run records its processes."""
    import shutil
    import subprocess
    import sys

    import yaml

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**dssm_config(batch_size=64), "name": "tiny"}))
    out = tmp_path / "run"
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "crosstower", "run", str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("recall@50") == 1  # one table, from rank 0
    assert json.loads((out / "metrics.json").read_text())["timing"]["processes"] == 2
