"""Sharded, resumable writing of a generated ImageFolder.

Images go into shard folders of ``shard_size`` images, each renamed into place
only when complete, with its own ``shard.csv``. A rerun with the same fingerprint
(model, prompts, sampler, seed) skips finished shards; a different fingerprint
starts afresh. ``publish_shards`` then builds the dataset (images + ``metadata.csv``) in one rename.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from synthmed.data.imagefolder import METADATA
from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path, read_table, sha256_bytes
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


def _reset_if_other_run(out: Path, fingerprint: str, mine: Callable[[int], bool]) -> None:
    stamp = out / FINGERPRINT
    if out.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".shard_*.tmp"):  # a killed run's half-written shard (not another worker's)
        if mine(int(leftover.name.split("_")[1].split(".")[0])):
            shutil.rmtree(leftover, ignore_errors=True)
    stamp.write_text(fingerprint)


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
    Returns the plan's finished rows with file_name (shard/…png, or …npy for volumes) and image sha256, and throughput figures.
    """
    out = Path(out)
    i_worker, n_workers = shard

    def mine(k: int) -> bool:
        return k % n_workers == i_worker - 1

    _reset_if_other_run(out, fingerprint, mine)
    done_rows, rendered, seconds = [], 0, 0.0
    starts = range(0, len(plan), shard_size)
    finished = [(out / shard_name(i) / "shard.csv").is_file() for i in range(len(starts))]
    resumed = sum(len(plan.iloc[start : start + shard_size]) for start, done in zip(starts, finished) if done)
    bar = progress(desc="generate", total=len(plan), initial=resumed, unit="image")  # rates count rendered images
    for i, start in enumerate(starts):
        shard = out / shard_name(i)
        if finished[i]:
            done_rows.append(read_table(shard / "shard.csv"))
            continue
        if not mine(i):
            continue
        rows = plan.iloc[start : start + shard_size].copy()
        tick = time.perf_counter()
        with atomic_path(shard, is_dir=True) as tmp:
            names, digests = [], []
            for (_, row), img in zip(rows.iterrows(), render(rows)):
                name = f"synth_{int(row['image_index']):06d}"
                name = save_image(img, tmp / name)
                names.append(f"{shard.name}/{name}")
                digests.append(sha256_bytes((tmp / name).read_bytes()))
                bar.update()
            rows["file_name"], rows["sha256"] = names, digests
            rows.astype(str).to_csv(tmp / "shard.csv", index=False)
        seconds += time.perf_counter() - tick
        rendered += len(rows)
        done_rows.append(read_table(shard / "shard.csv"))
    bar.close()
    stats = {"images": len(plan), "rendered": rendered, "resumed": resumed,
             "render_s": round(seconds, 2), "images_per_s": round(rendered / seconds, 3) if seconds else None}
    return pd.concat(done_rows, ignore_index=True) if done_rows else plan[:0], stats


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
