"""The local store: resume state and caches that no DVC checkout touches.

DVC restores every declared output to its committed version before `dvc exp run` reproduces
(persistent ones too) and can never restore an uncached one, so state that a killed run already
paid for cannot live in a stage's outputs. It lives here instead, git- and DVC-ignored:

- ``runs/<stage>/<fingerprint>/``: resume state of one run (checkpoints, finished shards), keyed by
  its run fingerprint (params, seed, inputs, code, device, precision, processes, CPU mode and package
  versions: synthmed.core.provenance.run_record), which ``run.json`` there spells out; removed once the
  stage has written its outputs, so a forced rerun starts afresh.
- ``cache/<name>/``: content-addressed caches that stay valid across runs (LLM replies, image
  features); safe to delete at any time, they only cost time (or money) to rebuild. Every entry is
  written by synthmed.core.io.atomic_path (a private temporary file, fsynced, then one rename), so
  processes that fill one cache at once never see, or leave, half an entry.

A run holds a lock on its folder (``.lock``, an flock the OS drops when the process ends, even on
SIGKILL) from the moment it asks for it (`open_run`) to its end: a second process with the same
fingerprint stops with one line naming the holder. Generate's shard workers share one run's folder
(a shared lock; each shard is claimed on its own: synthmed.diffusion.shards), and a whole-stage run
waits for none of them: it stops with that line until they are done. Of a data-parallel run only the
main process (rank 0) locks; its other processes work inside its lock.

One resume state per stage: a run that opens its folder removes the folders of the stage's other runs
that nobody holds (killed runs with other params, inputs, code or machine), with one line naming what
changed, so abandoned runs do not pile up; a folder another live run holds (a queued experiment running
beside this one) is left alone.

The store is ``.synthmed/`` at the repository root, shared by the temporary workspaces of
`dvc exp run --queue/--temp`; ``$SYNTHMED_STORE`` moves it (e.g. to disk shared by several checkouts).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from synthmed.core.errors import PipelineError
from synthmed.core.io import FileLock, write_json

ENV = "SYNTHMED_STORE"
NAME = ".synthmed"
LOCK = ".lock"
RECORD = "run.json"  # the fingerprint's components, to name what changed when another run's state is found
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")  # where DVC runs queued/temp experiments
_REMOVING = ".removing-"  # a run folder renamed out of the way, then removed (a killed remover's: by the next)
_open: dict[Path, FileLock] = {}  # the run folders this process holds (locks are per process anyway)


def root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    parts = Path.cwd().resolve().parts
    for i in range(len(parts) - len(_DVC_TEMP_WORKSPACE)):
        if parts[i : i + len(_DVC_TEMP_WORKSPACE)] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[:i]) / NAME  # the repository that queued the experiment
    return Path(NAME)  # stages run in the repository root


def run_dir(stage: str, fingerprint: str) -> Path:
    return root() / "runs" / stage / fingerprint[:24]


def cache_dir(name: str) -> Path:
    return root() / "cache" / name


def open_run(stage: str, fingerprint: str, record: dict | None = None, *, shared: bool = False) -> Path:
    """The run folder of ``fingerprint``, held by this process until `close_run` or its end (see the module's
    docstring); ``shared``: one of several workers that divide the run between them (generate's shards).
    ``record``: the fingerprint's components, kept in the folder."""
    folder = run_dir(stage, fingerprint)
    if folder.absolute() in _open:
        return folder
    if os.environ.get("RANK", "0") != "0":  # a data-parallel run's other process: inside rank 0's lock
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    lock = FileLock(folder / LOCK)
    who = f"a {stage} shard worker" if shared else f"a {stage} run"
    for _ in range(20):  # a remover holds another run's lock for an instant: wait that out, not a live run
        if lock.acquire(shared=shared, who=who):
            break
        time.sleep(0.05)
    else:
        raise PipelineError(f"{folder}: this {stage} run's resume state is in use by {lock.holder()}; wait for it "
                            f"to finish (or stop it), then rerun `dvc repro {stage}`")
    _open[folder.absolute()] = lock
    _clear_other_runs(stage, folder, record)
    if record is not None and not (folder / RECORD).is_file():
        write_json(folder / RECORD, {"fingerprint": fingerprint, **record})
    return folder


def close_run(stage: str, fingerprint: str) -> None:
    """Let go of the run's folder (the end of the process does the same)."""
    lock = _open.pop(run_dir(stage, fingerprint).absolute(), None)
    if lock is not None:
        lock.release()


def finish_run(stage: str, fingerprint: str) -> None:
    """Drop a run's resume state once its outputs are written (unless another process holds it)."""
    folder = run_dir(stage, fingerprint)
    lock = _open.pop(folder.absolute(), None)
    if lock is not None and lock.shared:  # a shard worker: the others may still be working in it
        lock.release()
        lock = None
    if lock is None:
        lock = FileLock(folder / LOCK)
        if not lock.acquire(who=f"removing a finished {stage} run", create=False) and (folder / LOCK).exists():
            return  # another run of the same fingerprint works in it: the last one out removes it
    try:
        _remove(folder)
    finally:
        lock.release()


def _remove(folder: Path) -> None:
    """Rename the folder out of the way (one step: nobody finds half of it), then delete it."""
    aside = folder.parent / f"{_REMOVING}{folder.name}-{os.getpid()}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _clear_other_runs(stage: str, mine: Path, record: dict | None) -> None:
    """Remove the stage's other run folders that no process holds; one line naming what changed since the newest."""
    found = []
    for folder in sorted(mine.parent.iterdir()):
        if folder.name.startswith(_REMOVING):
            shutil.rmtree(folder, ignore_errors=True)  # a killed remover's
        elif folder != mine and folder.is_dir() and not folder.name.startswith("."):
            when, record_there = _mtime(folder), _read_record(folder)
            try:
                os.close(os.open(folder / LOCK, os.O_RDONLY | os.O_CREAT, 0o644))  # a folder from before locks has none
            except FileNotFoundError:
                continue  # removed by another run meanwhile
            lock = FileLock(folder / LOCK)
            if not lock.acquire(who=f"removing an abandoned {stage} run", create=False):
                continue  # a run going on beside this one (another experiment): not ours to remove
            try:
                found.append((when, record_there))
                _remove(folder)
            finally:
                lock.release()
    if found:
        newest = max(found, key=lambda f: f[0])[1]
        print(f"{stage}: resume state from another run ({describe_changes(newest, record)}); starting fresh",
              flush=True)


def _mtime(folder: Path) -> float:
    """When the run last wrote anything at the top of its folder (the lock file aside: removers write it)."""
    try:
        return max(p.stat().st_mtime for p in (folder, *folder.iterdir()) if p.name != LOCK)
    except OSError:
        return 0.0


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_changes(old: dict | None, new: dict | None, most: int = 4) -> str:
    """What differs between two runs' fingerprint components, briefly: "device cpu -> cuda (...), params (lr)"."""
    if not old or not new:
        return "its settings were not recorded"
    changes = []
    for key in sorted(set(old) | set(new), key=lambda k: (k != "environment", k)):
        a, b = old.get(key), new.get(key)
        if a == b or key == "fingerprint":
            continue
        if key == "environment":  # in the order the new run lists them (device first)
            a, b = a or {}, b or {}
            changes += [f"{k} {a.get(k, 'none')} -> {b.get(k, 'none')}" for k in [*b, *(k for k in a if k not in b)]
                        if a.get(k) != b.get(k)]
        elif isinstance(a, dict) and isinstance(b, dict):
            names = sorted(_differing(a, b))
            changes.append(f"{key} ({', '.join(names[:most])}{', ...' if len(names) > most else ''})")
        elif key == "seed":
            changes.append(f"seed {a} -> {b}")
        else:
            changes.append(key)
    if not changes:
        return "another fingerprint"
    return ", ".join(changes[:most]) + (f" and {len(changes) - most} more" if len(changes) > most else "")


def _differing(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out
