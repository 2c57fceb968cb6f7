"""SparCode's scores against a per-pair reference, and its loss on a real batch."""

import os

import numpy as np
import pytest
import torch

from crosstower.config import parse_config
from crosstower.data.batching import UserInput, eval_user_input
from crosstower.data.splits import make_split
from crosstower.losses import sampled_softmax
from crosstower.models.sparcode import SparCode, SparsityConfig
from crosstower.models.token_two_tower import TokenTwoTowerConfig
from crosstower.train.trainer import Trainer
from tests.helpers import random_dataset, sparcode_model

torch.set_num_threads(1)


def reference_score(
    model: SparCode, tokens: torch.Tensor, item_tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One pair at a time: sum over the real tokens k of ReLU(MLP([token_k; flattened item
    tokens]) + b), the MLP's first layer plus (A token_k) * (B item) when the encoder has the
    multiplicative term."""
    enc = model.interaction
    weight = torch.cat([enc.token_in.weight, enc.item_in.weight], dim=1)
    scores = torch.zeros(tokens.shape[0], item_tokens.shape[0])
    for u in range(tokens.shape[0]):
        for i in range(item_tokens.shape[0]):
            for k in range(tokens.shape[1]):
                if mask is not None and not mask[u, k]:
                    continue
                x = torch.cat([tokens[u, k], item_tokens[i].flatten()])
                hidden = x @ weight.T + enc.token_in.bias
                if enc.token_gate is not None:
                    hidden = hidden + (enc.token_gate.weight @ tokens[u, k]) * (enc.item_gate.weight @ item_tokens[i].flatten())
                s = enc.rest(hidden).squeeze()
                scores[u, i] += torch.relu(s + model.config.sparsity.bias)
    return scores


def varied_histories(split) -> UserInput:
    """The test users, each repeated with its history cut to 10, 6, 3 and 1 items (padding on the
    left, as batches hold it), so that one-token-per-history-item tokenizers have absent tokens."""
    full = eval_user_input(split.test, np.arange(len(split.test)), 10)
    users, histories = [], []
    for keep in (10, 6, 3, 1):
        history = full.history.clone()
        history[:, : 10 - keep] = -1
        users.append(full.users)
        histories.append(history)
    return UserInput(torch.cat(users), torch.cat(histories))


def randomise_item_bias(model: torch.nn.Module) -> torch.Tensor:
    """Give a model's (zero-initialised) item prior random values, so a test can see it; returns it."""
    with torch.no_grad():
        model.bias.weight.normal_()
    return model.bias.weight.detach().squeeze(-1)


@pytest.mark.parametrize(
    "tokenizer,products,source,item_bias",
    [("dnn", False, "summary", False), ("sa", False, "summary", False), ("dnn", True, "summary", False),
     ("dnn", False, "history", False), ("sa", True, "history", False), ("dnn", False, "history", True)],
)
def test_batched_score_equals_per_pair_reference(tokenizer, products, source, item_bias):
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(0)
    # 8 history tokens out of a history of 10: some users have fewer items, so some tokens are absent
    model = sparcode_model(ds, tokenizer=tokenizer, dim=8, user_tokens=8 if source == "history" else 3, item_tokens=2,
                           tokenizer_hidden=[16], item_hidden=[16], interaction_hidden=[16, 8], quantize=False,
                           sparsity={"bias": -0.05}, max_history=10, sa_layers=1, interaction_products=products,
                           user_tokens_from=source, item_bias=item_bias).eval()
    prior = randomise_item_bias(model) if item_bias else torch.zeros(ds.num_items)
    user = varied_histories(split)
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        batched = model.score(user, items)
        tokens, _, mask = model.user_tokens(user)
        reference = reference_score(model, tokens, model.item_tokenizer(items), mask) + prior
        ranged = model.item_scorer()(user, 3, 11)
    if source == "history":
        assert mask is not None and not mask.all() and mask.any(1).all()
    assert torch.allclose(batched, reference, atol=1e-5)
    assert torch.allclose(ranged, batched[:, 3:11], atol=1e-6)
    assert (batched >= prior).all()


def small_batch(tmp_path, in_batch: bool = False):
    """A random 30-user, 25-item data set and a training batch of 8 rows with 4 sampled negatives
    (and in-batch negatives), for the loss tests of tiny SparCode models."""
    ds = random_dataset(num_users=30, num_items=25, rows=600)
    split = make_split(ds, "p1")
    config = parse_config({"model": {"name": "youtubednn"},
                           "train": {"batch_size": 8, "negatives": {"num": 4, "in_batch": in_batch}}})
    batch = Trainer(None, ds, split, config, tmp_path).make_batch(np.arange(8), torch.Generator().manual_seed(0))
    return ds, batch


@pytest.mark.parametrize("item_bias", [False, True])
def test_loss_uses_candidates_and_in_batch_negatives(tmp_path, item_bias):
    ds, batch = small_batch(tmp_path, in_batch=True)
    torch.manual_seed(0)
    model = sparcode_model(ds, dim=8, user_tokens=2, item_tokens=2, tokenizer_hidden=[16],
                                          item_hidden=[16], interaction_hidden=[16], quantize=False, item_bias=item_bias)
    if item_bias:
        randomise_item_bias(model)
    loss, parts = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and parts["vq"] == 0.0
    assert model.interaction.token_in.weight.grad is not None
    assert not item_bias or model.bias.weight.grad.abs().sum() > 0
    # the loss is the sampled softmax of the model's own full scores at the batch's candidates
    with torch.no_grad():
        direct = model.score(batch.user, torch.arange(ds.num_items))
    rows = torch.arange(8)
    negatives, mask, log_q = batch.logits(
        direct[rows, batch.positives], direct.gather(1, batch.negatives), direct[:, batch.positives]
    ).negatives()
    expected = sampled_softmax(direct[rows, batch.positives], negatives, mask, batch.positive_log_q, log_q)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("sparsity_bias", [0.0, -1e3])
def test_training_stats_report_the_share_of_positive_scores_and_warn_when_the_relu_died(
    tmp_path, caplog, sparsity_bias
):
    """A bias of -1000 puts every (token, item) score below 0: the share is 0 and a warning says
    the ReLU died; the window restarts after each report."""
    ds, batch = small_batch(tmp_path)
    torch.manual_seed(0)
    model = sparcode_model(ds, dim=8, user_tokens=2, item_tokens=2, tokenizer_hidden=[16], item_hidden=[16],
                                          interaction_hidden=[16], quantize=False, sparsity_bias=sparsity_bias)
    model.loss(batch)
    model.loss(batch)
    with torch.no_grad():
        tokens, _, _ = model.user_tokens(batch.user)
        items = model.item_tokenizer(torch.cat([batch.positives[:, None], batch.negatives], 1).flatten())
        expected = float((model.token_scores(tokens, items.view(8, 5, 2, 8)) > 0).float().mean())
    with caplog.at_level("WARNING", logger="crosstower.sparcode"):
        stats = model.training_stats()
    assert stats["positive_share"] == pytest.approx(expected)
    assert (expected == 0) == (sparsity_bias < 0) and (expected == 0) == ("ReLU has died" in caplog.text)
    assert model.training_stats() == {}  # nothing trained since the last report


def test_l1_weight_ramps_up_quadratically_over_quantised_training_steps(tmp_path):
    """weight(t) = w * min(1, (t / R)^2) after t quantised training steps; evaluation-mode calls
    and unquantised steps do not count; the count is saved with the model (a resume goes on)."""
    ds, batch = small_batch(tmp_path)
    torch.manual_seed(0)
    model = sparcode_model(ds, dim=8, user_tokens=2, item_tokens=2, tokenizer_hidden=[16], item_hidden=[16],
                                          interaction_hidden=[16], codebook_size=4, vq_warmup_epochs=1,
                                          sparsity_weight=2.0, sparsity_ramp_steps=4)
    model.loss(batch)  # warming up, unquantised: not a step of the ramp
    assert int(model.sparsity_steps) == 0
    model.quantizing.fill_(True)
    weights = []
    for _ in range(6):
        loss, parts = model.loss(batch)
        weights.append(parts["sparsity_weight"])
        expected = parts["softmax"] + parts["vq"] + parts["sparsity_weight"] * parts["sparsity"]
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert weights == pytest.approx([0.0, 2 / 16, 2 * 4 / 16, 2 * 9 / 16, 2.0, 2.0])
    model.eval()
    assert model.loss(batch)[1]["sparsity_weight"] == 2.0 and int(model.sparsity_steps) == 6
    resumed = SparCode(ds, model.config)
    resumed.load_state_dict(model.state_dict())
    assert int(resumed.sparsity_steps) == 6
    without_ramp = SparCode(ds, model.config.model_copy(update={"sparsity": SparsityConfig(weight=2.0)}))
    without_ramp.quantizing.fill_(True)
    assert without_ramp.loss(batch)[1]["sparsity_weight"] == 2.0


def test_alltoall_trains_end_to_end_from_a_config(tmp_path):
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "alltoall", "tokenizer": "sa", "dim": 8, "user_tokens": 2, "item_tokens": 2,
                  "tokenizer_hidden": [16], "item_hidden": [16], "interaction_hidden": [16], "sa_layers": 1},
        "train": {"epochs": 1, "threads": 1, "batch_size": 256, "history_length": 10, "negatives": {"num": 10}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert results["model"] == "alltoall" and results["metrics"]["test"]["recall@50"] > 0


@pytest.mark.parametrize("source, quantizer", [("summary", "product"), ("history", "product"), ("summary", "residual")])
def test_quantised_sparcode_scores_are_sums_of_code_scores(source, quantizer):
    """What the index relies on: a user's score is the sum of its (real) codes' scores."""
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(0)
    k_u = 8 if source == "history" else 3
    model = sparcode_model(ds, dim=8, user_tokens=k_u, item_tokens=2, tokenizer_hidden=[16],
                                          item_hidden=[16], interaction_hidden=[16], num_codebooks=2, codebook_size=4,
                                          user_tokens_from=source, max_history=10, quantizer=quantizer)
    user = varied_histories(split)
    model.train()
    model.user_tokens(user)  # data-dependent codebook initialisation and one EMA step
    model.eval()
    with torch.no_grad():
        items = torch.arange(ds.num_items)
        _, codes, mask = model.user_tokens(user)
        real = torch.ones(codes.shape[:2], dtype=torch.bool) if mask is None else mask
        assert (codes[~real] == -1).all() and (codes[real] >= 0).all()
        per_code = model.score_codes(codes.reshape(-1, 2).clamp_min(0), model.item_tokenizer(items))
        summed = (per_code.view(len(user), k_u, -1) * real.unsqueeze(-1)).sum(1)
        assert torch.allclose(model.score(user, items), summed, atol=1e-5)


def small_quantised_model(quantizer: str = "product", item_bias: bool = False) -> tuple[SparCode, UserInput]:
    """A tiny SA SparCode with history tokens (some absent), 2 codebooks of 4, quantising, and
    its test users with histories of several lengths."""
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(1)
    model = sparcode_model(ds, dim=8, user_tokens=8, item_tokens=2, tokenizer_hidden=[16], item_hidden=[16],
                                          interaction_hidden=[16], num_codebooks=2, codebook_size=4, tokenizer="sa",
                                          sa_layers=1, user_tokens_from="history", max_history=10, item_bias=item_bias,
                                          quantizer=quantizer)
    if item_bias:
        randomise_item_bias(model)
    user = varied_histories(split)
    model.train()
    model.user_tokens(user)  # quantising from the first batch: the codebooks take these tokens
    model.eval()
    return model, user


@pytest.mark.parametrize("item_bias, quantizer", [(False, "product"), (True, "product"), (False, "residual")])
def test_history_token_index_serves_the_exhaustive_scores(item_bias, quantizer):
    """One token per history item, some absent: the index built from the users' own codes
    answers with the model's exhaustive scores (float16 storage) and the same top items; an
    item prior is served beside the posting lists."""
    model, user = small_quantised_model(quantizer, item_bias)
    index = model.build_code_index(user)
    with torch.no_grad():
        exhaustive = model.score(user, torch.arange(model.num_items))
        queries = model.index_query(user)
    assert (queries.codes == -1).all(-1).any()  # the case under test: absent tokens
    served = index.dense_scores(queries.codes, queries.vectors)
    assert torch.allclose(served, exhaustive, rtol=2e-3, atol=2e-3)
    scores, _ = index.search(queries, 5)
    assert torch.allclose(scores, exhaustive.topk(5).values, rtol=2e-3, atol=2e-3)
    assert ("item_prior" in index.arrays()) == item_bias


@pytest.mark.parametrize("quantizer", ["product", "residual"])
def test_index_of_every_code_holds_each_codes_own_scores(quantizer):
    """``codes="all"`` indexes all N^M tuples, each with the model's scores for that code (no
    fallback to a nearest code, whatever the query), with the observed codes' usage and 0 for
    the rest; the observed codes' posting lists are those of the default index."""
    from crosstower.index import encode_code_ids, every_code

    model, user = small_quantised_model(quantizer)
    observed = model.build_code_index(user)
    every = model.build_code_index(user, codes="all")
    codes = every_code(4, 2)
    assert every.num_codes == 16
    np.testing.assert_array_equal(every.arrays()["codes"], codes.numpy())
    with torch.no_grad():
        expected = model.score_codes(codes, model.item_tokenizer(torch.arange(model.num_items)))
    served = every.dense_scores(codes[:, None, :])  # each code alone as a one-token query
    assert torch.allclose(served, expected, rtol=2e-3, atol=2e-3)

    distinct, usage = model.code_usage(user)
    full_usage = np.zeros(16, dtype=np.int64)
    full_usage[encode_code_ids(distinct, 4)] = usage.numpy()
    np.testing.assert_array_equal(every.arrays()["code_usage"], full_usage)
    assert 0 < len(distinct) < 16  # the case under test: some codes no token took
    seen = observed.arrays()["codes"]
    np.testing.assert_array_equal(observed.dense_scores(torch.from_numpy(seen)[:, None, :]).numpy(),
                                  every.dense_scores(torch.from_numpy(seen)[:, None, :]).numpy())


def test_enumerating_every_code_is_bounded_when_the_config_is_read():
    from crosstower.errors import ConfigError

    model = {"name": "sparcode", "codebook_size": 8193, "num_codebooks": 2, "index_codes": "all"}
    with pytest.raises(ConfigError, match="index.codes 'all' would enumerate"):
        parse_config({"dataset": {"name": "synthetic"}, "split": {"protocol": "p2"}, "model": model})
    parse_config({"dataset": {"name": "synthetic"}, "split": {"protocol": "p2"}, "model": {**model, "codebook_size": 8192}})


@pytest.mark.slow  # spawning two workers that import torch takes a few seconds
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a 2-worker build needs 2 cores to be meaningful")
def test_trained_model_index_builds_the_same_in_two_processes():
    """The model's scorer pickles to spawned workers, and their index is the one-process index."""
    model, user = small_quantised_model()
    single = model.build_code_index(user, code_chunk=3)
    parallel = model.build_code_index(user, code_chunk=3, workers=2)
    for name, array in single.arrays().items():
        np.testing.assert_array_equal(parallel.arrays()[name], array, err_msg=name)


@pytest.mark.parametrize("tokenizer, item_bias", [("dnn", False), ("sa", False), ("dnn", True)])
def test_token_two_tower_trains_from_a_config(tmp_path, tokenizer, item_bias):
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "twotower", "tokenizer": tokenizer, "dim": 8, "tokenizer_hidden": [16],
                  "item_hidden": [16], "sa_layers": 1, "item_bias": item_bias},
        "train": {"epochs": 1, "threads": 1, "batch_size": 256, "history_length": 10, "negatives": {"num": 10}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert results["index"]["kind"] == "exact_inner_product" and results["index"]["dim"] == 8 + item_bias


def test_token_two_tower_item_bias_adds_a_per_item_prior_to_the_dot_product():
    from crosstower.models.token_two_tower import TokenTwoTower

    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(0)
    model = TokenTwoTower(ds, TokenTwoTowerConfig(dim=8, tokenizer_hidden=[16], item_hidden=[16], item_bias=True)).eval()
    prior = randomise_item_bias(model)
    with torch.no_grad():
        user, items = varied_histories(split), torch.arange(ds.num_items)
        dot = model.tokenizer(user)[:, 0] @ model.item_tokenizer(items)[:, 0].T
        assert torch.allclose(model.score(user, items), dot + prior, atol=1e-5)
        assert torch.allclose(model.score_pairs(user, items[: len(user.users)]),
                              (dot + prior).diagonal()[: len(user.users)], atol=1e-5)


@pytest.mark.parametrize("interaction, quantizer, keep, codes", [
    ("mlp", "product", "nonzero", "observed"), ("sa", "product", "nonzero", "observed"),
    ("mlp", "residual", {"share": 0.5, "usage_exponent": 0.5}, "observed"), ("mlp", "product", "nonzero", "all"),
])
def test_sparcode_run_serves_from_its_index(tmp_path, interaction, quantizer, keep, codes):
    """The run indexes its training users' codes (or all of them) with their usage, keeps what
    the config's ``index_keep`` says, and saves the index it served from."""
    from crosstower.index import SparseCodeIndex
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "sparcode", "interaction": interaction, "dim": 8, "user_tokens": 2, "item_tokens": 2,
                  "tokenizer_hidden": [16], "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 8,
                  "quantizer": quantizer, "index_keep": keep, "index_codes": codes},
        "train": {"epochs": 1, "threads": 1, "batch_size": 256, "history_length": 10,
                  "negatives": {"num": 10, "in_batch": True}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert "test_served" in results["metrics"] and 0 < results["index"]["kept_fraction"] <= 1
    assert results["index"]["keep"] == keep and results["index"]["code_usage"]
    index = SparseCodeIndex.load(tmp_path / "run" / "index")
    assert index.nnz == results["index"]["nnz"]
    assert (results["index"]["codes_indexed"] == 8**2) == (codes == "all")
    if keep != "nonzero":
        assert index.kept_fraction <= keep["share"]


def test_sa_interaction_equals_a_full_transformer_layer_at_the_first_position():
    from crosstower.models.sparcode import InteractionSA

    torch.manual_seed(0)
    enc = InteractionSA(dim=8, heads=2, hidden=[16]).eval()
    tokens, items = torch.randn(3, 2, 8), torch.randn(5, 4, 8)
    fast = enc(tokens, items)
    ref = torch.zeros(3, 2, 5)
    for b in range(3):
        for t in range(2):
            for n in range(5):
                seq = torch.cat([tokens[b, t][None], items[n]])  # [1 + K_i, D]
                h = enc.norm_in(seq)
                q, k, v = enc.qkv(h).chunk(3, dim=-1)
                q, k, v = (z.view(5, 2, 4).transpose(0, 1) for z in (q, k, v))  # [H, L, dh]
                att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # [H, L, dh]
                x = seq + enc.attn_out(att.transpose(0, 1).reshape(5, 8))
                x = x + enc.ffn(enc.norm_mid(x))
                ref[b, t, n] = enc.score_head(enc.norm_out(x[0])).squeeze()
    assert torch.allclose(fast, ref, atol=1e-5)
    per_user_items = items[None].expand(3, -1, -1, -1)  # the training layout [B, C, K_i, D]
    assert torch.allclose(enc(tokens, per_user_items), fast, atol=1e-6)


def test_sparcode_warm_up_trains_unquantised_then_quantises_from_kmeans_codebooks(tmp_path):
    """Epoch 0 trains the all-to-all model (no codes, never the best epoch); epoch 1 starts from
    k-means codebooks, so most entries are in use and the run serves from its index."""
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "sparcode", "dim": 8, "user_tokens": 2, "item_tokens": 2, "tokenizer_hidden": [16],
                  "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 16, "vq_warmup_epochs": 1,
                  "kmeans_examples": 1000},
        "train": {"epochs": 2, "threads": 1, "batch_size": 256, "history_length": 10, "negatives": {"num": 10}},
    })
    results = run_experiment(config, tmp_path / "run")
    first, second = results["training_history"]
    assert "vq_usage" not in first and second["vq_usage"] > 0.5
    assert results["timing"]["best_epoch"] == 1 and "test_served" in results["metrics"]


