"""Protocol P4 (pre-ranking): rating labels, the temporal split of labelled rows, train-only
histories and statistics, pointwise training and AUC / GAUC / log loss end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from crosstower.cli import format_table
from crosstower.config import parse_config
from crosstower.data.batching import PointwiseRows, eval_user_input
from crosstower.data.dataset import build_dataset
from crosstower.data.features import (
    add_train_statistics, in_split_row_statistics, ordered_row_statistics, ordered_statistics, standardise,
    train_statistics,
)
from crosstower.data.loaders import load_dataset
from crosstower.data.splits import LABEL, Split, make_split
from crosstower.errors import ConfigError, DataError
from crosstower.evaluate.pre_ranking import evaluate_rows, part_rows, row_logits
from crosstower.models import build_model
from crosstower.models.base import Recommender
from crosstower.nn.fields import FieldEmbedder, row_values
from crosstower.data.run_data import with_split_features
from crosstower.run import reevaluate, run_experiment
from crosstower.train.trainer import Trainer
from tests.helpers import rated_dataset, rated_frames
from tests.test_training import TINY

torch.set_num_threads(1)


def one_user(ratings, times=None, items=None) -> pd.DataFrame:
    n = len(ratings)
    return pd.DataFrame({
        "user_id": 0,
        "item_id": np.arange(100, 100 + n) if items is None else items,
        "timestamp": np.arange(n) if times is None else times,
        "rating": ratings,
    })


def item_of(dataset, index):
    return dataset.item_ids[np.asarray(index)].tolist()


@pytest.fixture(scope="module")
def rated():
    dataset = rated_dataset()
    return dataset, make_split(dataset, "p4")


# ------------------------------------------------------------------------------------- split


def test_labels_follow_the_thresholds_and_ratings_in_between_are_dropped():
    # 25 rows cycling through ratings 1, 4, 3, 2, 5 at times 0..24; item = 100 + time.
    ratings = np.tile([1, 4, 3, 2, 5], 5).astype(float)
    ds = build_dataset("t", one_user(ratings))
    split = make_split(ds, "p4")
    rows = pd.concat([split.labelled[p] for p in ("train", "val", "test")])
    rating_of = dict(zip(100 + np.arange(25), ratings))
    got = {i: y for i, y in zip(item_of(ds, rows["item"]), rows[LABEL])}
    assert len(got) == 20 and all(rating_of[i] != 3 for i in got)
    assert all(y == (1.0 if rating_of[i] >= 4 else 0.0) for i, y in got.items())
    # Other thresholds: 5 positive, <= 3 negative, 4 dropped.
    other = make_split(ds, "p4", positive_min=5, negative_max=3)
    rows = pd.concat([other.labelled[p] for p in ("train", "val", "test")])
    assert sorted(set(rating_of[i] for i in item_of(ds, rows["item"]))) == [1, 2, 3, 5]
    assert ((rows["rating"] == 5) == (rows[LABEL] == 1)).all()


def test_labelled_rows_split_temporally_per_user_like_p1():
    # 20 labelled rows (ratings 1, 4, 2, 5 repeated; item = 100 + time, given in shuffled order).
    times = np.random.default_rng(0).permutation(20)
    ds = build_dataset("t", one_user(np.tile([1.0, 4.0, 2.0, 5.0], 5)[times], times, 100 + times))
    split = make_split(ds, "p4")
    parts = {p: item_of(ds, split.labelled[p]["item"]) for p in ("train", "val", "test")}
    # floor(0.2 * 20) = 4 test rows, floor(0.1 * 20) = 2 validation rows, the rest train.
    assert parts == {"train": list(range(100, 114)), "val": [114, 115], "test": [116, 117, 118, 119]}
    assert (split.labelled["test"]["timestamp"].diff().dropna() > 0).all()
    # The training positives are what histories read (ratings >= 4 among the train rows).
    assert item_of(ds, split.train["item"]) == [i for i in range(100, 114) if (i - 100) % 2 == 1]


def test_temporal_order_holds_for_every_user(rated):
    dataset, split = rated
    rows = {p: split.labelled[p] for p in ("train", "val", "test")}
    by_user = {p: f.groupby("user")["timestamp"] for p, f in rows.items()}
    last_train, first_val, last_val, first_test = (
        by_user["train"].max(), by_user["val"].min(), by_user["val"].max(), by_user["test"].min()
    )
    assert (last_train.reindex(first_val.index) <= first_val).all()
    assert (last_val.reindex(first_test.index).dropna() <= first_test.reindex(last_val.index).dropna()).all()
    total = sum(len(f) for f in rows.values())
    labelled = dataset.interactions[dataset.interactions["rating"] != 3]
    assert total == len(labelled)
    counts = labelled.groupby("user").size()
    test_counts = rows["test"].groupby("user").size().reindex(counts.index, fill_value=0)
    assert (test_counts == np.floor(0.2 * counts)).all()


def test_random_order_draws_rows_70_10_20_by_the_seed(rated):
    """``order="random"`` partitions the same labelled rows at random over users and time,
    reproducibly by the seed; each part stays sorted by (user, time, item)."""
    dataset, temporal = rated
    split = make_split(dataset, "p4", seed=3, order="random")
    rows = {p: split.labelled[p] for p in ("train", "val", "test")}
    total = sum(len(f) for f in rows.values())
    key = ["user", "item", "timestamp"]
    everything = pd.concat(rows.values())[key].sort_values(key).reset_index(drop=True)
    expected = pd.concat(temporal.labelled[p] for p in ("train", "val", "test"))[key].sort_values(key)
    pd.testing.assert_frame_equal(everything, expected.reset_index(drop=True))
    assert [len(rows[p]) for p in ("train", "val", "test")] == [round(0.7 * total), round(0.8 * total) - round(0.7 * total),
                                                              total - round(0.8 * total)]
    for frame in rows.values():
        assert frame.equals(frame.sort_values(["user", "timestamp", "item"], kind="stable"))
    # Not temporal: some user has a test row older than one of its training rows.
    first_test = rows["test"].groupby("user")["timestamp"].min()
    last_train = rows["train"].groupby("user")["timestamp"].max().reindex(first_test.index)
    assert (first_test < last_train).any()
    again = make_split(dataset, "p4", seed=3, order="random")
    other = make_split(dataset, "p4", seed=4, order="random")
    assert again.labelled["test"].equals(rows["test"]) and not other.labelled["test"].equals(rows["test"])
    assert len(split.train) == int((rows["train"][LABEL] == 1).sum())  # histories read the train positives


def test_order_is_a_p4_setting():
    base = {"dataset": {"name": "ml-100k"}, "model": {"name": "dssm"}}
    assert parse_config({**base, "split": {"protocol": "p4"}}).split.order == "temporal"
    assert parse_config({**base, "split": {"protocol": "p4", "order": "random"}}).split.order == "random"
    with pytest.raises(ConfigError, match="order is used by protocol p4 only"):
        parse_config({**base, "split": {"protocol": "p1", "order": "random"}})


def test_p4_without_ratings_is_a_clear_error(tmp_path):
    synthetic = load_dataset("synthetic", None, TINY)
    with pytest.raises(DataError, match=r"data set 'synthetic' has no 'rating' column"):
        make_split(synthetic, "p4")
    config = parse_config({"dataset": {"name": "synthetic", "options": TINY}, "split": {"protocol": "p4"},
                           "model": {"name": "dssm"}, "train": {"threads": 1}})
    with pytest.raises(DataError, match="rating"):
        run_experiment(config, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_part_with_one_label_is_a_clear_error():
    with pytest.raises(DataError, match="all have label 1"):
        make_split(build_dataset("t", one_user(np.full(20, 5.0))), "p4")


def test_p4_split_round_trips_through_file(tmp_path, rated):
    _, split = rated
    split.save(tmp_path / "split.npz")
    loaded = Split.load(tmp_path / "split.npz")
    assert loaded.protocol == "p4"
    for part in ("train", "val", "test"):
        pd.testing.assert_frame_equal(loaded.labelled[part], split.labelled[part], check_dtype=False)
    assert np.array_equal(loaded.train["item"], split.train["item"])
    assert Split.load(tmp_path / "split.npz").labelled is not None
    p1 = make_split(rated_dataset(), "p1")
    p1.save(tmp_path / "p1.npz")
    assert Split.load(tmp_path / "p1.npz").labelled is None


# ----------------------------------------------------------------------------------- histories


def test_history_is_the_earlier_training_positives_only():
    # item = 100 + time; ratings at times 0..19. Times 2 and 3 are simultaneous (both 2).
    ratings = np.array([5, 1, 4, 5, 2, 4, 5, 1, 4, 5, 2, 5, 4, 1, 5, 1, 4, 1, 5, 2], float)
    times = np.arange(20)
    times[3] = 2
    ds = build_dataset("t", one_user(ratings, times))
    split = make_split(ds, "p4")
    train = split.labelled["train"]
    rows = PointwiseRows(train, split.train, history_length=3, num_users=1)
    history = {i: [item_of(ds, [h])[0] for h in row if h >= 0]
               for i, row in zip(item_of(ds, train["item"]), rows.user_input(np.arange(len(rows))).history.numpy())}
    assert history[100] == []  # nothing before the first row
    assert history[102] == [100] and history[103] == [100]  # 102 and 103 are simultaneous: neither sees the other
    assert history[104] == [100, 102, 103]
    assert history[106] == [102, 103, 105]  # the negatives 101 and 104 never enter; truncated to 3
    # Validation and test rows read training positives only, never each other.
    train_positive_items = set(item_of(ds, split.train["item"]))
    for part in ("val", "test"):
        block = PointwiseRows(split.labelled[part], split.train, history_length=50, num_users=1)
        for row in block.user_input(np.arange(len(block))).history.numpy():
            assert set(item_of(ds, row[row >= 0])) == train_positive_items


def test_histories_match_a_slow_reference(rated):
    dataset, split = rated
    length = 5
    positives = split.train
    for part in ("train", "val", "test"):
        frame = split.labelled[part]
        rows = PointwiseRows(frame, positives, length, dataset.num_users, training=part == "train")
        history = rows.user_input(np.arange(len(rows))).history.numpy()
        for r, (u, t) in enumerate(zip(frame["user"], frame["timestamp"])):
            mine = positives[(positives["user"] == u) & (positives["timestamp"] < t)]
            expected = mine.sort_values(["timestamp", "item"])["item"].to_numpy()[-length:]
            assert history[r][history[r] >= 0].tolist() == expected.tolist()
            assert (history[r][: length - len(expected)] == -1).all()
        assert rows.example_age.max() <= 1 and (part == "train" or rows.example_age.max() == 0)


# ---------------------------------------------------------------------------------- statistics


def test_statistics_on_a_hand_made_frame():
    train = pd.DataFrame({"user": [0, 0, 1, 1, 1], "item": [0, 1, 0, 1, 1], "rating": [5.0, 1.0, 4.0, 4.0, 2.0]})
    stats = train_statistics(train, num_users=3, num_items=3)
    global_mean = 16 / 5
    assert stats["user_mean_rating"].tolist() == pytest.approx([3.0, 10 / 3, global_mean])
    assert stats["user_train_count"].tolist() == pytest.approx(np.log1p([2, 3, 0]).tolist())
    assert stats["item_mean_rating"].tolist() == pytest.approx([4.5, 7 / 3, global_mean])
    assert stats["item_train_count"].tolist() == pytest.approx(np.log1p([2, 3, 0]).tolist())


def test_statistics_become_standardised_numeric_fields(rated):
    dataset, split = rated
    enriched = add_train_statistics(dataset, split)
    assert {"user_mean_rating", "user_train_count"} <= set(enriched.users.fields)
    assert {"item_mean_rating", "item_train_count"} <= set(enriched.items.fields)
    assert "user_mean_rating" not in dataset.users.fields  # the original is left alone
    raw = train_statistics(split.labelled["train"], dataset.num_users, dataset.num_items)
    values = enriched.items.values["item_mean_rating"]
    assert abs(values.mean()) < 1e-5 and values.std() == pytest.approx(1.0, abs=1e-4)
    assert np.corrcoef(values, raw["item_mean_rating"])[0, 1] == pytest.approx(1.0)
    assert enriched.users.fields["user_train_count"].kind.value == "numeric"


def test_statistics_do_not_change_when_validation_or_test_ratings_change():
    frame, users, items = rated_frames()
    dataset = build_dataset("rated", frame.copy())
    split = make_split(dataset, "p4")
    enriched = add_train_statistics(dataset, split)
    # Flip every validation and test rating between the labelled values (1 <-> 5, 2 <-> 4): the
    # labelled rows and their parts stay the same, their labels all change.
    held = pd.concat([split.labelled["val"], split.labelled["test"]])
    key = pd.MultiIndex.from_arrays([dataset.user_ids[held["user"]], dataset.item_ids[held["item"]]])
    is_held = pd.MultiIndex.from_frame(frame[["user_id", "item_id"]]).isin(key)
    flipped = frame.copy()
    flipped.loc[is_held, "rating"] = 6 - flipped.loc[is_held, "rating"]
    flipped_dataset = build_dataset("rated", flipped)
    flipped_split = make_split(flipped_dataset, "p4")
    assert not np.array_equal(flipped_split.labelled["test"][LABEL], split.labelled["test"][LABEL])
    flipped_enriched = add_train_statistics(flipped_dataset, flipped_split)
    for table, other in ((enriched.users, flipped_enriched.users), (enriched.items, flipped_enriched.items)):
        for name in table.fields:
            assert np.array_equal(table.values[name], other.values[name]), name
    # The deliberate leak of `split.statistics: all_labels` (IntTower's released setting) does move them.
    leaky, flipped_leaky = (add_train_statistics(d, sp, leak_held_out_labels=True)
                            for d, sp in ((dataset, split), (flipped_dataset, flipped_split)))
    assert not np.array_equal(leaky.items.values["item_mean_rating"], flipped_leaky.items.values["item_mean_rating"])
    # ... whereas a training rating does move them (so this test can fail).
    user, item = (int(split.labelled["train"][c].iloc[0]) for c in ("user", "item"))
    changed = frame.copy()
    at = (changed["user_id"] == dataset.user_ids[user]) & (changed["item_id"] == dataset.item_ids[item])
    changed.loc[at, "rating"] = 6 - changed.loc[at, "rating"]
    changed_dataset = build_dataset("rated", changed)
    changed_enriched = add_train_statistics(changed_dataset, make_split(changed_dataset, "p4"))
    assert not np.array_equal(enriched.users.values["user_mean_rating"], changed_enriched.users.values["user_mean_rating"])


def test_ordered_statistics_match_a_slow_reference():
    """Each row reads the mean rating and log count of its entity's rows strictly before its
    time stamp (rows at the same time stamp do not see each other); none: the global mean."""
    rng = np.random.default_rng(3)
    n = 400
    train = pd.DataFrame({"user": rng.integers(0, 12, n), "item": rng.integers(0, 25, n),
                          "timestamp": rng.integers(0, 40, n), "rating": rng.integers(1, 6, n).astype(float)})
    stats = ordered_statistics(train)
    for side in ("user", "item"):
        for row in range(n):
            earlier = train[(train[side] == train[side][row]) & (train["timestamp"] < train["timestamp"][row])]
            mean = earlier["rating"].mean() if len(earlier) else train["rating"].mean()
            assert stats[f"{side}_mean_rating"][row] == pytest.approx(mean), (side, row)
            assert stats[f"{side}_train_count"][row] == pytest.approx(np.log1p(len(earlier))), (side, row)


def test_a_training_row_never_reads_its_own_rating(rated):
    """Changing one training row's rating leaves that row's ordered statistics alone, moves a
    later row's of the same user, and moves the entity statistics (the leak ordered ones avoid)."""
    dataset, split = rated
    train = split.labelled["train"]
    user = int(train["user"].iloc[0])
    rows = np.flatnonzero(train["user"].to_numpy() == user)
    row = rows[np.argmin(train["timestamp"].to_numpy()[rows])]
    later = rows[train["timestamp"].to_numpy()[rows] > train["timestamp"].iloc[row]][0]
    changed = train.copy()
    changed.loc[row, "rating"] = 6 - changed.loc[row, "rating"]
    before = ordered_statistics(train)["user_mean_rating"]
    after = ordered_statistics(changed)["user_mean_rating"]
    assert before[row] == pytest.approx(after[row], abs=0.02)  # only the global mean's share moves
    assert before[later] != pytest.approx(after[later], abs=0.1)
    entity = train_statistics(train, dataset.num_users, dataset.num_items)["user_mean_rating"][user]
    assert entity != pytest.approx(train_statistics(changed, dataset.num_users, dataset.num_items)["user_mean_rating"][user])


