"""The synthetic generator: determinism, disk round trip, and that the planted structure is there."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from crosstower.data.schema import FieldKind
from crosstower.data.synthetic import SyntheticConfig, generate, load_synthetic, planted_relevance, write
from crosstower.errors import DataError

SMALL = dict(num_users=600, num_items=800, num_clusters=12, num_styles=6, num_segments=8, chunk_users=250)


@pytest.fixture(scope="module")
def small():
    return generate(SyntheticConfig(**SMALL))


def _frames(ds) -> list[pd.DataFrame]:
    side = lambda t: pd.DataFrame(t.values)  # noqa: E731 - every field here is one column
    ids = pd.DataFrame({"u": ds.user_ids}), pd.DataFrame({"i": ds.item_ids})
    return [ds.interactions, side(ds.users), side(ds.items), *ids]


def _assert_same(a, b) -> None:
    for x, y in zip(_frames(a), _frames(b)):
        pd.testing.assert_frame_equal(x, y)
    ta, tb = a.metadata["synthetic"], b.metadata["synthetic"]
    assert ta.keys() == tb.keys()
    for key in ta:
        np.testing.assert_array_equal(np.asarray(ta[key], dtype=object), np.asarray(tb[key], dtype=object))


def test_same_seed_same_data_other_seed_differs(small):
    _assert_same(small, generate(SyntheticConfig(**SMALL)))
    other = generate(SyntheticConfig(**SMALL, seed=1))
    assert not small.interactions.equals(other.interactions)


def test_write_then_load_equals_in_memory(small, tmp_path):
    out = write(SyntheticConfig(**SMALL), tmp_path / "syn", progress=False)
    assert sorted(p.name for p in (out / "interactions").iterdir()) == [f"part-0000{c}.parquet" for c in range(3)]
    assert json.loads((out / "config.json").read_text())["chunk_users"] == 250
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    _assert_same(small, load_synthetic(out))
    with pytest.raises(DataError, match="already exists"):
        write(SyntheticConfig(**SMALL), out, progress=False)
    with pytest.raises(DataError, match="dataset.options.seed"):
        load_synthetic(out, seed=5)


def test_chunking_is_part_of_the_seed_but_users_do_not_depend_on_later_chunks():
    first = generate(SyntheticConfig(**{**SMALL, "num_users": 250}))
    whole = generate(SyntheticConfig(**SMALL))
    raw = lambda ds: ds.interactions.assign(item=ds.item_ids[ds.interactions["item"]])  # noqa: E731
    head = raw(whole).query("user < 250").reset_index(drop=True)
    pd.testing.assert_frame_equal(raw(first), head)


def test_schema_kinds_and_ranges(small):
    kinds = {n: f.kind for n, f in small.users.fields.items()}
    assert kinds == {n: FieldKind.CATEGORICAL for n in ("user_id", "segment", "age_bucket", "region")}
    item_kinds = {n: f.kind for n, f in small.items.fields.items()}
    assert item_kinds["price"] == FieldKind.NUMERIC and item_kinds["brand"] == FieldKind.CATEGORICAL
    assert "interests" not in small.users  # latent: visible only through the history
    inter = small.interactions
    assert inter["user"].between(0, small.num_users - 1).all() and inter["item"].between(0, small.num_items - 1).all()
    assert small.num_users == 600 and small.num_items <= 800
    assert not inter.duplicated(["user", "item"]).any()
    assert (inter.groupby("user")["timestamp"].diff().dropna() > 0).all()  # row order is time order
    assert small.items.fields["cluster"].vocab_size <= 12 + 1


def test_popularity_is_power_law(small):
    counts = np.sort(np.bincount(small.interactions["item"], minlength=small.num_items))[::-1]
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.25


def test_planted_structure_holds(small):
    truth, inter = small.metadata["synthetic"], small.interactions
    users, items = inter["user"].to_numpy(), inter["item"].to_numpy()
    cluster, style = truth["item_cluster"][items], truth["item_style"][items]
    in_interest = (truth["interests"][users] == cluster[:, None]).any(axis=1)
    # 80% of draws are interest mode (fewer survive de-duplication); a shuffled user sees chance.
    shuffled = np.random.default_rng(0).permutation(users)
    chance = (truth["interests"][shuffled] == cluster[:, None]).any(axis=1).mean()
    assert in_interest.mean() > 0.65 and chance < 0.4
    per_user = pd.Series(cluster[in_interest]).groupby(users[in_interest]).nunique()
    assert per_user.max() <= 5 and per_user.mean() < 3  # interests_max 5, mean 2.5 (clipped)
    liked = truth["taste"][truth["segment"][users], cluster, style]
    # liked_style_density is 0.3: that is the share a style-blind process would give.
    assert liked.mean() > 0.6 and liked[in_interest].mean() > 0.85
    rel = planted_relevance(small, users[:100], items[:100])
    assert rel[np.arange(100), np.arange(100)].tolist() == (in_interest & liked)[:100].tolist()


def test_unknown_or_invalid_option_is_a_one_line_data_error():
    with pytest.raises(DataError, match=r"^dataset\.options\.num_userz: unknown key$"):
        load_synthetic(num_userz=10)
    with pytest.raises(DataError, match=r"^dataset\.options\.liked_style_density: "):
        load_synthetic(liked_style_density=2.0)
    with pytest.raises(DataError, match="interests_max"):
        load_synthetic(num_clusters=3)
