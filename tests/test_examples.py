"""The README's own-data example, as a new user runs it: train on examples/shop (two item-feature
files, one of them long format), then recommend with titles and categories."""

from __future__ import annotations

from tests.test_cli import REPO, run_cli


def test_the_shop_example_trains_and_recommends(tmp_path):
    out = tmp_path / "shop-dssm"
    trained = run_cli(["run", str(REPO / "examples/shop/dssm.yaml"), "--data-dir", str(REPO / "examples"),
                       "--out", str(out), "--set", "train.epochs=2"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "recall@10" in trained.stdout and "shop" in trained.stdout
    answer = run_cli(["recommend", str(out), "--user", "7", "-k", "5", "--data-dir", str(REPO / "examples")], tmp_path)
    assert answer.returncode == 0, answer.stderr
    lines = answer.stdout.splitlines()
    assert [cell.strip() for cell in lines[1].split("|")] == ["rank", "item", "score", "title", "brand", "category"]
    assert len(lines) == 3 + 5 and all(line.split("|")[1].strip().startswith("P0") for line in lines[3:])
