"""Loaders on the real releases in shared/data (skipped with a reason where a file is missing)
and on small files written to tmp_path (compression, errors, options)."""

from __future__ import annotations

import gzip
import json
import lzma
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crosstower.data.loaders import LOADERS, load_dataset
from crosstower.data.loaders.files import find_file, open_binary
from crosstower.data.loaders.movielens import read_ml1m_movies, read_ml1m_users
from crosstower.data.schema import FieldKind
from crosstower.errors import ConfigError, DataError


def need(root: Path, *relative: str) -> Path:
    """``root/relative`` (or a compressed copy), skipping the test where it is absent."""
    path = root.joinpath(*relative)
    for candidate in [path] + [path.with_name(path.name + s) for s in (".gz", ".bz2", ".xz", ".zip")]:
        if candidate.exists():
            return candidate
    pytest.skip(f"data file {path} not available")


def link(src: Path, dst: Path) -> None:
    """Make ``dst`` point at a real (read-only, never copied into the repo) data file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())


def items_of_user(ds, raw_user) -> list:
    """Raw item ids of one user in time order."""
    u = int(np.searchsorted(ds.user_ids, raw_user))
    rows = ds.interactions[ds.interactions["user"] == u].sort_values("timestamp", kind="stable")
    return list(ds.item_ids[rows["item"].to_numpy()])


def decoded(ds, side: str, field: str, raw_id) -> np.ndarray:
    """The encoded value of one field of one entity (by raw id)."""
    table = ds.users if side == "user" else ds.items
    ids = ds.user_ids if side == "user" else ds.item_ids
    return table.values[field][int(np.searchsorted(ids, raw_id))]


# --------------------------------------------------------------------------------------------
# registry and options


def test_registry_names_and_unknown_name():
    expected = {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest", "ml-latest-small"}
    assert expected | {"sequences", "deezer", "generic", "synthetic"} <= set(LOADERS)
    with pytest.raises(DataError, match=r"unknown dataset 'ml-99k'; valid names: .*ml-100k.*sequences"):
        load_dataset("ml-99k", Path("."), {})


def test_synthetic_is_registered_lazily():
    pytest.importorskip("crosstower.data.synthetic")
    ds = load_dataset("synthetic", None, {"num_users": 50, "num_items": 60, "num_clusters": 5})
    assert ds.num_users <= 50 and len(ds.interactions) > 0


def test_missing_data_dir_is_reported(tmp_path):
    with pytest.raises(DataError, match="no data directory given; pass --data-dir"):
        load_dataset("ml-100k", None, {})
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("ml-100k", missing, {})
    message = str(err.value)
    assert f"{missing}" in message and "u.data" in message and "--data-dir" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("ml-100k", {"min_ratin": 4}, r"^dataset\.options\.min_ratin: unknown key$"),
        ("ml-100k", {"min_rating": "high"}, r"^dataset\.options\.min_rating: "),
        ("sequences", {"format": "csv"}, r"^dataset\.options\.format: Input should be"),
        ("deezer", {"variant": "pca"}, r"^dataset\.options\.variant: "),
        ("generic", {}, r"^dataset\.options\.interactions: Field required$"),
        ("generic", {"interactions": "a.csv", "columns": {"usr": "u"}}, r"^dataset\.options\.columns\.usr: unknown key"),
        (
            "generic",
            {
                "interactions": "a.csv",
                "item_features": {"file": "i.csv", "id_column": "i", "fields": [{"kind": "numeric"}]},
            },
            r"^dataset\.options\.item_features\.fields\.0: a field needs 'column'",
        ),
    ],
)
def test_invalid_options_are_one_line_errors(tmp_path, name, options, expected):
    with pytest.raises(DataError, match=expected) as err:
        load_dataset(name, tmp_path, options)
    assert "\n" not in str(err.value)


def test_find_file_prefers_plain_then_compressed(tmp_path):
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(b"1 2\n"))
    assert find_file(tmp_path, "a.txt") == tmp_path / "a.txt.xz"
    (tmp_path / "a.txt").write_text("1 2\n")
    assert find_file(tmp_path, "a.txt") == tmp_path / "a.txt"
    with pytest.raises(DataError, match=r"x: expected b\.txt \(or b\.txt\.gz/.*\.zip\) in .*; pass --data-dir"):
        find_file(tmp_path, "b.txt", "x")


# --------------------------------------------------------------------------------------------
# MovieLens


def test_ml100k_counts_and_features(shared_data):
    need(shared_data, "ml-100k", "u.data")
    start = time.perf_counter()
    ds = load_dataset("ml-100k", shared_data, {})  # the data root: the loader finds ml-100k/
    elapsed = time.perf_counter() - start
    assert (len(ds.interactions), ds.num_users, ds.num_items) == (100_000, 943, 1_682)
    assert ds.has_time and "rating" in ds.interactions
    genres = ds.items.fields["genres"]
    assert genres.kind == FieldKind.MULTI_CATEGORICAL and genres.vocab_size == 19 + 1
    # Toy Story: Animation, Children's, Comedy -> three ids; GoldenEye: Action, Adventure, Thriller
    assert (decoded(ds, "item", "genres", 1) > 0).sum() == 3
    assert (decoded(ds, "item", "genres", 2) > 0).sum() == 3
    assert decoded(ds, "item", "year", 1) > 0 and decoded(ds, "item", "year", 267) == 0  # "unknown" movie
    assert set(ds.users.fields) == {"user_id", "gender", "age", "age_value", "occupation", "zip_prefix"}
    assert ds.users.fields["age"].vocab_size == 7 + 1  # the seven ML-1M age buckets
    assert ds.users.fields["age_value"].kind == FieldKind.NUMERIC
    assert elapsed < 5.0


def test_ml100k_min_rating(shared_data):
    data = need(shared_data, "ml-100k", "u.data")
    raw = pd.read_csv(data, sep="\t", header=None)
    ds = load_dataset("ml-100k", data.parent, {"min_rating": 4, "features": False})
    assert len(ds.interactions) == int((raw[2] >= 4).sum()) == 55_375
    assert ds.interactions["rating"].min() == 4
    assert set(ds.items.fields) == {"item_id"} and set(ds.users.fields) == {"user_id"}


def test_ml100k_compressed_copy(shared_data, tmp_path):
    data = need(shared_data, "ml-100k", "u.data")
    with open_binary(data) as handle:
        lines = handle.read().splitlines(keepends=True)[:2000]
    (tmp_path / "u.data.xz").write_bytes(lzma.compress(b"".join(lines)))
    with gzip.open(tmp_path / "u.item.gz", "wb") as out, open_binary(need(data.parent, "u.item")) as handle:
        out.write(handle.read())
    user_file = need(data.parent, "u.user")
    link(user_file, tmp_path / user_file.name)
    ds = load_dataset("ml-100k", tmp_path, {})
    assert len(ds.interactions) == 2000
    assert ds.items.fields["genres"].vocab_size > 1


def test_ml_latest_small(shared_data):
    need(shared_data, "ml-latest-small", "ratings.csv")
    ds = load_dataset("ml-latest-small", shared_data / "ml-latest-small", {})
    assert (len(ds.interactions), ds.num_users, ds.num_items) == (100_836, 610, 9_724)
    assert set(np.unique(ds.interactions["rating"])) == {x / 2 for x in range(1, 11)}  # CRLF did not leak
    assert ds.items.fields["genres"].kind == FieldKind.MULTI_CATEGORICAL
    assert ds.users.fields.keys() == {"user_id"}  # no user file in the CSV releases
    # 114335 "La cravate (1957)" has "(no genres listed)" and is rated: empty genres, year 1957 kept
    assert (decoded(ds, "item", "genres", 114335) == 0).all()
    assert decoded(ds, "item", "year", 114335) > 0


def test_ml1m_without_ratings_is_a_clear_error(shared_data):
    folder = need(shared_data, "ml-1m", "movies.dat").parent
    if (folder / "ratings.dat").exists():
        pytest.skip("ratings.dat is present; the missing-file case cannot be observed here")
    with pytest.raises(DataError) as err:
        load_dataset("ml-1m", shared_data, {})
    message = str(err.value)
    assert message.startswith("ml-1m: expected ratings.dat (or ratings.dat.gz")
    assert str(folder) in message and message.endswith("pass --data-dir")


def test_read_ml1m_movies_and_users(shared_data):
    movies = read_ml1m_movies(need(shared_data, "ml-1m", "movies.dat"))
    assert len(movies) == 3_883 and movies.index.max() == 3_952
    assert movies.loc[73, "title"] == "Misérables, Les (1995)"  # latin-1 decoded
    assert movies.loc[1, "genres"] == "Animation|Children's|Comedy" and movies.loc[1, "year"] == "1995"
    assert movies["year"].notna().all()
    users = read_ml1m_users(need(shared_data, "ml-1m", "users.dat"))
    assert len(users) == 6_040
    assert users["gender"].value_counts().to_dict() == {"M": 4_331, "F": 1_709}
    assert set(users["age"]) == {1, 18, 25, 35, 45, 50, 56}
    assert users.loc[1].tolist() == ["F", 1, 10, "4"]


def test_ml1m_full_dataset_from_tiny_ratings(shared_data, tmp_path):
    for name in ("movies.dat", "users.dat"):
        real = need(shared_data, "ml-1m", name)
        link(real, tmp_path / "ml-1m" / real.name)
    (tmp_path / "ml-1m" / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n1::914::3::978301968\n"
        "2::1357::5::978298709\n2::3068::4::978299000\n6040::1::4::956716541\n"
    )
    ds = load_dataset("ml-1m", tmp_path, {})  # finds the ml-1m/ sub-folder
    assert (len(ds.interactions), ds.num_users, ds.num_items) == (6, 3, 6)
    assert list(ds.user_ids) == [1, 2, 6040]
    assert items_of_user(ds, 1) == [1193, 914, 661]  # time order, not file order
    assert set(ds.users.fields) == {"user_id", "gender", "age", "occupation", "zip_prefix"}
    assert decoded(ds, "user", "gender", 1) != decoded(ds, "user", "gender", 2)  # F vs M
    assert (decoded(ds, "item", "genres", 1) > 0).sum() == 3
    ds4 = load_dataset("ml-1m", tmp_path / "ml-1m", {"min_rating": 4})
    assert len(ds4.interactions) == 4


def test_ml10m_movies_and_tiny_ratings(shared_data, tmp_path):
    movies_file = need(shared_data, "ml-10M100K", "movies.dat")
    movies = read_ml1m_movies(movies_file, encoding="utf-8")
    assert len(movies) == 10_681 and movies.loc[73, "title"] == "Misérables, Les (1995)"
    with pytest.raises(DataError, match=r"ml-10m: expected ratings\.dat .* in .*ml-10M100K"):
        load_dataset("ml-10m", shared_data, {})
    link(movies_file, tmp_path / movies_file.name)
    (tmp_path / "ratings.dat").write_text("1::122::5::838985046\n1::185::4.5::838983525\n7::73::0.5::1\n")
    ds = load_dataset("ml-10m", tmp_path, {})
    assert (len(ds.interactions), ds.num_users, ds.num_items) == (3, 2, 3)
    assert sorted(ds.interactions["rating"]) == [0.5, 4.5, 5.0]
    assert set(ds.users.fields) == {"user_id"} and "genres" in ds.items


def test_movielens_csv_with_crlf_quotes_and_gzip(tmp_path):
    (tmp_path / "movies.csv").write_bytes(
        b'movieId,title,genres\r\n1,"Toy Story, The (1995)",Adventure|Animation\r\n'
        b'2,No Year,(no genres listed)\r\n3,"Quoted ""Title"" (2001) ",Drama\r\n'
    )
    with gzip.open(tmp_path / "ratings.csv.gz", "wb") as out:
        out.write(b"userId,movieId,rating,timestamp\r\n1,1,4.0,10\r\n1,2,3.5,11\r\n2,3,5.0,12\r\n")
    ds = load_dataset("ml-25m", tmp_path, {})
    assert (len(ds.interactions), ds.num_users, ds.num_items) == (3, 2, 3)
    assert ds.items.fields["genres"].vocab_size == 4  # Adventure, Animation, Drama + padding
    assert (decoded(ds, "item", "genres", 2) == 0).all()
    assert decoded(ds, "item", "year", 2) == 0 and decoded(ds, "item", "year", 3) > 0


# --------------------------------------------------------------------------------------------
# SASRec / S3-Rec sequences


def test_beauty_sequences_with_attributes(shared_data):
    need(shared_data, "s3rec", "Beauty.txt")
    start = time.perf_counter()
    ds = load_dataset("sequences", shared_data / "s3rec", {"file": "Beauty.txt"})
    elapsed = time.perf_counter() - start
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (22_363, 12_101, 198_502)
    assert not ds.has_time
    assert items_of_user(ds, 1) == [1, 2, 3, 4, 5]  # file order is time order
    attributes = ds.items.fields["attributes"]
    assert attributes.kind == FieldKind.MULTI_CATEGORICAL and attributes.vocab_size == 637 + 1
    assert np.isclose((ds.items.values["attributes"] > 0).sum(1).mean(), 3.72, atol=0.01)
    assert elapsed < 3.0


def test_video_per_interaction_lines(shared_data):
    need(shared_data, "sasrec-amazon-video-games", "Video.txt")
    ds = load_dataset("sequences", shared_data / "sasrec-amazon-video-games", {"format": "per_interaction_line"})
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (31_013, 23_715, 287_107)
    assert set(ds.items.fields) == {"item_id"}
    assert items_of_user(ds, 1)[:3] == [6393, 13504, 14087]


def test_sequences_choices_and_errors(shared_data, tmp_path):
    need(shared_data, "s3rec", "Beauty.txt")
    with pytest.raises(DataError, match=r"set dataset\.options\.file to one sequence file .*Beauty\.txt"):
        load_dataset("sequences", shared_data / "s3rec", {})
    ds = load_dataset("sequences", shared_data / "s3rec", {"file": "LastFM.txt", "attributes": False})
    assert set(ds.items.fields) == {"item_id"}
    with pytest.raises(DataError, match=r"line 1 has 6 fields; expected 'user item'"):
        load_dataset("sequences", shared_data / "s3rec", {"file": "Beauty.txt", "format": "per_interaction_line"})
    with pytest.raises(DataError, match=r"expected Nope\.json"):
        load_dataset("sequences", shared_data / "s3rec", {"file": "Beauty.txt", "attributes": "Nope.json"})


def test_sequences_compressed_and_string_ids(tmp_path):
    with gzip.open(tmp_path / "toy.txt.gz", "wt") as out:
        out.write("u2 c a\nu1 a b c\n\nu1 d\n")
    (tmp_path / "toy_item2attributes.json").write_text(json.dumps({"a": [1, 2], "b": [3]}))
    ds = load_dataset("sequences", tmp_path, {})
    assert ds.name == "toy" and (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 4, 6)
    assert items_of_user(ds, "u1") == ["a", "b", "c", "d"]
    assert ds.items.fields["attributes"].vocab_size == 4 and ds.items.fields["attributes"].dim == 2
    assert (decoded(ds, "item", "attributes", "d") == 0).all()


# --------------------------------------------------------------------------------------------
# Deezer


def test_deezer_sample(shared_data):
    folder = need(shared_data, "deezer-semi-perso-cold-start-sample", "user_features_train.parquet").parent
    ds = load_dataset("deezer", folder, {})
    split = ds.metadata["user_split"]
    assert ds.num_users == 15 and split.shape == (15,)
    assert {s: int((split == s).sum()) for s in ("train", "validation", "test")} == {
        "train": 5, "validation": 5, "test": 5,
    }  # fmt: skip
    assert set(split[ds.user_ids >= 90_000]) == {"test"} and set(split[ds.user_ids < 70_000]) == {"train"}
    listened = sum(
        int(pd.read_parquet(folder / f"user_features_{s}.parquet", columns=["d1d30_songs"]).iloc[:, 0].map(len).sum())
        for s in ("train", "validation", "test")
    )
    assert not ds.has_time and len(ds.interactions) == listened
    dense = [f for f in ds.users.fields.values() if f.kind == FieldKind.DENSE_VECTOR]
    assert len(dense) == 20 and {f.dim for f in dense} == {128}
    assert "age_value" in ds.users and "nb_streamed_songs" in ds.users
    assert ds.items.fields["features_svd"].dim == 128 and ds.items.fields["features_mf"].dim == 256
    assert np.abs(ds.items.values["features_svd"]).sum() > 0


def test_deezer_variant_files(shared_data, tmp_path):
    src = need(shared_data, "deezer-semi-perso-cold-start-sample", "user_features_train.parquet").parent
    for split in ("train", "validation", "test"):
        link(src / f"user_features_{split}.parquet", tmp_path / f"user_features_{split}_svd.parquet")
    link(src / "song_embeddings.parquet", tmp_path / "song_embeddings.parquet")
    with pytest.raises(DataError, match=r"set dataset\.options\.variant: svd"):
        load_dataset("deezer", tmp_path, {})
    ds = load_dataset("deezer", tmp_path, {"variant": "svd", "splits": ["test"]})
    assert set(ds.metadata["user_split"]) == {"test"} and ds.num_users == 5
    assert set(ds.items.fields) == {"item_id", "features_svd"}
    (tmp_path / "song_embeddings.parquet").unlink()
    with pytest.raises(DataError, match=r"expected song_embeddings\.parquet"):
        load_dataset("deezer", tmp_path, {"variant": "svd"})
    ds = load_dataset("deezer", tmp_path, {"variant": "svd", "item_vectors": [], "user_features": False})
    assert set(ds.users.fields) == {"user_id"} and set(ds.items.fields) == {"item_id"}


# --------------------------------------------------------------------------------------------
# generic


def test_generic_csv_on_ml_latest_small(shared_data):
    folder = need(shared_data, "ml-latest-small", "ratings.csv").parent
    options = {
        "interactions": "ratings.csv",
        "columns": {"user": "userId", "item": "movieId", "timestamp": "timestamp", "rating": "rating"},
        "item_features": {
            "file": "movies.csv",
            "id_column": "movieId",
            "fields": [{"column": "genres", "kind": "multi_categorical", "sep": "|", "max_len": 4}],
        },
        "min_rating": 4.0,
    }
    ds = load_dataset("generic", folder, options)
    assert ds.name == "ratings" and (ds.interactions["rating"] >= 4).all()
    assert ds.items.fields["genres"].dim == 4


def test_generic_features_positions_and_formats(tmp_path):
    (tmp_path / "log.tsv").write_text("a\tx\t2024-01-02\nb\ty\t2024-01-01\na\ty\t2024-01-01\n")
    users = pd.DataFrame({"uid": ["a", "b"], "country": ["fr", "de"], "age": [30, 40]})
    with gzip.open(tmp_path / "users.parquet.gz", "wb") as out:  # an outer compression is undone too
        out.write(users.to_parquet())
    with zipfile.ZipFile(tmp_path / "items.csv.zip", "w") as zf:
        zf.writestr("items.csv", 'iid,tags,vec\nx,"p|q","[1.0, 2.0]"\ny,q,"[3.0, 4.0]"\n')
    options = {
        "interactions": "log.tsv",
        "header": False,
        "columns": {"user": 0, "item": 1, "timestamp": 2},
        "user_features": {
            "file": "users.parquet",
            "id_column": "uid",
            "fields": [{"column": "country", "kind": "categorical"}, {"column": "age", "kind": "numeric"}],
        },
        "item_features": {
            "file": "items.csv",
            "id_column": "iid",
            "fields": [
                {"column": "tags", "kind": "multi_categorical", "sep": "|", "name": "tag"},
                {"column": "vec", "kind": "dense_vector"},
            ],
        },
        "name": "toy",
    }
    ds = load_dataset("generic", tmp_path, options)
    assert ds.name == "toy" and (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 2, 3)
    assert items_of_user(ds, "a") == ["y", "x"]  # ordered by the parsed dates
    assert set(ds.users.fields) == {"user_id", "country", "age"}
    assert ds.items.fields["tag"].vocab_size == 3 and ds.items.fields["vec"].dim == 2
    np.testing.assert_allclose(decoded(ds, "item", "vec", "y"), [3.0, 4.0])


def test_generic_missing_column_and_file(tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"^log\.csv: missing column 'ts' \(have \['user_id', 'item_id'\]\)$"):
        load_dataset("generic", tmp_path, {"interactions": "log.csv", "columns": {"timestamp": "ts"}})
    with pytest.raises(DataError, match=r"log\.csv: missing column 5 \(the file has 2 columns\)"):
        load_dataset("generic", tmp_path, {"interactions": "log.csv", "columns": {"user": 5}})
    with pytest.raises(DataError, match=r"generic: expected other\.csv \(or .*\) in .*; pass --data-dir"):
        load_dataset("generic", tmp_path, {"interactions": "other.csv"})
    (tmp_path / "items.csv").write_text("id,genre\n2,a\n")
    options = {
        "interactions": "log.csv",
        "item_features": {
            "file": "items.csv",
            "id_column": "id",
            "fields": [{"column": "genres", "kind": "categorical"}],
        },
    }
    with pytest.raises(DataError, match=r"^items\.csv: missing column 'genres' \(have \['id', 'genre'\]\)$"):
        load_dataset("generic", tmp_path, options)
    ds = load_dataset("generic", tmp_path, {"interactions": "log.csv"})
    assert ds.num_users == 1


def test_unreadable_file_is_a_data_error(tmp_path):
    (tmp_path / "u.data.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"u\.data\.gz: cannot read"):
        load_dataset("ml-100k", tmp_path, {"features": False})


@pytest.mark.parametrize("numeric_ids", [True, False])
def test_generic_blank_ids_are_an_error_naming_the_lines_or_are_skipped_on_request(tmp_path, caplog, numeric_ids):
    users = ["1", "", "2", "3", "  "] if numeric_ids else ["u1", "", "u2", "u3", "  "]
    items = ["10", "11", "", "12", "13"]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for t, (u, i) in enumerate(zip(users, items))))
    with pytest.raises(DataError, match=r"^log\.csv: 2 rows with a blank id in column 'user_id' \(lines 3, 6\); "
                                        r"fill them, or set dataset\.options\.skip_invalid_rows: true"):
        load_dataset("generic", tmp_path, {"interactions": "log.csv", "columns": {"timestamp": "timestamp"}})
    with caplog.at_level("WARNING"):
        ds = load_dataset("generic", tmp_path, {"interactions": "log.csv", "columns": {"timestamp": "timestamp"},
                                                "skip_invalid_rows": True})
    assert len(ds.interactions) == 2 and "dropped 3 rows with a blank id" in caplog.text
    assert "nan" not in {str(v) for v in ds.user_ids}


def test_generic_several_feature_files_per_side_wide_and_long(tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},{i},{u * 10 + i}\n" for u in range(3) for i in (1, 2, 3)))
    (tmp_path / "brand.csv").write_text("item_id,brand,title\n1,acme,First\n2,zenith,Second\n3,acme,Third\n3,acme,Third\n")
    (tmp_path / "category.csv").write_text("item_id,category\n1,7\n1,9\n2,7\n3,11\n3,7\n3,9\n")
    item_files = [{"file": "brand.csv", "id_column": "item_id", "fields": [{"column": "brand", "kind": "categorical"}]},
                  {"file": "category.csv", "id_column": "item_id", "format": "long",
                   "fields": [{"column": "category", "kind": "multi_categorical"}]}]
    ds = load_dataset("generic", tmp_path, {"interactions": "log.csv", "columns": {"timestamp": "timestamp"},
                                            "item_features": item_files})
    category, brand = ds.items.fields["category"], ds.items.fields["brand"]
    decoded = [sorted(category.vocabulary[v - 1] for v in row if v > 0) for row in ds.items.values["category"]]
    assert decoded == [["7", "9"], ["7"], ["11", "7", "9"]] and category.dim == 3
    assert [brand.vocabulary[v - 1] for v in ds.items.values["brand"]] == ["acme", "zenith", "acme"]
    assert ds.item_names.tolist() == ["First", "Second", "Third"]
    assert ds.stats()["item_fields"]["category"]["mean_values"] == 2.0


@pytest.mark.parametrize("files, message", [
    ([{"file": "category.csv", "id_column": "item_id", "fields": [{"column": "category", "kind": "categorical"}]}],
     r"category\.csv: 2 item ids have several different rows \(e\.g\. 1, 3\); for several values per item declare "
     r"format: long and the field as kind multi_categorical"),
    ([{"file": "category.csv", "id_column": "item_id", "format": "long",
       "fields": [{"column": "category", "kind": "categorical"}]}], r"declare \['category'\] as kind multi_categorical"),
    ([{"file": "category.csv", "id_column": "item_id", "format": "long",
       "fields": [{"column": "category", "kind": "multi_categorical"}]},
      {"file": "category.csv", "id_column": "item_id", "format": "long",
       "fields": [{"column": "category", "kind": "multi_categorical"}]}],
     r"category\.csv: column 'category' is also read from category\.csv"),
])
def test_generic_feature_file_mismatches_are_one_error(tmp_path, files, message):
    (tmp_path / "log.csv").write_text("user_id,item_id\nu1,1\nu1,2\nu2,3\n")
    (tmp_path / "category.csv").write_text("item_id,category\n1,7\n1,9\n2,7\n3,11\n3,7\n")
    with pytest.raises((DataError, ConfigError), match=message):
        load_dataset("generic", tmp_path, {"interactions": "log.csv", "item_features": files})


def test_generic_multi_categorical_integers_in_a_wide_file(tmp_path):
    (tmp_path / "log.csv").write_text("user_id,item_id\nu1,1\nu1,2\nu2,3\n")
    (tmp_path / "items.csv").write_text("item_id,genre\n1,4\n2,\n3,5\n")
    ds = load_dataset("generic", tmp_path, {"interactions": "log.csv", "item_features": {
        "file": "items.csv", "id_column": "item_id", "fields": [{"column": "genre", "kind": "multi_categorical"}]}})
    assert ds.items.fields["genre"].vocabulary == ("4.0", "5.0") or ds.items.fields["genre"].vocabulary == ("4", "5")
    assert (ds.items.values["genre"] > 0).sum(axis=1).tolist() == [1, 0, 1]
