"""Sharded, resumable writing of a generated ImageFolder.

Images go into shard folders of ``shard_size`` images, each renamed into place
only when complete, with its own ``shard.csv``. A rerun with the same fingerprint
(model, prompts, sampler, seed) skips finished shards; a different fingerprint
starts afresh. Workers sharing the folder coordinate through locks (see `write_shards`).
``publish_shards`` then builds the dataset (images + ``metadata.csv``) in one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from synthmed.data.imagefolder import METADATA
from synthmed.core.errors import PipelineError
from synthmed.core.io import FileLock, atomic_path, read_table, sha256_bytes, write_text
from synthmed.core.progress import progress
from synthmed.viz import is_volume, save_pixels

FINGERPRINT = "fingerprint.txt"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` (1 <= i <= N) -> (i, N): this worker renders every N-th shard, starting with the i-th."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise PipelineError(f"--shard {spec}: give i/N with 1 <= i <= N, e.g. --shard 1/2 and --shard 2/2")
    return i, n


def _stamp(out: Path) -> str | None:
    try:
        return (out / FINGERPRINT).read_text()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _joined(out: Path, fingerprint: str) -> Iterator[None]:
    """Work in ``out`` under a shared lock (beside it, ``.<name>.lock``), its stamp naming ``fingerprint``.

    The first worker creates the folder and its stamp (atomically, once: under the exclusive lock); a folder of
    another run (another stamp, or a folder without one) is cleared only under the exclusive lock, i.e. when no
    worker is inside, so a worker never deletes what another has claimed or finished.
    """
    lock = FileLock(out.parent / f".{out.name}.lock")
    deadline = time.monotonic() + 60
    while True:
        lock.acquire(shared=True, wait=True, who="a shard worker")  # the exclusive holder holds it for an instant
        if _stamp(out) == fingerprint:
            break
        lock.release()
        if lock.acquire(who="stamping the shard folder"):
            try:
                stamp = _stamp(out)
                if stamp != fingerprint:
                    if out.exists() and any(out.iterdir()):
                        print(f"{out}: shards of another run ({'fingerprint ' + stamp[:12] if stamp else 'no stamp'}); "
                              "starting fresh", flush=True)
                        shutil.rmtree(out)  # nobody is inside: every worker holds the shared lock while it is
                    out.mkdir(parents=True, exist_ok=True)
                    write_text(out / FINGERPRINT, fingerprint)
            finally:
                lock.release()
            continue
        stamp = _stamp(out)
        if stamp not in (None, fingerprint):
            raise PipelineError(f"{out}: shards of another run are being written by {lock.holder()}; wait for it to "
                                "finish, or give this run a folder of its own")
        if time.monotonic() > deadline:
            raise PipelineError(f"{out}: no shard stamp after 60 s while {lock.holder()} holds the folder; stop it "
                                "and rerun")
        time.sleep(0.05)  # another worker is stamping it
    try:
        yield
    finally:
        lock.release()


def save_image(img: np.ndarray, stem: Path) -> str:
    """A uint8 image as ``stem``.png, a volume (D, H, W) as ``stem``.npy; the file's name."""
    path = stem.with_suffix(".npy" if is_volume(img) else ".png")
    save_pixels(img, path)
    return path.name