def test_ordered_row_statistics_use_the_tables_standardisation(rated):
    dataset, split = rated
    train = split.labelled["train"]
    rows = ordered_row_statistics(dataset, split)
    raw = ordered_statistics(train)
    entity = train_statistics(train, dataset.num_users, dataset.num_items)
    assert set(rows) == {"user", "item"} and set(rows["item"]) == {"item_mean_rating", "item_train_count"}
    for side in ("user", "item"):
        for name, values in rows[side].items():
            assert len(values) == len(train) and values.dtype == np.float32
            expected = (raw[name] - entity[name].mean()) / entity[name].std()
            assert np.allclose(values, expected, atol=1e-5), name
    assert np.allclose(standardise(entity["item_mean_rating"]), add_train_statistics(dataset, split).items.values["item_mean_rating"])


def test_in_split_statistics_read_the_parts_own_labels_and_reach_evaluation(rated):
    """The leak `in_split` reproduces: a test row reads the mean rating of its user's test rows,
    its own included; row_logits scores the rows with those values, not the tables'."""
    dataset, split = rated
    test = split.labelled["test"]
    stats = in_split_row_statistics(dataset, split, "test")
    entity = train_statistics(split.labelled["train"], dataset.num_users, dataset.num_items)["user_mean_rating"]
    row = 5
    own = test[test["user"] == test["user"][row]]["rating"].mean()
    assert stats["user"]["user_mean_rating"][row] == pytest.approx((own - entity.mean()) / entity.std(), rel=1e-5)
    enriched = with_split_features(dataset, split)
    model = build_model(parse_config({**p4_config("dssm"), "model": P4_MODELS["youtubednn"]}).model, enriched, "p4")
    plain = part_rows(split, "test", dataset.num_users, 10)
    leaky = part_rows(split, "test", dataset.num_users, 10, stats)
    assert not np.allclose(row_logits(model, plain), row_logits(model, leaky))


