import os

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


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}


def write_dir(target, files):
    with atomic_path(target, is_dir=True) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


class Killed(BaseException):
    """The process dying: no except clause of the code under test sees it, no cleanup of its leftovers runs."""


@pytest.mark.parametrize("swap", ["exchange", "aside"])
@pytest.mark.parametrize("renames_before_the_kill", [0, 1, 2, 3])  # os.replace (it fails: a folder), ..
def test_a_folder_is_replaced_so_that_a_kill_at_any_step_leaves_the_old_or_the_new_one(tmp_path, monkeypatch, swap,
                                                                                      renames_before_the_kill):
    from synthmed.core import io

    target = tmp_path / "out"
    write_dir(target, {"a.txt": "old", "sub/b.txt": "old"})
    old, new = contents(target), {"a.txt": "new", "c.txt": "new"}
    if swap == "aside":  # a kernel or file system without RENAME_EXCHANGE
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    renamed, real_rename = [], os.rename

    def step(real):
        def run(a, b, *rest):
            if len(renamed) == renames_before_the_kill:
                raise Killed
            renamed.append((a, b))
            return real(a, b, *rest)
        return run

    with monkeypatch.context() as m:
        m.setattr(io.os, "rename", step(real_rename))
        m.setattr(io.os, "replace", step(os.replace))
        if swap == "exchange":
            m.setattr(io, "_exchange", step(io._exchange))
        m.setattr(io.shutil, "rmtree", lambda *a, **k: None)  # a killed process removes nothing
        try:
            write_dir(target, new)
        except Killed:
            pass
    # whatever the step, the old folder or the new one is whole: at the target, or set aside in a leftover
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    found = [contents(target)] if target.exists() else []
    found += [contents(p / "~out") for p in leftovers if (p / "~out").is_dir()]
    assert old in found or new in found
    if swap == "exchange":
        assert contents(target) in (old, new)  # one step: the target is never missing
    elif renames_before_the_kill == 2:  # the old folder renamed aside, the new one not yet in
        assert not target.exists() and found == [old]
    # the next writer (here one that fails) clears the leftovers and puts a set-aside old folder back
    with pytest.raises(RuntimeError):
        with atomic_path(target, is_dir=True):
            raise RuntimeError("failed")
    assert contents(target) in (old, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_what_is_written_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    from synthmed.core import io

    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    write_dir(tmp_path / "out", {"a.txt": "1", "sub/b.txt": "2"})
    names = [os.path.relpath(p, tmp_path).split("/", 1)[-1] for p in synced]  # the temporary folder's name dropped
    # every file, then the folders after what they hold, in the temporary folder; the parent after the rename
    assert names == ["out/sub/b.txt", "out/sub", "out/a.txt", "out", "."]


def test_concurrent_writers_of_one_target_never_clear_each_other(tmp_path):
    target = tmp_path / "cache.json"
    with atomic_path(target) as first:
        first.write_text("first")
        with atomic_path(target) as second:  # another writer, meanwhile: the first's temporary folder is live
            second.write_text("second")
        assert first.read_text() == "first"
    assert target.read_text() == "first"  # the last rename wins, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_a_file_written_inside_a_folder_being_written_is_fsynced_once_with_the_folder(tmp_path, monkeypatch):
    from synthmed.core import io

    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    with atomic_path(tmp_path / "shard", is_dir=True) as tmp:
        write_json(tmp / "a.json", {})
        assert synced == []
    assert sum(p.endswith("/shard/a.json") for p in synced) == 1