def test_warm_up_must_leave_a_quantised_epoch():
    from crosstower.errors import ConfigError

    with pytest.raises(ConfigError, match="quantizer.warmup_epochs"):
        parse_config({"model": {"name": "sparcode", "vq_warmup_epochs": 3}, "train": {"epochs": 3}})


@pytest.mark.parametrize("stop_after, averaged", [(1, False), (2, True)])
def test_resume_across_the_end_of_the_warm_up_continues_exactly(tmp_path, stop_after, averaged):
    """A run interrupted after its last unquantised epoch resumes into the k-means step and the
    quantised epochs exactly as if it had never stopped; so does one interrupted in its quantised
    epochs with a weight average that averages the codebooks too."""
    from crosstower.data.loaders import load_dataset
    from crosstower.models import build_model
    from tests.test_training import TINY

    dataset = load_dataset("synthetic", None, TINY)
    split = make_split(dataset, "p2")
    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "sparcode", "dim": 8, "user_tokens": 2, "item_tokens": 2, "tokenizer_hidden": [16],
                  "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 16, "vq_warmup_epochs": 1,
                  "kmeans_examples": 1000, "dropout": 0.2, "average_codebooks": averaged},
        "train": {"epochs": 3, "threads": 1, "batch_size": 256, "history_length": 10, "negatives": {"num": 10},
                  "ema_decay": 0.9 if averaged else 0.0},
    })

    def fit(workdir, epochs, resume=False, seed=0):
        cfg = config.model_copy(deep=True)
        cfg.train.epochs = epochs
        torch.manual_seed(seed)
        model = build_model(cfg.model, dataset, "p2", 10)
        return Trainer(model, dataset, split, cfg, workdir).fit(resume=resume), model

    (tmp_path / "full").mkdir()
    (tmp_path / "resumed").mkdir()
    full, full_model = fit(tmp_path / "full", 3)
    fit(tmp_path / "resumed", stop_after)  # 1: stops at the end of the warm-up
    resumed, resumed_model = fit(tmp_path / "resumed", 3, resume=True, seed=123)
    assert resumed.resumed_from_epoch == stop_after
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert [h["val_recall@50"] for h in resumed.history] == [h["val_recall@50"] for h in full.history]
    assert torch.equal(resumed_model.quantizer.codebooks, full_model.quantizer.codebooks)