def test_row_values_replace_the_table_only_for_the_given_index_tensor(rated):
    dataset, split = rated
    embedder = FieldEmbedder(add_train_statistics(dataset, split).users, 4)
    users = torch.tensor([3, 1, 3])
    own = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad(), row_values(embedder, {"user_mean_rating": (users, own)}):
        tokens = embedder(users)
        other = embedder(users.clone())  # the same ids in another tensor: the table's values
    column = embedder.names.index("user_mean_rating")
    with torch.no_grad():
        assert torch.allclose(tokens[:, column], embedder.embeddings["user_mean_rating"](own[:, None]))
        assert torch.allclose(other, embedder(users))
        assert not torch.allclose(tokens[0, column], tokens[2, column])  # one user, two rows, two values
        unchanged = [i for i in range(len(embedder.names)) if i != column]
        assert torch.allclose(tokens[:, unchanged], other[:, unchanged])
    with pytest.raises(RuntimeError, match="user_mean_rating.*never read"):
        with row_values(embedder, {"user_mean_rating": (users, own)}):
            embedder(users.clone())
    assert embedder.row_values == {}  # the block always restores the table


P4_MODELS = {
    "youtubednn": {"name": "youtubednn", "similarity": "dot", "item_bias": True, "embedding_dim": 8,
                   "output_dim": 8, "user_hidden": [16]},
    "inttower": {"name": "inttower", "embedding_dim": 8, "user_hidden": [16, 8], "item_hidden": [16, 8]},
    "mvke": {"name": "mvke", "kernels": 2, "dim": 8, "expert_hidden": [16], "item_hidden": [16]},
    "colbert": {"name": "colbert", "dim": 16, "heads": 2, "user_layers": 1, "item_layers": 1, "projection_dim": 8},
    "cross": {"name": "cross", "dim": 16, "heads": 2, "layers": 1},
}


