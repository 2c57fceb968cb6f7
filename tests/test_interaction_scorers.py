"""The token substrate, the cross encoder and late interaction against per-pair references."""

import numpy as np
import pytest
import torch

from crosstower.config import parse_config
from crosstower.data.batching import UserInput, eval_user_input
from crosstower.data.splits import make_split
from crosstower.errors import ConfigError
from crosstower.losses import sampled_softmax
from crosstower.models.base import BuildContext
from crosstower.models.cross import CrossConfig, CrossEncoder, block_mask
from crosstower.models.late_interaction import LateInteraction, LateInteractionConfig
from crosstower.nn.maxsim import maxsim
from crosstower.nn.tokens import TokenSequence, TokenSubstrate
from crosstower.train.trainer import Trainer
from tests.helpers import random_dataset

torch.set_num_threads(1)
HISTORY = 6
CONTEXT = BuildContext(history_length=HISTORY)


@pytest.fixture(scope="module")
def data():
    ds = random_dataset(num_users=20, num_items=12, rows=300)
    split = make_split(ds, "p2")
    user = eval_user_input(split.test, np.arange(len(split.test)), HISTORY)
    return ds, split, user


def test_substrate_sequences_have_cls_fields_history_and_masks(data):
    ds, _, _ = data
    torch.manual_seed(0)
    substrate = TokenSubstrate(ds, dim=8, max_history=4)
    user = UserInput(torch.tensor([0, 1]), torch.tensor([[-1, -1, 3], [1, 2, 3]]))
    seq = substrate.users(user)
    assert substrate.num_user_fields == 2  # user_id and group
    assert seq.tokens.shape == (2, 1 + 2 + 4, 8) and len(seq) == substrate.user_length
    # [CLS], the two user fields, then 4 history slots left-padded to the maximum
    assert seq.mask[:, 3:].tolist() == [[False, False, False, True], [False, True, True, True]] and seq.mask[:, :3].all()
    # the same item in the same slot gives the same token whatever the rest of the history
    assert torch.allclose(seq.tokens[0, -1], seq.tokens[1, -1])
    items = substrate.items(torch.tensor([0, 5, 7]))
    assert items.tokens.shape == (3, substrate.item_length, 8) and items.mask.all()
    # the item side carries its own segment: an item's [CLS] differs from a user's
    assert not torch.allclose(items.tokens[0, 0], seq.tokens[0, 0])
    with pytest.raises(ValueError, match="max_history 4"):
        substrate.users(UserInput(torch.tensor([0]), torch.zeros(1, 5, dtype=torch.long)))


def test_block_mask_addresses_the_four_blocks():
    allowed = block_mask(3, 2, {"uu": True, "ui": False, "iu": True, "ii": False})
    assert allowed[:3, :3].all() and not allowed[:3, 3:].any()  # users see users, not items
    assert allowed[3:, :3].all()  # items see users
    assert allowed[3:, 3:].equal(torch.eye(2, dtype=torch.bool))  # items see only themselves
    assert block_mask(3, 2, {}).all()


def cross_reference(model: CrossEncoder, user: UserInput, items: torch.Tensor) -> torch.Tensor:
    """One sequence per (user, item) pair, built and encoded on its own."""
    users, catalogue = model.substrate.users(user), model.substrate.items(items)
    scores = torch.zeros(len(user), len(items))
    for u in range(len(user)):
        for i in range(len(items)):
            tokens = torch.cat([users.tokens[u], catalogue.tokens[i]])[None]
            mask = torch.cat([users.mask[u], catalogue.mask[i]])[None]
            hidden = model.encoder(tokens, mask, allowed=model.allowed)
            scores[u, i] = model.head(hidden[0, 0])
    return scores


