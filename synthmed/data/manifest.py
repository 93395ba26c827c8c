"""The manifest: one row per image with its hashes, written as parquet."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from synthmed.data.sample import Sample
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, sha256_bytes


def build_manifest(samples: list[Sample]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [s.file_name for s in samples],
            "source": [s.source for s in samples],
            "source_sha256": [s.source_sha256 for s in samples],
            "pixel_sha256": [sha256_bytes(s.pixels.tobytes()) for s in samples],
            "height": [s.pixels.shape[0] for s in samples],
            "width": [s.pixels.shape[1] for s in samples],
            "group": [s.group for s in samples],
            "label": [s.label for s in samples],
            "split": [s.split for s in samples],
            "n_captions": [len(s.captions) for s in samples],
        }
    )


def check_pixels_not_shared(manifest: pd.DataFrame) -> None:
    """Identical preprocessed pixels on two sides of the split are leakage: stop."""
    splits = defaultdict(set)
    for digest, split, name in manifest[["pixel_sha256", "split", "id"]].itertuples(index=False):
        splits[digest].add((split, name))
    for entries in splits.values():
        if len({s for s, _ in entries}) > 1:
            names = ", ".join(sorted(f"{n} ({s})" for s, n in entries))
            raise PipelineError(
                f"identical images in different splits: {names}; give them one group or remove duplicates"
            )


def write_manifest(path: str | Path, manifest: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        manifest.to_parquet(tmp, index=False)