@pytest.mark.parametrize("name", sorted(P4_MODELS))
def test_every_p4_model_reads_a_rows_own_statistics(rated, name):
    """A P4 model's pointwise loss reads the rows' values on each side: the tables' own values
    give the loss without any, the ordered ones of either side another (no model ignores them)."""
    dataset, split = rated
    enriched = with_split_features(dataset, split)
    model = build_model(parse_config({**p4_config("dssm"), "model": P4_MODELS[name]}).model, enriched, "p4").eval()
    rows = part_rows(split, "train", dataset.num_users, 10, ordered_row_statistics(dataset, split))
    batch = rows.batch(np.arange(64))
    plain = dataclasses.replace(batch, user_values={}, item_values={})
    from_tables = dataclasses.replace(
        batch,
        user_values={n: torch.from_numpy(enriched.users.values[n])[batch.user.users] for n in batch.user_values},
        item_values={n: torch.from_numpy(enriched.items.values[n])[batch.items] for n in batch.item_values},
    )

    def loss(b) -> float:
        with torch.no_grad(), row_values(model, b.row_values()):
            return float(model.pointwise_loss(b)[0])

    reference = loss(plain)
    assert loss(from_tables) == pytest.approx(reference, rel=1e-5)
    for side in ("user", "item"):
        one_side = dataclasses.replace(batch, **{f"{other}_values": {} for other in ("user", "item") if other != side})
        assert loss(one_side) != pytest.approx(reference, abs=1e-6), side


