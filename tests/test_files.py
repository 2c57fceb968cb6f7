"""Result files are replaced whole: the JSON writer of the benchmarks."""

import json

from crosstower.files import write_json


def test_write_json_creates_folders_and_replaces_whole(tmp_path):
    path = tmp_path / "out" / "bench.json"
    write_json(path, {"a": 1})
    write_json(path, [1, 2, 3])
    assert json.loads(path.read_text()) == [1, 2, 3]
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temporary file left