def test_sparsity_weight_leaves_fewer_nonzero_code_item_scores(tmp_path):
    """The L1 penalty on negatives' scores is what makes the index small: the same run with it
    keeps a clearly smaller share of the code x item table."""
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    def kept(weight):
        config = parse_config({
            "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
            "model": {"name": "sparcode", "dim": 8, "user_tokens": 2, "item_tokens": 2, "tokenizer_hidden": [16],
                      "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 8, "sparsity_weight": weight},
            "train": {"epochs": 3, "threads": 1, "batch_size": 64, "lr": 0.02, "patience": 5, "history_length": 10,
                      "negatives": {"num": 10}},
        })
        return run_experiment(config, tmp_path / f"run-{weight}")["index"]["kept_fraction"]

    assert kept(2.0) < 0.5 * kept(0.0)


def test_history_tokens_need_that_much_history():
    from crosstower.errors import ConfigError

    with pytest.raises(ConfigError, match="train.history_length"):
        parse_config({"model": {"name": "sparcode", "user_tokens": 30, "user_tokens_from": "history"},
                      "train": {"history_length": 20}})
    parse_config({"model": {"name": "sparcode", "user_tokens": 30}, "train": {"history_length": 20}})


def test_dnn_history_token_is_the_mlp_of_the_user_summary_and_its_item():
    """Slot k of the last K_u history slots holds MLP([mean history; item k]); a slot the user's
    history does not reach is absent."""
    from crosstower.nn.fields import FieldEmbedder
    from crosstower.nn.tokenizers import DNNTokenizer

    ds = random_dataset(num_users=20, num_items=15, rows=300)
    torch.manual_seed(0)
    tokenizer = DNNTokenizer(None, FieldEmbedder(ds.items, 8), 8, 4, [16], from_history=True)
    history = torch.tensor([[-1, -1, 3, 4, 5], [1, 2, 3, 4, 9]])
    with torch.no_grad():
        tokens, mask = tokenizer.tokenize(UserInput(torch.tensor([0, 1]), history))
        assert mask.tolist() == [[False, True, True, True], [True, True, True, True]]
        embed = tokenizer.item_fields(torch.arange(ds.num_items)).sum(-2)
        for u, row in enumerate(history.tolist()):
            items = [i for i in row if i >= 0]
            summary = embed[items].mean(0)
            for slot, item in enumerate(row[-4:]):
                if item >= 0:
                    expected = tokenizer.mlp(torch.cat([summary, embed[item]]))
                    assert torch.allclose(tokens[u, slot], expected, atol=1e-5)


def test_time_budget_ending_in_the_warm_up_still_trains_one_quantised_epoch(tmp_path):
    """A budget that runs out during the unquantised warm-up would leave nothing to select,
    evaluate or index: the run goes on to the first quantised epoch and then stops."""
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "sparcode", "dim": 8, "user_tokens": 2, "item_tokens": 2, "tokenizer_hidden": [16],
                  "item_hidden": [16], "interaction_hidden": [16], "codebook_size": 16, "vq_warmup_epochs": 2,
                  "kmeans_examples": 1000},
        "train": {"epochs": 5, "threads": 1, "batch_size": 256, "history_length": 10, "max_minutes": 1e-6,
                  "negatives": {"num": 10}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert results["timing"]["epochs"] == 3 and results["timing"]["best_epoch"] == 2
    assert results["timing"]["out_of_time"] and "test_served" in results["metrics"]


def test_flat_keys_of_earlier_configs_move_into_the_quantizer_sparsity_and_index_blocks():
    from crosstower.errors import ConfigError

    base = {"dataset": {"name": "synthetic"}, "split": {"protocol": "p2"}}
    flat = parse_config({**base, "model": {"name": "sparcode", "quantizer": "residual", "codebook_size": 16,
                                           "vq_warmup_epochs": 1, "sparsity_weight": 0.5, "index_keep": 3}})
    nested = parse_config({**base, "model": {"name": "sparcode", "quantizer": {"kind": "residual", "codebook_size": 16,
                                                                                "warmup_epochs": 1},
                                             "sparsity": {"weight": 0.5}, "index": {"keep": 3}}})
    assert flat == nested
    # an old --set on a new config, and a key set both ways with different values
    overridden = parse_config({**base, "model": {"name": "sparcode", "quantizer": {"codebook_size": 16}}},
                              overrides=["model.vq_weight=2.0"])
    assert overridden.model.quantizer.weight == 2.0 and overridden.model.quantizer.codebook_size == 16
    with pytest.raises(ConfigError, match=r"model: codebook_size is quantizer.codebook_size now, and both are set"):
        parse_config({**base, "model": {"name": "sparcode", "codebook_size": 8, "quantizer": {"codebook_size": 16}}})


def test_setting_a_whole_section_to_a_scalar_is_refused_naming_its_keys():
    from crosstower.errors import ConfigError

    raw = {"model": {"name": "sparcode", "quantizer": {"codebook_size": 16}}}
    with pytest.raises(ConfigError, match=r"'model.quantizer' is a section \(codebook_size\); set one of its keys"):
        parse_config(raw, overrides=["model.quantizer=residual"])
    assert parse_config(raw, overrides=["model.quantizer.kind=residual"]).model.quantizer.kind == "residual"
