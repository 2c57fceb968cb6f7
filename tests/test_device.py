"""``train.device``: a run trained on a GPU matches its CPU scores and serves and loads on the CPU.

The CUDA tests skip on machines without a GPU (CI has none); they are what a GPU session runs
before trusting numbers trained there. The CPU tests check the refusals.
"""

import pytest
import torch

from crosstower.config import parse_config
from crosstower.data.batching import eval_user_input
from crosstower.data.loaders import load_dataset
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.models import build_model
from crosstower.evaluate.pre_ranking import evaluate_rows, part_rows
from crosstower.data.run_data import with_split_features
from crosstower.run import run_experiment
from crosstower.run_dir import open_run
from crosstower.train.trainer import Trainer
from tests.helpers import rated_dataset

TINY = {"num_users": 200, "num_items": 120, "num_clusters": 6, "num_segments": 4, "seed": 5}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

# One small configuration per model family (every scorer's forward pass and loss).
MODELS = {
    "twotower-sa": {"name": "twotower", "tokenizer": "sa", "dim": 16},
    "youtubednn": {"name": "youtubednn", "embedding_dim": 16, "output_dim": 16, "user_hidden": [32]},
    "sparcode-sa": {"name": "sparcode", "tokenizer": "sa", "dim": 16, "codebook_size": 16,
                    "vq_warmup_epochs": 1, "kmeans_examples": 2000},
    "alltoall-dnn": {"name": "alltoall", "tokenizer": "dnn", "dim": 16},
    "cross": {"name": "cross", "dim": 16, "heads": 2, "layers": 1},
    "colbert": {"name": "colbert", "dim": 16, "heads": 2, "user_layers": 1, "item_layers": 1,
                "projection_dim": 8},
    "inttower": {"name": "inttower", "embedding_dim": 8, "user_hidden": [16, 8], "item_hidden": [16, 8]},
    "mvke": {"name": "mvke", "kernels": 2, "dim": 8, "expert_hidden": [16], "item_hidden": [16]},
}


def config(model: dict, device: str, protocol: str = "p2", epochs: int = 2):
    return parse_config({
        "dataset": {"name": "synthetic", "options": TINY},
        "split": {"protocol": protocol},
        "model": model,
        "train": {"epochs": epochs, "batch_size": 128, "threads": 1, "history_length": 10, "device": device,
                  "negatives": {"num": 10, "in_batch": True}},
        "evaluate": {"ks": [10], "early_stopping_metric": "auc" if protocol == "p4" else "recall@10"},
    })


def test_device_name_is_validated():
    with pytest.raises(ConfigError, match="train.device"):
        config(MODELS["youtubednn"], "gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.device"):
        run_experiment(config(MODELS["youtubednn"], "cuda", epochs=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@CUDA
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_scores_match_cpu(name):
    dataset = load_dataset("synthetic", None, TINY)
    split = make_split(dataset, "p2")
    torch.manual_seed(0)
    model = build_model(config(MODELS[name], "cpu").model, dataset, "p2", 10).eval()
    user = eval_user_input(split.test, torch.arange(min(16, len(split.test))).numpy(), 10)
    items = torch.arange(dataset.num_items)
    with torch.no_grad():
        on_cpu = model.score(user, items)
        on_gpu = model.cuda().score(user.to("cuda"), items.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)


@CUDA
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_run_trained_on_cuda_serves_and_loads_on_the_cpu(tmp_path, name):
    results = run_experiment(config(MODELS[name], "cuda"), tmp_path / name)
    assert results["timing"]["epochs"] == 2
    assert 0.0 <= results["metrics"]["test"]["recall@10"] <= 1.0
    assert open_run(tmp_path / name).model.device.type == "cpu"


@CUDA
def test_pre_ranking_trains_and_scores_on_cuda(tmp_path):
    dataset = rated_dataset()
    split = make_split(dataset, "p4")
    dataset = with_split_features(dataset, split)
    settings = config(MODELS["inttower"], "cuda", protocol="p4")
    model = build_model(settings.model, dataset, "p4", 10)
    report = Trainer(model, dataset, split, settings, tmp_path).fit()
    metrics = evaluate_rows(model, part_rows(split, "test", dataset.num_users, 10))[0]
    assert report.epochs_run == 2 and model.device.type == "cuda"
    assert 0.0 <= metrics["auc"] <= 1.0