# ------------------------------------------------------------------------------------- models


def test_score_pairs_is_the_diagonal_of_score(rated):
    dataset, split = rated
    config = parse_config(p4_config("dssm"))
    model = build_model(config.model, with_split_features(dataset, split), "p4").eval()
    rows = part_rows(split, "test", dataset.num_users, 10)
    index = np.arange(12)
    user, items = rows.user_input(index), torch.from_numpy(rows.items[index])
    with torch.no_grad():
        diagonal = torch.diagonal(model.score(user, items))
        assert torch.allclose(model.score_pairs(user, items), diagonal, atol=1e-5)
        # The base class's default (score every pair, keep the diagonal) agrees too.
        assert torch.allclose(Recommender.score_pairs(model, user, items), diagonal, atol=1e-5)
        loss, parts = Recommender.pointwise_loss(model, rows.batch(index))
        expected = torch.nn.functional.binary_cross_entropy_with_logits(diagonal, rows.batch(index).labels)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5) and "bce" in parts


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("changes, fragment", [
    ({"evaluate": {"early_stopping_metric": "recall@50"}}, "protocol p4 (pre-ranking) stops on one of auc|gauc|logloss"),
    ({"split": {"protocol": "p1"}, "evaluate": {"early_stopping_metric": "auc"}}, "are protocol p4's"),
    ({"split": {"protocol": "p1", "positive_min": 4}}, "positive_min is used by protocol p4 only"),
    ({"split": {"protocol": "p4", "positive_min": 3, "negative_max": 3}}, "must be below positive_min"),
    ({"split": {"protocol": "p2", "statistics": "ordered"}}, "statistics is used by protocol p4 only"),
    ({"split": {"protocol": "p4", "statistics": "leave_one_out"}}, "split.statistics"),
    ({"split": {"protocol": "p5"}}, "split.protocol"),
])
def test_invalid_p4_configs(changes, fragment):
    raw = {**p4_config("dssm"), **changes}
    if "evaluate" not in changes:
        raw.pop("evaluate", None)
    with pytest.raises(ConfigError, match=fragment.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw)


