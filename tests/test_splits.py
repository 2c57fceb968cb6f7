import numpy as np
import pandas as pd
import pytest

from crosstower.data.dataset import build_dataset
from crosstower.data.ragged import Ragged
from crosstower.data.splits import Split, make_split
from crosstower.errors import DataError
from tests.helpers import random_dataset


def _user_rows(block, user):
    r = int(np.nonzero(block.users == user)[0][0])
    return block.history.row(r), block.exclude.row(r), block.targets.row(r)


def test_p1_is_temporal_per_user():
    # one user, 10 interactions at times 0..9 with items 100..109 (item = time + 100)
    frame = pd.DataFrame({"user_id": 0, "item_id": np.arange(100, 110)[::-1], "timestamp": np.arange(10)[::-1]})
    ds = build_dataset("t", frame)
    split = make_split(ds, "p1")
    item = lambda idx: ds.item_ids[idx]  # noqa: E731
    assert list(item(split.train["item"].to_numpy())) == list(range(100, 107))
    hist, excl, targets = _user_rows(split.val, 0)
    assert list(item(hist)) == list(range(100, 107)) and list(item(targets)) == [107]
    hist, excl, targets = _user_rows(split.test, 0)
    assert list(item(hist)) == list(range(100, 108)) and list(item(targets)) == [108, 109]
    assert list(item(excl)) == list(range(100, 108))


def test_p1_ties_in_time_are_broken_by_item():
    frame = pd.DataFrame({"user_id": 0, "item_id": [5, 3, 9, 1, 7, 2, 8, 4, 6, 0], "timestamp": 0})
    split = make_split(build_dataset("t", frame), "p1")
    assert list(split.test.targets.row(0)) == [8, 9]


def test_p2_users_are_disjoint_and_history_precedes_targets():
    ds = random_dataset(num_users=200, rows=6000)
    split = make_split(ds, "p2", seed=3)
    train_users = set(split.train["user"])
    val, test = set(split.val.users), set(split.test.users)
    assert not (train_users & val) and not (train_users & test) and not (val & test)
    times = ds.interactions.set_index(["user", "item"])["timestamp"]
    for r in range(len(split.test)):
        u = split.test.users[r]
        hist, targets = split.test.history.row(r), split.test.targets.row(r)
        assert list(split.test.exclude.row(r)) == list(hist)
        assert max(times[(u, i)] for i in hist) <= min(times[(u, i)] for i in targets)
        n = len(ds.interactions[ds.interactions.user == u])
        assert len(hist) == int(np.ceil(0.8 * n))


def test_p2_is_deterministic_by_seed():
    ds = random_dataset(num_users=200, rows=6000)
    a, b, c = make_split(ds, "p2", 1), make_split(ds, "p2", 1), make_split(ds, "p2", 2)
    assert np.array_equal(a.test.users, b.test.users)
    assert not np.array_equal(a.test.users, c.test.users)


def test_p3_has_no_history_and_all_targets():
    ds = random_dataset(num_users=200, rows=6000)
    split = make_split(ds, "p3")
    assert split.test.history.lengths.sum() == 0 and split.test.exclude.lengths.sum() == 0
    n = ds.interactions.groupby("user").size()
    assert np.array_equal(split.test.targets.lengths, n[split.test.users].to_numpy())


def test_split_round_trips_through_file(tmp_path):
    split = make_split(random_dataset(), "p1")
    split.save(tmp_path / "split.npz")
    loaded = Split.load(tmp_path / "split.npz")
    assert loaded.protocol == "p1"
    assert np.array_equal(loaded.test.targets.values, split.test.targets.values)
    assert np.array_equal(loaded.train["item"], split.train["item"])


def test_corrupt_split_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "split.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="split.npz"):
        Split.load(path)


def test_empty_part_is_an_error():
    frame = pd.DataFrame({"user_id": [0, 0], "item_id": [1, 2], "timestamp": [0, 1]})
    with pytest.raises(DataError, match="empty"):
        make_split(build_dataset("tiny", frame), "p1")


def test_unknown_protocol():
    with pytest.raises(DataError, match="protocol"):
        make_split(random_dataset(), "p9")


def test_ragged_padded_tail_and_take():
    r = Ragged(np.array([0, 3, 3, 5]), np.array([1, 2, 3, 4, 5]))
    assert r.padded_tail(2).tolist() == [[2, 3], [-1, -1], [4, 5]]
    assert r.take(np.array([2, 0])).values.tolist() == [4, 5, 1, 2, 3]
    both = Ragged.concat_rows(r, r.take(np.array([1, 2, 0])))
    assert [both.row(i).tolist() for i in range(3)] == [[1, 2, 3], [4, 5], [4, 5, 1, 2, 3]]


def test_release_user_split_is_respected():
    ds = random_dataset(num_users=30, rows=900)
    ds.metadata["user_split"] = np.array(["train"] * 20 + ["validation"] * 5 + ["test"] * 5)
    split = make_split(ds, "p3")
    assert set(split.train["user"]) <= set(range(20))
    assert set(split.val.users) <= set(range(20, 25)) and set(split.test.users) <= set(range(25, 30))
