"""Decoding and preprocessing image files, in parallel across cores."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from synthmed.data.transforms import prepare, prepare_mask
from synthmed.core.io import sha256_bytes
from synthmed.core.progress import progress

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MIN_POOL_FILES = 64  # below this a pool of processes costs more than it saves
J = TypeVar("J")
R = TypeVar("R")


@dataclass
class Decoded:
    pixels: np.ndarray | None  # None when the file could not be used
    source_sha256: str = ""
    reason: str = ""  # problem code when pixels is None
    detail: str = ""


@dataclass(frozen=True)
class DecodeOptions:
    resolution: int
    crop: str = "pad"
    channels: int = 1
    max_image_pixels: int = 50_000_000  # larger images are refused as decompression bombs


def decode_file(path: str | Path, opts: DecodeOptions) -> Decoded:
    """Read, convert to 1 or 3 channels, square and resize one image file; never raises."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return Decoded(None, reason="unsupported_extension", detail=f"use one of {sorted(IMAGE_EXTENSIONS)}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Decoded(None, reason="missing_image", detail="file not found")
    except OSError as exc:  # permissions, a directory named like an image, I/O errors
        return Decoded(None, reason="unreadable_image", detail=f"cannot read ({exc.strerror or exc})")
    if not data:
        return Decoded(None, reason="corrupt_image", detail="zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > opts.max_image_pixels:
                    return Decoded(None, reason="image_too_large",
                                   detail=f"{w}x{h} pixels exceeds ingest.max_image_pixels={opts.max_image_pixels}")
                im = im.convert("L" if opts.channels == 1 else "RGB")
                pixels = np.asarray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Decoded(None, reason="image_too_large", detail=str(exc))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return Decoded(None, reason="corrupt_image", detail=f"cannot decode ({exc})")
    return Decoded(prepare(pixels, opts.resolution, opts.crop), sha256_bytes(data))


def decode_mask(path: str | Path, image: str | Path, opts: DecodeOptions) -> Decoded:
    """A label map (one channel of class indices, its image's size) squared and resized as its image is,
    by nearest neighbour; never raises."""
    path = Path(path)
    try:
        with Image.open(image) as im:
            size = im.size
        with Image.open(path) as m:
            if m.size != size:
                return Decoded(None, reason="mask_size", detail=f"{m.size[0]}x{m.size[1]} pixels, its image "
                               f"{size[0]}x{size[1]}; a mask must have its image's size")
            if m.mode not in ("1", "L", "P", "I", "I;16"):
                return Decoded(None, reason="mask_mode", detail=f"mode {m.mode}; a mask is one channel of class "
                               "indices (a greyscale or palette PNG)")
            labels = np.asarray(m).astype(np.int64)
    except FileNotFoundError:
        return Decoded(None, reason="missing_mask", detail="file not found")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return Decoded(None, reason="corrupt_mask", detail=f"cannot decode ({exc})")
    if labels.min() < 0 or labels.max() > 255:
        return Decoded(None, reason="mask_classes", detail=f"class indices {labels.min()}..{labels.max()}; use 0..255")
    return Decoded(prepare_mask(labels.astype(np.uint8), opts.resolution, opts.crop), sha256_bytes(path.read_bytes()))


def _decode_star(args: tuple[str, DecodeOptions]) -> Decoded:
    return decode_file(*args)


def decode_files(paths: list[str | Path], opts: DecodeOptions, workers: int = 0) -> Iterator[Decoded]:
    """decode_file over many paths, order kept, as they come (a caller that parks each one elsewhere holds one
    image, not the dataset); workers=0 means one per core."""
    jobs = [(str(p), opts) for p in paths]
    return map_ordered(_decode_star, jobs, processes(len(jobs), workers), desc="decode")


def processes(n_files: int, workers: int) -> int:
    """Processes for decoding n_files: 1 (this one) below MIN_POOL_FILES, else ``workers`` (0: one per core)."""
    return 1 if n_files < MIN_POOL_FILES else workers or os.cpu_count() or 1


def map_ordered(fn: Callable[[J], R], jobs: list[J], n_processes: int, *, desc: str) -> Iterator[R]:
    """``fn`` over ``jobs``, results in job order, here or in a pool; closing the iterator early (a problem
    under on_error: fail) cancels the jobs not yet started instead of decoding the rest for nothing."""
    if n_processes == 1:
        yield from progress(map(fn, jobs), total=len(jobs), desc=desc)
        return
    pool = ProcessPoolExecutor(max_workers=n_processes)
    try:
        chunk = max(1, min(32, len(jobs) // (4 * n_processes)))  # small enough that every process gets work
        yield from progress(pool.map(fn, jobs, chunksize=chunk), total=len(jobs), desc=desc)
    finally:
        pool.shutdown(cancel_futures=True)
