"""The download backend without the network: urlopen is replaced by fakes."""

from __future__ import annotations

import hashlib
import io
import socket
import zipfile
from dataclasses import replace
from pathlib import Path
from urllib.error import URLError

import pytest

from crosstower.data import download as dl
from crosstower.errors import DataError


class FakeResponse(io.BytesIO):
    """What ``urlopen`` returns: a readable context manager."""


def serve(payloads: dict[str, bytes], calls: list[str] | None = None):
    """A fake ``urlopen`` serving ``payloads`` by URL and failing like urllib for the rest."""

    def urlopen(url, timeout=None):
        assert timeout is not None and timeout <= 20  # never hang on a dead network
        if calls is not None:
            calls.append(url)
        if url not in payloads:
            raise URLError("Name or service not known")
        return FakeResponse(payloads[url])

    return urlopen


def fake_zip(folder: str, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in files.items():
            zf.writestr(f"{folder}/{name}", content)
    return buffer.getvalue()


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.iterdir()) if target.exists() else []


ML100K_FILES = {"u.data": b"1\t2\t3\t4\n", "u.item": b"2|x|||" + b"|0" * 19 + b"\n", "u.user": b"1|24|M|x|1\n"}


def test_unknown_name():
    with pytest.raises(DataError, match=r"cannot download 'ml-5m'; downloadable data sets: ml-100k, ml-1m"):
        dl.download("ml-5m", Path("."))


@pytest.mark.parametrize("failure", [URLError("Temporary failure in name resolution"), socket.timeout("timed out")])
def test_no_network_is_one_line(monkeypatch, tmp_path, failure):
    def urlopen(url, timeout=None):
        raise failure

    monkeypatch.setattr(dl, "urlopen", urlopen)
    with pytest.raises(DataError) as err:
        dl.download("ml-100k", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot reach https://files.grouplens.org/datasets/movielens/ml-100k.zip (")
    assert "manually" in message and f"--data-dir {tmp_path / 'data'}" in message
    assert leftovers(tmp_path / "data") == []  # the temporary folder is gone


def test_checksum_mismatch_installs_nothing(monkeypatch, tmp_path):
    payload = fake_zip("ml-100k", ML100K_FILES)
    monkeypatch.setattr(dl, "urlopen", serve({dl.ARCHIVES["ml-100k"].url: payload}))
    with pytest.raises(DataError, match=r"checksum mismatch \(md5 [0-9a-f]{32}, expected 0e33842e"):
        dl.download("ml-100k", tmp_path)
    assert leftovers(tmp_path) == []


def test_verified_download_is_unpacked_in_place_once(monkeypatch, tmp_path):
    payload = fake_zip("ml-100k", ML100K_FILES)
    archive = replace(dl.ARCHIVES["ml-100k"], md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(dl.ARCHIVES, "ml-100k", archive)
    calls: list[str] = []
    monkeypatch.setattr(dl, "urlopen", serve({archive.url: payload}, calls))
    folder = dl.download("ml-100k", tmp_path)
    assert folder == tmp_path / "ml-100k" and (folder / "u.data").read_bytes() == ML100K_FILES["u.data"]
    assert leftovers(tmp_path) == ["ml-100k"]
    assert dl.download("ml-100k", tmp_path) == folder and len(calls) == 1  # already there
    dl.download("ml-100k", tmp_path, force=True)
    assert len(calls) == 2 and leftovers(tmp_path) == ["ml-100k"]


def test_downloaded_folder_loads(monkeypatch, tmp_path):
    from crosstower.data.loaders import load_dataset

    payload = fake_zip("ml-100k", ML100K_FILES)
    archive = replace(dl.ARCHIVES["ml-100k"], md5=hashlib.md5(payload).hexdigest())
    monkeypatch.setitem(dl.ARCHIVES, "ml-100k", archive)
    monkeypatch.setattr(dl, "urlopen", serve({archive.url: payload}))
    dl.download("ml-100k", tmp_path)
    ds = load_dataset("ml-100k", tmp_path, {})  # --data-dir is the download target
    assert len(ds.interactions) == 1


def test_latest_small_checks_extracted_files(monkeypatch, tmp_path):
    payload = fake_zip("ml-latest-small", {"ratings.csv": b"userId,movieId,rating,timestamp\n", "movies.csv": b""})
    monkeypatch.setattr(dl, "urlopen", serve({dl.ARCHIVES["ml-latest-small"].url: payload}))
    with pytest.raises(DataError, match=r"ratings\.csv has sha256 [0-9a-f]{64}, expected aa289ca8"):
        dl.download("ml-latest-small", tmp_path)
    assert leftovers(tmp_path) == []


def test_latest_uses_the_published_md5_file(monkeypatch, tmp_path):
    payload = fake_zip("ml-latest", {"ratings.csv": b"userId,movieId,rating,timestamp\n"})
    url = dl.ARCHIVES["ml-latest"].url
    good = f"MD5 (ml-latest.zip) = {hashlib.md5(payload).hexdigest()}\n".encode()
    monkeypatch.setattr(dl, "urlopen", serve({url: payload, url + ".md5": good}))
    assert (dl.download("ml-latest", tmp_path) / "ratings.csv").is_file()
    monkeypatch.setattr(dl, "urlopen", serve({url: payload, url + ".md5": b"MD5 (ml-latest.zip) = " + b"0" * 32}))
    with pytest.raises(DataError, match="checksum mismatch"):
        dl.download("ml-latest", tmp_path / "other")


def test_bad_archives(monkeypatch, tmp_path):
    url = dl.ARCHIVES["ml-100k"].url
    for payload, expected in [
        (b"not a zip", "not a valid zip archive"),
        (fake_zip("ml-100k", {"../evil": b"x", "u.data": b""}), "unsafe path"),
        (fake_zip("wrong-folder", ML100K_FILES), r"lacks ml-100k/u\.data"),
    ]:
        archive = replace(dl.ARCHIVES["ml-100k"], md5=hashlib.md5(payload).hexdigest())
        monkeypatch.setitem(dl.ARCHIVES, "ml-100k", archive)
        monkeypatch.setattr(dl, "urlopen", serve({url: payload}))
        with pytest.raises(DataError, match=expected):
            dl.download("ml-100k", tmp_path)
        assert leftovers(tmp_path) == []