def test_p4_config_defaults():
    raw = p4_config("dssm")
    raw.pop("evaluate")
    config = parse_config(raw)  # no sampled negatives needed, auc by default
    assert config.evaluate.early_stopping_metric == "auc"
    assert (config.split.positive_min, config.split.negative_max) == (4.0, 2.0)
    assert config.split.statistics == "ordered"
    p1 = parse_config({"split": {"protocol": "p1"}, "model": {"name": "dssm"}})
    assert p1.split.positive_min is None and p1.evaluate.early_stopping_metric == "recall@50"
    assert p1.split.statistics is None


# ---------------------------------------------------------------------------------- end to end


def p4_config(model: str = "dssm", path: str | None = None, **train) -> dict:
    models = {
        "dssm": {"name": "dssm", "similarity": "dot", "temperature": 1.0, "item_bias": True,
                 "embedding_dim": 8, "output_dim": 8, "user_hidden": [16], "item_hidden": [16]},
        "mvke": {"name": "mvke", "kernels": 2, "dim": 8, "expert_hidden": [16], "item_hidden": [16]},
    }
    return {
        "dataset": {"name": "generic", "path": path, "options": GENERIC_OPTIONS},
        "split": {"protocol": "p4"},
        "model": models[model],
        "train": {"epochs": 4, "batch_size": 128, "lr": 0.01, "patience": 5, "threads": 1, "history_length": 10,
                  "negatives": {"sampler": "none", "num": 0}, **train},
        "evaluate": {"early_stopping_metric": "auc"},
    }


