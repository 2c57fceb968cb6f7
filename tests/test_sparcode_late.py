"""SparCode on late interaction's towers: the MaxSim term, the tokenizer, the loss and the index."""

import pytest
import torch
import yaml
from pydantic import ValidationError

from crosstower.config import parse_config
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.losses import sampled_softmax
from crosstower.models.base import BuildContext
from crosstower.models.late_interaction import LateInteraction, LateInteractionConfig
from crosstower.models.sparcode import SparCode
from crosstower.nn.interaction import InteractionMaxSim
from tests.helpers import random_dataset, sparcode_model
from tests.test_sparcode import randomise_item_bias, small_batch, varied_histories

torch.set_num_threads(1)

HISTORY = 10


def late_model(ds, **overrides) -> SparCode:
    """A small SparCode on late interaction's towers (``quantize`` False: unquantised)."""
    settings = dict(tokenizer="late", interaction="maxsim", dim=8, projection_dim=4, sa_layers=1, sa_heads=2,
                    max_history=HISTORY, expansion_tokens=2, maxsim_temperature=0.5,
                    quantizer={"num_codebooks": 2, "codebook_size": 4})
    return sparcode_model(ds, **{**settings, **overrides})


def reference_maxsim_term(tokens: torch.Tensor, items: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tokens [T, D]`` x ``items [N, K, D]`` one pair at a time: ``max_b <t, d_b> / tau``."""
    out = torch.zeros(tokens.shape[0], items.shape[0])
    for t in range(tokens.shape[0]):
        for n in range(items.shape[0]):
            out[t, n] = max(float(tokens[t] @ items[n, b]) for b in range(items.shape[1])) / temperature
    return out


def test_maxsim_interaction_equals_a_per_pair_reference_in_every_shape():
    torch.manual_seed(0)
    term = InteractionMaxSim(temperature=0.25)
    users, catalogue, candidates = torch.randn(3, 4, 6), torch.randn(5, 2, 6), torch.randn(3, 7, 2, 6)
    every = term(users, catalogue)  # [B, T, N]
    own = term(users, candidates)  # [B, T, C]
    codes = term(users[0], catalogue)  # [T, N]
    assert every.shape == (3, 4, 5) and own.shape == (3, 4, 7) and codes.shape == (4, 5)
    for b in range(3):
        assert torch.allclose(every[b], reference_maxsim_term(users[b], catalogue, 0.25), atol=1e-5)
        assert torch.allclose(own[b], reference_maxsim_term(users[b], candidates[b], 0.25), atol=1e-5)
    assert torch.allclose(codes, every[0])


@pytest.mark.parametrize("item_bias", [False, True])
def test_late_sparcode_score_is_the_sum_of_relu_maxsim_terms_over_real_tokens(item_bias):
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(0)
    model = late_model(ds, quantize=False, sparsity_bias=-0.3, item_bias=item_bias).eval()
    prior = randomise_item_bias(model) if item_bias else torch.zeros(ds.num_items)
    user, items = varied_histories(split), torch.arange(ds.num_items)
    with torch.no_grad():
        batched = model.score(user, items)
        tokens, _, mask = model.user_tokens(user)
        item_tokens = model.item_tokenizer(items)
    assert not mask.all()  # short histories: padding slots are not real tokens
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(mask.shape), atol=1e-5)
    reference = torch.stack([
        torch.relu(reference_maxsim_term(tokens[u][mask[u]], item_tokens, 0.5) - 0.3).sum(0) for u in range(len(user))
    ]) + prior
    assert torch.allclose(batched, reference, atol=1e-5)
    assert torch.allclose(model.item_scorer()(user, 3, 11), batched[:, 3:11], atol=1e-6)


def test_late_tokenizer_is_late_interactions_towers():
    """With a bias so large that the ReLU never cuts, unquantised SparCode-late is MaxSim / tau plus
    a constant per user token: the same towers as late interaction, given the same weights."""
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(0)
    colbert = LateInteraction(ds, LateInteractionConfig(dim=8, projection_dim=4, user_layers=1, item_layers=1,
                                                        heads=2, expansion_tokens=2),
                              BuildContext(history_length=HISTORY)).eval()
    model = late_model(ds, quantize=False, sparsity_bias=100.0).eval()
    model.tokenizer.towers.load_state_dict(colbert.towers.state_dict())
    user, items = varied_histories(split), torch.arange(ds.num_items)
    with torch.no_grad():
        real_tokens = colbert.encode_user_tokens(user).mask.sum(1, keepdim=True)
        shifted = model.score(user, items) - 100.0 * real_tokens
        assert torch.allclose(shifted, colbert.score(user, items) / 0.5, atol=1e-4)


def test_late_sparcode_loss_is_the_sampled_softmax_of_its_own_scores(tmp_path):
    ds, batch = small_batch(tmp_path, in_batch=True)
    torch.manual_seed(0)
    model = late_model(ds, quantize=False, max_history=batch.user.history.shape[1], item_bias=True)
    randomise_item_bias(model)
    model.eval()  # no dropout, so training and direct scores agree
    loss, _ = model.loss(batch)
    loss.backward()
    assert model.tokenizer.towers.projection.weight.grad is not None
    with torch.no_grad():
        direct = model.score(batch.user, torch.arange(ds.num_items))
    rows = torch.arange(len(batch.positives))
    negatives, mask, log_q = batch.logits(
        direct[rows, batch.positives], direct.gather(1, batch.negatives), direct[:, batch.positives]
    ).negatives()
    expected = sampled_softmax(direct[rows, batch.positives], negatives, mask, batch.positive_log_q, log_q)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("item_bias", [False, True])
def test_late_sparcode_index_serves_the_exhaustive_scores(item_bias):
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    split = make_split(ds, "p2")
    torch.manual_seed(1)
    model = late_model(ds, item_bias=item_bias)
    if item_bias:
        randomise_item_bias(model)
    user = varied_histories(split)
    model.train()
    model.user_tokens(user)  # data-dependent codebook initialisation and one EMA step
    model.eval()
    with torch.no_grad():  # an untrained tower's vectors are alike: centre the bias on its terms
        tokens, _, mask = model.user_tokens(user)
        terms = model.interaction(tokens[mask], model.item_tokenizer(torch.arange(ds.num_items)))
    model.config.sparsity.bias = -float(terms.median())
    index = model.build_code_index(user)
    with torch.no_grad():
        exhaustive = model.score(user, torch.arange(ds.num_items))
        queries = model.index_query(user)
    assert (queries.codes == -1).all(-1).any()  # padding history slots have no code
    assert 0 < index.kept_fraction < 1  # the bias leaves some (code, item) scores at exactly 0
    served = index.dense_scores(queries.codes, queries.vectors)
    assert torch.allclose(served, exhaustive, rtol=2e-3, atol=2e-3)
    scores, _ = index.search(queries, 5)
    assert torch.allclose(scores, exhaustive.topk(5).values, rtol=2e-3, atol=2e-3)


def test_late_sparcode_run_serves_from_its_index(tmp_path):
    from crosstower.run import run_experiment
    from crosstower.run_dir import open_run
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": "sparcode", "tokenizer": "late", "interaction": "maxsim", "dim": 8, "projection_dim": 4,
                  "sa_layers": 1, "expansion_tokens": 1, "codebook_size": 8, "item_bias": True,
                  "sparsity_weight": 0.5},
        "train": {"epochs": 1, "threads": 1, "batch_size": 256, "history_length": 10,
                  "negatives": {"num": 10, "in_batch": True, "logq": True}},
    })
    results = run_experiment(config, tmp_path / "run")
    served, exhaustive = results["metrics"]["test_served"]["recall@50"], results["metrics"]["test"]["recall@50"]
    assert 0 < results["index"]["kept_fraction"] <= 1 and served == pytest.approx(exhaustive, abs=0.02)
    run = open_run(tmp_path / "run")  # the saved config, every default written out, loads
    assert run.config.model.tokenizer == "late" and run.config.model.sparsity.weight == 0.5
    assert run.index().describe()["kept_fraction"] == results["index"]["kept_fraction"]
    # a run folder written before the quantizer / sparsity / index blocks (flat keys) loads the same
    old = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    model = old["model"]
    model.update({"quantizer": model["quantizer"]["kind"], "codebook_size": model["quantizer"]["codebook_size"],
                  "sparsity_weight": model.pop("sparsity")["weight"], "index_keep": model.pop("index")["keep"]})
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))
    assert open_run(tmp_path / "run").config == run.config


@pytest.mark.parametrize("model, message", [
    ({"name": "twotower", "tokenizer": "late"}, "its two-tower model is late interaction"),
    ({"name": "sparcode", "tokenizer": "late", "interaction": "maxsim", "user_tokens": 8}, "drop \\['user_tokens'\\]"),
    ({"name": "sparcode", "tokenizer": "late", "interaction": "maxsim", "projection_dim": 33},
     "projection_dim 33 is not divisible by quantizer.num_codebooks 2"),
    ({"name": "alltoall", "tokenizer": "late", "interaction": "maxsim", "maxsim_temperature": 0}, "greater than 0"),
    ({"name": "sparcode", "tokenizer": "late"}, "tokenizer 'late' needs interaction 'maxsim' or 'sa'"),
])
def test_late_tokenizer_configs_reject_what_does_not_apply(model, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"model": model})


def test_late_tokenizer_needs_an_encoder_that_reads_any_number_of_item_tokens():
    ds = random_dataset(num_users=20, num_items=15, rows=300)
    with pytest.raises(ValidationError, match="needs interaction 'maxsim' or 'sa'"):
        late_model(ds, interaction="mlp")
    sa = late_model(ds, interaction="sa", interaction_hidden=[8], quantize=False).eval()
    user = varied_histories(make_split(ds, "p2"))
    with torch.no_grad():
        scores = sa.score(user, torch.arange(ds.num_items))
    assert scores.shape == (len(user), ds.num_items) and torch.isfinite(scores).all()