@pytest.mark.parametrize("blocks", [{}, {"ui": False, "ii": False}])
def test_cross_encoder_batched_scores_equal_per_pair_reference(data, blocks):
    ds, _, user = data
    torch.manual_seed(0)
    settings = CrossConfig(dim=8, layers=2, heads=2, pair_chunk=7, blocks=blocks)
    model = CrossEncoder(ds, settings, CONTEXT).eval()
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        batched = model.score(user, items)
        reference = cross_reference(model, user, items)
        ranged = model.item_scorer()(user, 2, 9)
        candidates = torch.randint(0, ds.num_items, (len(user), 3))
        pairs = model.forward_candidates(user, candidates).scores.view(len(user), 3)
        single = model.score_pairs(user, candidates[:, 0])
    assert torch.allclose(batched, reference, atol=1e-5)
    assert torch.allclose(single, pairs[:, 0], atol=1e-5)
    assert torch.allclose(ranged, batched[:, 2:9], atol=1e-6)
    assert torch.allclose(pairs, batched.gather(1, candidates), atol=1e-5)


def test_cross_encoder_exposes_attention_blocks_for_distillation(data):
    ds, _, user = data
    torch.manual_seed(0)
    model = CrossEncoder(ds, CrossConfig(dim=8, layers=2, heads=2, blocks={"ui": False}), CONTEXT).eval()
    with torch.no_grad():
        out = model.forward_candidates(user, torch.zeros(len(user), 2, dtype=torch.long), return_traces=True)
    lu, li = model.substrate.user_length, model.substrate.item_length
    assert len(out.traces) == 2 and out.traces[0].attention.shape == (2 * len(user), 2, lu + li, lu + li)
    attention = out.traces[1].attention
    assert out.block(attention, "ui").shape[-2:] == (lu, li) and out.block(attention, "iu").shape[-2:] == (li, lu)
    assert (out.block(attention, "ui") == 0).all()  # switched off
    assert (out.block(attention, "iu") > 0).any()
    # rows are distributions over the allowed, real keys
    assert torch.allclose(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5)
    assert out.traces[0].queries.shape == (2 * len(user), 2, lu + li, 4)
    # with user->item attention off, the user tokens' states do not depend on the item
    with torch.no_grad():
        other = model.forward_candidates(user, torch.ones(len(user), 2, dtype=torch.long))
    assert torch.allclose(out.hidden[:, :lu], other.hidden[:, :lu], atol=1e-6)
    assert not torch.allclose(out.hidden[:, lu:], other.hidden[:, lu:])


def batch_of(ds, split, tmp_path, in_batch: bool):
    config = parse_config({"model": {"name": "youtubednn"}, "train": {
        "batch_size": 8, "history_length": HISTORY, "negatives": {"num": 4, "in_batch": in_batch}}})
    trainer = Trainer(None, ds, split, config, tmp_path)
    # rows spread over the examples, hence over users: the first rows all belong to one user, and
    # then every in-batch column would be masked as an accidental hit
    rows = np.linspace(0, len(trainer.examples) - 1, 8).astype(np.int64)
    batch = trainer.make_batch(rows, torch.Generator().manual_seed(0))
    if in_batch:
        assert not batch.in_batch_mask.all(dim=1).any()  # every row keeps some in-batch negative
    return batch


