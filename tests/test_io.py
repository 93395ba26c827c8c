import pytest

from synthmed.core.io import atomic_path, sha256_tree, write_json, read_json


def test_atomic_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # old output untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp debris


def test_json_roundtrip_and_tree_hash(tmp_path):
    write_json(tmp_path / "d" / "m.json", {"b": 1, "a": 2})
    assert read_json(tmp_path / "d" / "m.json") == {"a": 2, "b": 1}
    h1 = sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "m.json").write_text("{}")
    assert sha256_tree(tmp_path / "d") != h1
