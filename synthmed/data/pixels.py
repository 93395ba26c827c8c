"""The images of an ImageFolder's rows as one uint8 DiskArray, decoded once (in parallel) into the local store.

Keyed by the folder's manifest (metadata.csv, which carries every file's sha256) and the rows asked for, so
every later stage, rerun and queued experiment reads batches from the same file instead of decoding every PNG
into memory again.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from synthmed.core import store
from synthmed.data.disk_array import DiskArray, open_disk_array, write_disk_array
from synthmed.data.imagefolder import METADATA, decode_pixels, read_metadata
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_bytes
from synthmed.core.progress import progress

CACHE = "pixels"
CHUNK = 256  # images decoded ahead of the writer


def cache_key(folder: Path, file_names: list[str]) -> str:
    """The manifest, the rows asked for and each file's size and mtime: a file edited in place is decoded
    (and checked) again."""
    h = hashlib.sha256((folder / METADATA).read_bytes())
    h.update(json.dumps(file_names).encode())
    for name in file_names:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            raise PipelineError(f"{folder / name}: listed in {folder / METADATA} but missing; the folder was changed "
                                "after ingest: rerun `dvc repro ingest` (or `dvc checkout`)") from None
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def pixel_stack(folder: str | Path, file_names: list[str], workers: int = 4) -> DiskArray:
    """uint8 [N, C, H, W] (volumes [N, 1, D, H, W]) of ``file_names``, in that order; each file is checked
    against the sha256 metadata.csv records for it (where it has that column) as it is decoded."""
    folder = Path(folder)
    path = store.cache_dir(CACHE) / f"{cache_key(folder, file_names)}.u8"
    cached = open_disk_array(path)
    if cached is not None:
        return cached
    meta = read_metadata(folder)
    recorded = dict(zip(meta["file_name"], meta["sha256"])) if "sha256" in meta else {}
    line = {name: i + 2 for i, name in reversed(list(enumerate(meta["file_name"])))}  # the first row naming it

    def read(name: str) -> np.ndarray:
        data = (folder / name).read_bytes()
        if name in recorded and sha256_bytes(data) != recorded[name]:
            raise PipelineError(f"{folder / name}: its sha256 is not the one {folder / METADATA} records for it (row "
                                f"{line[name]}); the folder was changed after ingest: rerun `dvc repro ingest` (or "
                                "`dvc checkout`)")
        return decode_pixels(folder / name, data)

    def decoded() -> Iterator[np.ndarray]:
        first = None
        with ThreadPoolExecutor(max(1, workers)) as pool:  # hashing and PIL's decoding run outside the GIL
            for start in progress(range(0, len(file_names), CHUNK), desc=f"decode {folder.name}", unit="chunk"):
                names = file_names[start:start + CHUNK]
                for name, a in zip(names, pool.map(read, names)):
                    first = a.shape if first is None else first
                    if a.shape != first:
                        raise PipelineError(f"{folder / name}: shape {a.shape}, but {folder / file_names[0]} is "
                                            f"{first}; rerun ingest (it writes every image at one size)")
                    yield a[None]

    return write_disk_array(path, decoded(), "uint8")