def write_shards(plan: pd.DataFrame, out: str | Path, shard_size: int, fingerprint: str,
                 render: Callable[[pd.DataFrame], Iterable[np.ndarray]],
                 shard: tuple[int, int] = (1, 1)) -> tuple[pd.DataFrame, dict]:
    """Render the plan's rows shard by shard; ``render(rows)`` yields one uint8 HWC/HW image per row.

    ``shard`` (i, N): render only shards i-1, i-1+N, ... of them (one of N workers sharing ``out``); the
    others are left to theirs, and a run with (1, 1) then finds them finished and renders the rest.
    Any number of processes may work in ``out`` at once: each shard is claimed (an flock on ``.shard_k.claim``)
    by the one that renders it, so every shard is rendered exactly once; a (1, 1) run renders the shards nobody
    has claimed, then waits for the claimed ones.
    Returns the plan's finished rows with file_name (shard/…png, or …npy for volumes) and image sha256, and throughput figures.
    """
    out = Path(out)
    i_worker, n_workers = shard
    with _joined(out, fingerprint):
        starts = range(0, len(plan), shard_size)
        finished = [_finished(out, i) for i in range(len(starts))]
        resumed = sum(len(plan.iloc[start : start + shard_size]) for start, done in zip(starts, finished) if done)
        bar = progress(desc="generate", total=len(plan), initial=resumed, unit="image")  # rates count rendered images
        done = {i: read_table(out / shard_name(i) / "shard.csv") for i, f in enumerate(finished) if f}
        rendered, seconds = 0, 0.0

        def take(i: int, wait: bool) -> bool:  # False: another worker has the shard claimed
            nonlocal rendered, seconds
            tick = time.perf_counter()
            rows = plan.iloc[starts[i] : starts[i] + shard_size].copy()
            result = _render_shard(out, i, rows, render, bar, wait=wait)
            if result is None:
                return False
            done[i], n = result
            rendered, seconds = rendered + n, seconds + (time.perf_counter() - tick if n else 0.0)
            return True

        claimed_elsewhere = [i for i in range(len(starts))
                             if not finished[i] and _is_mine(i, i_worker, n_workers) and not take(i, wait=False)]
        if n_workers == 1:  # the whole plan is this run's: wait for the shards other workers are rendering
            for i in claimed_elsewhere:
                take(i, wait=True)
        bar.close()
    stats = {"images": len(plan), "rendered": rendered, "resumed": resumed,
             "render_s": round(seconds, 2), "images_per_s": round(rendered / seconds, 3) if seconds else None}
    rows = [done[i] for i in sorted(done)]
    return pd.concat(rows, ignore_index=True) if rows else plan[:0], stats


def _is_mine(k: int, i_worker: int, n_workers: int) -> bool:
    """Shard ``k`` is worker i/N's: every N-th, starting with the i-th."""
    return k % n_workers == i_worker - 1


def _finished(out: Path, i: int) -> bool:
    return (out / shard_name(i) / "shard.csv").is_file()


def _render_shard(out: Path, i: int, rows: pd.DataFrame, render, bar, *, wait: bool) -> tuple[pd.DataFrame, int] | None:
    """(shard i's rows, images rendered) once it is finished, by this process or (seen after the claim) another;
    None when another process has it claimed and ``wait`` is False."""
    shard = out / shard_name(i)
    claim = FileLock(out / f".{shard.name}.claim")
    if not claim.acquire(wait=wait, who="rendering the shard"):
        return None
    try:
        if _finished(out, i):  # finished by another worker after this one looked
            return read_table(shard / "shard.csv"), 0
        with atomic_path(shard, is_dir=True) as tmp:  # it clears a killed worker's half shard
            names, digests = [], []
            for (_, row), img in zip(rows.iterrows(), render(rows)):
                name = save_image(img, tmp / f"synth_{int(row['image_index']):06d}")
                names.append(f"{shard.name}/{name}")
                digests.append(sha256_bytes((tmp / name).read_bytes()))
                bar.update()
            rows["file_name"], rows["sha256"] = names, digests
            rows.astype(str).to_csv(tmp / "shard.csv", index=False)
        return read_table(shard / "shard.csv"), len(rows)
    finally:
        if _finished(out, i):  # a claim outlives only an unfinished shard (whoever claims it next checks first)
            claim.path.unlink(missing_ok=True)
        claim.release()


def publish_shards(shards: str | Path, meta: pd.DataFrame, dataset: str | Path) -> None:
    """Replace ``dataset`` with the finished shards' images and ``metadata.csv``, atomically.

    Images are hard-linked where the file system allows (the shards are dropped right after).
    """
    with atomic_path(dataset, is_dir=True) as tmp:
        for name in sorted({f.split("/")[0] for f in meta["file_name"]}):
            (tmp / name).mkdir()
        for file_name in meta["file_name"]:
            try:
                os.link(Path(shards) / file_name, tmp / file_name)
            except OSError:
                shutil.copy2(Path(shards) / file_name, tmp / file_name)
        meta.to_csv(tmp / METADATA, index=False)  # seeds as text: 63-bit values stay exact in any CSV reader
