"""The manifest: one row per image with its hashes, one row per (image, caption) pair."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd

from synthmed.data.sample import Sample
from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path, sha256_bytes


def _is_volume(s: Sample) -> bool:
    return s.file_name.endswith(".npy")  # (D, H, W) volumes; images are (H, W[, 3])


def build_manifest(samples: list[Sample]) -> pd.DataFrame:
    """One row per image; a dataset of volumes also gets a depth column (images keep their columns)."""
    volumes = any(_is_volume(s) for s in samples)
    hw = [s.pixels.shape[1:3] if _is_volume(s) else s.pixels.shape[:2] for s in samples]
    return pd.DataFrame(
        {
            "id": [s.file_name for s in samples],
            "source": [s.source for s in samples],
            "source_sha256": [s.source_sha256 for s in samples],
            "pixel_sha256": [sha256_bytes(s.array().tobytes()) for s in samples],
            **({"depth": [s.pixels.shape[0] if _is_volume(s) else 1 for s in samples]} if volumes else {}),
            "height": [h for h, _ in hw],
            "width": [w for _, w in hw],
            "group": [s.group for s in samples],
            "label": [s.label for s in samples],
            "split": [s.split for s in samples],
            "n_captions": [len(s.captions) for s in samples],
        }
    )


def build_pairs(samples: list[Sample]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"id": s.file_name, "caption": c, "caption_source": "original", "split": s.split}
         for s in samples for c in s.captions],
        columns=["id", "caption", "caption_source", "split"],
    )


def dataset_stats(images: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, float]:
    labels = images["label"][images["label"] != ""]
    per_split = images["split"].value_counts()
    return {
        "images": len(images),
        "pairs": len(pairs),
        "unique_captions": int(pairs["caption"].nunique()),
        "captions_per_image": round(len(pairs) / max(len(images), 1), 4),
        "groups": int(images["group"].nunique()),
        "labels": int(labels.nunique()),
        "largest_label_share": round(float(labels.value_counts(normalize=True).max()), 4) if len(labels) else 0.0,
        **{f"images_{k}": int(per_split.get(k, 0)) for k in ("train", "val", "test")},
    }


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


def write_manifest(folder: str | Path, images: pd.DataFrame, pairs: pd.DataFrame) -> None:
    with atomic_path(folder, is_dir=True) as tmp:
        images.to_parquet(tmp / "images.parquet", index=False)
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