def expected_loss(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """The sampled softmax of the model's own full scores at the batch's candidates."""
    with torch.no_grad():
        direct = model.score(batch.user, torch.arange(model.num_items)) / temperature
    rows = torch.arange(len(batch.positives))
    in_batch = direct[:, batch.positives] if batch.in_batch_mask is not None else None
    negatives, mask, log_q = batch.logits(direct[rows, batch.positives], direct.gather(1, batch.negatives), in_batch).negatives()
    return sampled_softmax(direct[rows, batch.positives], negatives, mask, batch.positive_log_q, log_q)


@pytest.mark.parametrize("in_batch", [False, True])
def test_cross_encoder_loss_is_sampled_softmax_of_its_scores(data, tmp_path, in_batch):
    ds, split, _ = data
    batch = batch_of(ds, split, tmp_path, in_batch)
    torch.manual_seed(0)
    model = CrossEncoder(ds, CrossConfig(dim=8, layers=1, heads=2), CONTEXT)
    model.eval()  # no dropout, so training and direct scores agree
    loss, parts = model.loss(batch)
    loss.backward()
    assert model.substrate.cls.grad is not None and parts["softmax"] == pytest.approx(float(loss.detach()))
    assert torch.allclose(loss.detach(), expected_loss(model, batch), atol=1e-5)


def maxsim_reference(users: TokenSequence, items: TokenSequence) -> torch.Tensor:
    """Sum over the real user tokens of the max over the real item tokens, one pair at a time."""
    scores = torch.zeros(users.tokens.shape[0], items.tokens.shape[0])
    for u in range(users.tokens.shape[0]):
        for i in range(items.tokens.shape[0]):
            for a in range(users.tokens.shape[1]):
                if users.mask[u, a]:
                    sims = [users.tokens[u, a] @ items.tokens[i, b] for b in range(items.tokens.shape[1]) if items.mask[i, b]]
                    scores[u, i] += max(sims)
    return scores


def test_maxsim_is_max_over_item_tokens_then_sum_over_user_tokens():
    torch.manual_seed(0)
    users = TokenSequence(torch.randn(3, 4, 5), torch.rand(3, 4) > 0.3)
    items = TokenSequence(torch.randn(6, 3, 5), torch.rand(6, 3) > 0.3)
    items.mask[:, 0] = True
    assert torch.allclose(maxsim(users, items), maxsim_reference(users, items), atol=1e-5)
    # not a sum over all pairs (which would collapse into one dot product)
    all_pairs = torch.einsum("bam,nkm->bn", users.tokens * users.mask[..., None], items.tokens * items.mask[..., None])
    assert not torch.allclose(maxsim(users, items), all_pairs)


@pytest.mark.parametrize("expansion,item_cls,item_bias", [(0, False, False), (2, True, True)])
def test_late_interaction_scores_equal_per_pair_maxsim(data, expansion, item_cls, item_bias):
    ds, _, user = data
    torch.manual_seed(0)
    model = LateInteraction(ds, LateInteractionConfig(
        dim=8, projection_dim=4, user_layers=1, item_layers=1, heads=2,
        expansion_tokens=expansion, item_cls=item_cls, item_bias=item_bias), CONTEXT).eval()
    if item_bias:
        torch.nn.init.normal_(model.bias.weight)
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        users, catalogue = model.encode_user_tokens(user), model.encode_item_tokens(items)
        batched = model.score(user, items)
        ranged = model.item_scorer()(user, 4, 10)
        pairs = model.score_pairs(user, torch.arange(len(user)) % ds.num_items)
    assert torch.allclose(pairs, batched[torch.arange(len(user)), torch.arange(len(user)) % ds.num_items], atol=1e-5)
    assert users.tokens.shape[1] == model.towers.substrate.user_length + expansion == model.towers.user_length
    assert catalogue.tokens.shape[1] == model.towers.substrate.item_length - (0 if item_cls else 1)
    assert torch.allclose(users.tokens.norm(dim=-1), torch.ones(users.tokens.shape[:2]), atol=1e-5)
    bias = model.bias.weight[:, 0] if item_bias else torch.zeros(ds.num_items)
    assert torch.allclose(batched, maxsim_reference(users, catalogue) + bias, atol=1e-5)
    assert torch.allclose(ranged, batched[:, 4:10], atol=1e-6)


@pytest.mark.parametrize("in_batch", [False, True])
def test_late_interaction_loss_is_sampled_softmax_at_temperature(data, tmp_path, in_batch):
    ds, split, _ = data
    batch = batch_of(ds, split, tmp_path, in_batch)
    torch.manual_seed(0)
    model = LateInteraction(ds, LateInteractionConfig(dim=8, projection_dim=4, user_layers=1, item_layers=1,
                                                      heads=2, temperature=0.5, item_bias=True), CONTEXT).eval()
    torch.nn.init.normal_(model.bias.weight)
    loss, _ = model.loss(batch)
    loss.backward()
    assert model.towers.projection.weight.grad is not None
    assert torch.allclose(loss.detach(), expected_loss(model, batch, temperature=0.5), atol=1e-5)


def test_late_interaction_loads_a_checkpoint_saved_before_the_towers_module(data):
    """Runs saved when the towers' parts sat on the model itself (``substrate.*``, ``projection.*``)
    still load, to the same scores."""
    ds, _, user = data
    settings = LateInteractionConfig(dim=8, projection_dim=4, user_layers=1, item_layers=1, heads=2,
                                     expansion_tokens=2, item_bias=True)
    torch.manual_seed(0)
    saved = LateInteraction(ds, settings, CONTEXT).eval()
    flat = {k.removeprefix("towers."): v for k, v in saved.state_dict().items()}
    assert "projection.weight" in flat and "expansion" in flat
    torch.manual_seed(1)
    loaded = LateInteraction(ds, settings, CONTEXT).eval()
    loaded.load_state_dict(flat)
    items = torch.arange(ds.num_items)
    with torch.no_grad():
        assert torch.equal(loaded.score(user, items), saved.score(user, items))


@pytest.mark.parametrize("name,extra", [("cross", {"layers": 1}), ("colbert", {"user_layers": 1, "projection_dim": 8})])
def test_interaction_scorers_train_end_to_end_from_a_config(tmp_path, name, extra):
    from crosstower.run import run_experiment
    from tests.test_training import TINY

    config = parse_config({
        "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
        "model": {"name": name, "dim": 8, "heads": 2, **extra},
        "train": {"epochs": 1, "threads": 1, "batch_size": 128, "history_length": 8, "negatives": {"num": 5}},
    })
    results = run_experiment(config, tmp_path / "run")
    assert results["model"] == name and results["metrics"]["test"]["recall@50"] > 0


def test_interaction_scorer_configs_reject_bad_keys():
    with pytest.raises(ConfigError, match="model.blocks.ux: unknown key"):
        parse_config({"model": {"name": "cross", "blocks": {"ux": False}}})
    with pytest.raises(ConfigError, match="not divisible by heads"):
        parse_config({"model": {"name": "colbert", "dim": 10, "heads": 3}})


def test_late_interaction_run_serves_from_its_index(tmp_path):
    """With every item token retrieved and no candidate cap the served ranking is exhaustive
    MaxSim on float16 tokens, so the served metrics match the exhaustive ones up to the order of
    near-ties (exact equality on rounded tokens is tested in test_late_interaction_index.py); a
    capped index scores fewer items."""
    from crosstower.run import reevaluate, run_experiment
    from tests.test_training import TINY

    def run(index: dict, name: str) -> dict:
        config = parse_config({
            "dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p2"},
            "model": {"name": "colbert", "dim": 8, "heads": 2, "user_layers": 1, "projection_dim": 8,
                      "item_bias": True, "index": index},
            "train": {"epochs": 1, "threads": 1, "batch_size": 128, "history_length": 8, "negatives": {"num": 5}},
        })
        return run_experiment(config, tmp_path / name)

    full = run({"candidate_index": "Flat", "tokens_per_query": 150 * 8, "max_candidates": 150}, "full")
    assert full["index"]["kind"] == "late_interaction" and full["index"]["scored_fraction"] == pytest.approx(1.0)
    served, exhaustive = full["metrics"]["test_served"], full["metrics"]["test"]
    assert all(served[k] == pytest.approx(exhaustive[k], abs=5e-3) for k in ("recall@50", "ndcg@50", "precision@50"))
    capped = run({"candidate_index": "IVF4,Flat", "tokens_per_query": 4, "max_candidates": 15, "nprobe": 1}, "capped")
    assert capped["index"]["scored_fraction"] <= 15 / capped["data"]["items"]
    assert (tmp_path / "capped" / "index" / "index.json").exists()
    # re-evaluating a finished run serves it again from a rebuilt index: the same numbers
    assert reevaluate(tmp_path / "capped")["test_served"] == capped["metrics"]["test_served"]
