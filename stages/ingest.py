"""DVC stage `ingest`: build or read the dataset, split it, hash it, describe it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from synthmed.config import as_dict, load_params, run_stage
from synthmed.data.imagefolder import read_imagefolder, write_imagefolder
from synthmed.data.manifest import build_manifest, check_pixels_not_shared, write_manifest
from synthmed.data.splits import SPLITS, assign_splits, check_no_leak
from synthmed.errors import PipelineError
from synthmed.io import write_json
from synthmed.provenance import seed_everything, write_provenance
from synthmed.viz import image_grid, save_png

OUT = "data/ingest"


@dataclass
class IngestParams:
    source: Literal["demo", "imagefolder"]
    path: str  # imagefolder: the folder holding the images and metadata.csv
    resolution: int
    channels: Literal[1, 3]
    crop: Literal["pad", "crop"]
    split_fractions: dict[str, float]
    min_images: int
    # demo only
    slice_step_mm: int
    slab_slices: int
    min_brain_fraction: float


def load_samples(p: IngestParams):
    if p.source == "demo":
        from synthmed.data.demo import demo_samples

        if p.channels != 1:
            raise PipelineError("params.yaml: ingest.channels must be 1 for the demo (MRI is greyscale)")
        return demo_samples(resolution=p.resolution, slice_step_mm=p.slice_step_mm,
                            slab_slices=p.slab_slices, min_brain_fraction=p.min_brain_fraction)
    if not p.path:
        raise PipelineError("params.yaml: ingest.path is empty; set it to your ImageFolder (images + metadata.csv)")
    return read_imagefolder(p.path, resolution=p.resolution, crop=p.crop, channels=p.channels)


def main() -> None:
    p, seed = load_params("ingest", IngestParams)
    seed_everything(seed)
    samples = load_samples(p)
    if len(samples) < p.min_images:
        raise PipelineError(
            f"ingest found {len(samples)} images, fewer than ingest.min_images={p.min_images}; "
            "add images or lower the threshold"
        )
    # A split given by the dataset wins; the rest is assigned group-aware.
    assigned = assign_splits([s.group for s in samples], [s.label for s in samples], p.split_fractions, seed)
    for s, split in zip(samples, assigned):
        if s.split and s.split not in SPLITS:
            raise PipelineError(f"{s.source}: split '{s.split}' is not one of {', '.join(SPLITS)}")
        s.split = s.split or split
    check_no_leak([s.group for s in samples], [s.split for s in samples])
    manifest = build_manifest(samples)
    check_pixels_not_shared(manifest)

    metadata = write_imagefolder(f"{OUT}/dataset", samples)
    write_manifest(f"{OUT}/manifest.parquet", manifest)
    preview = samples[:: max(1, len(samples) // 16)][:16]
    save_png(image_grid([s.pixels for s in preview], [s.captions[0] for s in preview], ncol=8),
             f"{OUT}/samples.png")
    write_provenance(f"{OUT}/provenance.json", stage="ingest", params=as_dict(p), seed=seed,
                     inputs=[p.path] if p.source == "imagefolder" else [])
    per_split = Counter(s.split for s in samples)
    write_json("metrics/ingest.json", {
        "images": len(samples),
        "pairs": len(metadata),
        "unique_captions": int(metadata["text"].nunique()),
        "labels": len({s.label for s in samples}),
        "groups": len({s.group for s in samples}),
        **{f"images_{k}": per_split.get(k, 0) for k in SPLITS},
    })
    print(f"ingest: {len(samples)} images ({dict(per_split)}) -> {OUT}/dataset")


if __name__ == "__main__":
    run_stage(main)
