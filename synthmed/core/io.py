"""Atomic writes and hashing: a killed stage never leaves a half-written output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hash of every file's relative path and content under ``root``, order-independent."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


MANIFEST = "metadata.csv"


def manifest_hash(root: str | Path) -> str | None:
    """The hash of a folder whose metadata.csv records every file's sha256 (what ingest writes), from that
    manifest and each file's name and size, without reading the images again; None for another folder.
    The files are checked against the manifest where they are decoded (synthmed.data.pixels)."""
    root = Path(root)
    meta = root / MANIFEST
    if not meta.is_file():
        return None
    with meta.open(encoding="utf-8") as f:
        if "sha256" not in f.readline().strip().split(","):
            return None
    h = hashlib.sha256(b"manifest")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(sha256_file(path).encode() if path == meta else str(path.stat().st_size).encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``target`` in one rename.

    On any exception the temporary path is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    work = tmp / target.name
    if is_dir:
        work.mkdir()
    try:
        yield work
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_metrics(stage: str, metrics: dict, headline: list[str]) -> None:
    """``metrics/<stage>.json``: the headline figures, one `dvc exp show` column each;
    ``metrics/all/<stage>.json``: every figure (declared as an output, not as metrics, so that the
    experiment table stays a screen wide)."""
    write_json(Path("metrics/all") / f"{stage}.json", metrics)
    write_json(Path("metrics") / f"{stage}.json", {k: metrics[k] for k in headline if k in metrics})


def write_csv(path: str | Path, frame, float_format: str | None = "%.6g") -> None:
    """A table (a pandas DataFrame) as CSV, atomically, without the index; floats to 6 significant digits (the
    exact figures are in the metrics JSON)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)


def read_table(path: str | Path):
    """A CSV as text, cell for cell: no type guessing and no NaN for empty cells (captions, file names and 63-bit
    seeds stay as written)."""
    import pandas as pd  # here: the stages that never read a table start faster

    return pd.read_csv(path, dtype=str, keep_default_na=False)