GENERIC_OPTIONS = {
    "interactions": "ratings.csv",
    "columns": {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"},
    "user_features": {"file": "users.csv", "id_column": "user_id", "fields": [{"column": "group", "kind": "categorical"}]},
    "item_features": {"file": "items.csv", "id_column": "item_id", "fields": [{"column": "genre", "kind": "categorical"}]},
}


@pytest.fixture(scope="module")
def rated_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rated")
    frame, users, items = rated_frames(num_users=80, num_items=60, rows=4000, seed=1)
    frame.to_csv(folder / "ratings.csv", index=False)
    users.to_csv(folder / "users.csv")
    items.to_csv(folder / "items.csv")
    return folder


def test_trainer_reduces_the_bce_and_run_writes_pointwise_metrics(tmp_path, rated_folder):
    out = tmp_path / "run"
    results = run_experiment(parse_config(p4_config(path=str(rated_folder), epochs=5)), out)
    history = results["training_history"]
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["protocol"] == "p4"
    for part in ("val", "test"):
        metrics = saved["metrics"][part]
        assert set(metrics) == {"auc", "gauc", "logloss", "rows"}
        assert 0 <= metrics["gauc"] <= 1 and metrics["logloss"] > 0
    assert saved["metrics"]["test"]["auc"] > 0.6  # the ratings carry a learnable signal
    assert saved["metrics"]["val"]["rows"] == len(Split.load(out / "split.npz").labelled["val"])
    best = history[results["timing"]["best_epoch"]]
    assert best["val_auc"] == max(h["val_auc"] for h in history) == saved["metrics"]["val"]["auc"]
    assert reevaluate(out) == {p: saved["metrics"][p] for p in ("val", "test")}
    table = format_table([results])
    assert "auc" in table and "logloss" in table and "recall@50" not in table


def test_pointwise_loss_is_what_the_trainer_minimises(tmp_path, rated_folder, monkeypatch):
    """The trainer calls model.pointwise_loss (a model may add terms) and never model.loss."""
    config = parse_config(p4_config(path=str(rated_folder), epochs=1))
    dataset = load_dataset("generic", rated_folder, GENERIC_OPTIONS)
    split = make_split(dataset, "p4")
    dataset = with_split_features(dataset, split)
    model = build_model(config.model, dataset, "p4")
    calls = []

    def pointwise_loss(batch):
        calls.append(len(batch))
        loss, parts = Recommender.pointwise_loss(model, batch)
        return loss + 0.0 * sum(p.sum() for p in model.parameters()), parts

    monkeypatch.setattr(model, "pointwise_loss", pointwise_loss)
    monkeypatch.setattr(model, "loss", lambda batch: pytest.fail("P4 must not call model.loss"))
    Trainer(model, dataset, split, config, tmp_path).fit()
    assert sum(calls) == len(split.labelled["train"])


@pytest.mark.parametrize("mode", ["ordered", "entity", "all_labels", "in_split"])
def test_the_trainer_feeds_the_configured_statistics(tmp_path, rated_folder, monkeypatch, mode):
    """Ordered statistics (the default) reach the training batches as per-row values, read by
    the model; entity statistics leave the tables' values in place."""
    raw = p4_config(path=str(rated_folder), epochs=1)
    raw["split"]["statistics"] = mode
    config = parse_config(raw)
    dataset = load_dataset("generic", rated_folder, GENERIC_OPTIONS)
    split = make_split(dataset, "p4")
    dataset = with_split_features(dataset, split, mode)
    model = build_model(config.model, dataset, "p4")
    seen = []
    original = model.item_fields.forward

    def spy(index):
        seen.append(set(model.item_fields.row_values))
        return original(index)

    monkeypatch.setattr(model.item_fields, "forward", spy)
    trainer = Trainer(model, dataset, split, config, tmp_path)
    expected = {"item_mean_rating", "item_train_count"} if mode in ("ordered", "in_split") else set()
    assert set(trainer.train_rows.item_values) == expected
    trainer.fit()
    assert seen and seen[0] == expected


def test_logloss_early_stopping_keeps_the_lowest(tmp_path, rated_folder):
    raw = p4_config(path=str(rated_folder), epochs=4, lr=0.05)
    raw["evaluate"] = {"early_stopping_metric": "logloss"}
    results = run_experiment(parse_config(raw), tmp_path / "run")
    history = results["training_history"]
    best = history[results["timing"]["best_epoch"]]
    assert best["val_logloss"] == min(h["val_logloss"] for h in history)
    assert results["metrics"]["val"]["logloss"] == pytest.approx(best["val_logloss"])


def test_p4_resume_continues_exactly(tmp_path, rated_folder):
    def trained(epochs, workdir, resume=False, seed=0):
        config = parse_config(p4_config(path=str(rated_folder), epochs=epochs))
        dataset = load_dataset("generic", rated_folder, GENERIC_OPTIONS)
        split = make_split(dataset, "p4")
        dataset = with_split_features(dataset, split)
        torch.manual_seed(seed)
        model = build_model(config.model, dataset, "p4")
        return Trainer(model, dataset, split, config, workdir).fit(resume=resume)

    (tmp_path / "full").mkdir(), (tmp_path / "resumed").mkdir()
    full = trained(3, tmp_path / "full")
    trained(1, tmp_path / "resumed")
    report = trained(3, tmp_path / "resumed", resume=True, seed=123)
    assert report.resumed_from_epoch == 1
    assert [h["loss"] for h in report.history] == [h["loss"] for h in full.history]
    assert [h["val_auc"] for h in report.history] == [h["val_auc"] for h in full.history]


def test_mvke_trains_pointwise(tmp_path, rated_folder):
    results = run_experiment(parse_config(p4_config("mvke", path=str(rated_folder), epochs=2)), tmp_path / "mvke")
    assert {"auc", "gauc", "logloss"} <= results["metrics"]["test"].keys()


def test_metrics_do_not_depend_on_the_row_block(rated, monkeypatch):
    import crosstower.evaluate.pre_ranking as pre_ranking

    dataset, split = rated
    config = parse_config(p4_config("dssm"))
    model = build_model(config.model, with_split_features(dataset, split), "p4")
    rows = part_rows(split, "test", dataset.num_users, 10)
    first = evaluate_rows(model, rows)[0]
    monkeypatch.setattr(pre_ranking, "ROW_BLOCK", 7)
    assert evaluate_rows(model, rows)[0] == first


def test_ranking_views_of_p4_hold_the_positives(rated):
    dataset, split = rated
    user = eval_user_input(split.test, np.arange(3), 10)
    assert user.history.shape == (3, 10)
    test = split.labelled["test"]
    positives = test[test[LABEL] == 1]
    assert set(split.test.users) == set(positives["user"])  # the users with a positive test row
