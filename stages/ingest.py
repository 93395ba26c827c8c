"""DVC stage `ingest`: read or build the dataset, check it, split it, hash it, describe it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from synthmed.core.config import as_dict, require_at_least_one, require_non_negative
from synthmed.data.card import dataset_card
from synthmed.data.decode import DecodeOptions
from synthmed.data.dicom import DicomParams, without_patient_id
from synthmed.data.imagefolder import shard_file_names, write_imagefolder
from synthmed.data.manifest import (build_manifest, build_pairs, check_pixels_not_shared, dataset_stats,
                                    write_manifest)
from synthmed.data.nifti import NiftiParams
from synthmed.data.problems import Problems
from synthmed.data.sample import Sample
from synthmed.data.splits import SPLITS, assign_splits, check_no_leak
from synthmed.data.volumes import VolumeParams, check_volume_params
from synthmed.core.errors import PipelineError
from synthmed.core.io import write_text
from synthmed.core.provenance import seed_everything
from synthmed.core.stage import Stage, run_stage
from synthmed.viz import image_grid, save_png

OUT = "data/ingest"


@dataclass
class DemoParams:
    slice_step_mm: int  # distance between slices
    guard_mm: float  # least distance from a val/test slice to the nearest train slice of its plane
    min_brain_fraction: float  # skip slices with less brain than this

    def __post_init__(self) -> None:
        require_at_least_one(self, "slice_step_mm")
        require_non_negative(self, "guard_mm")


@dataclass
class Demo3DParams:
    extent_mm: float  # side of each cube cut from the template
    step_mm: int  # distance between cube centres (a grid anchored at the world origin)
    guard_mm: float  # least Chebyshev distance from a val/test cube centre (or its mirror) to a train one
    elastic_mm: float  # largest displacement of the random elastic deformation
    intensity: float  # strength of the random gamma and scale: exp(U(-a, a)), 1 + U(-a, a)
    min_brain_fraction: float  # skip cubes with less brain than this

    def __post_init__(self) -> None:
        require_at_least_one(self, "step_mm")
        require_non_negative(self, "guard_mm", "elastic_mm", "intensity")
        if self.extent_mm <= 0:
            raise ValueError(f"demo3d.extent_mm must be positive, got {self.extent_mm}")


@dataclass
class IngestParams:
    source: Literal["demo", "imagefolder", "imageclef", "nifti", "dicom"]
    path: str  # the dataset folder (or NIfTI file) for every source but demo
    resolution: int
    channels: Literal[1, 3]
    crop: Literal["pad", "crop"]
    split_fractions: dict[str, float]
    min_images: int
    on_error: Literal["fail", "skip"]
    workers: int  # decode processes; 0 = one per core
    max_image_pixels: int  # larger images are refused (decompression bombs)
    demo: DemoParams
    nifti: NiftiParams
    dicom: DicomParams
    dims: Literal[2, 3]  # 3: one sample per volume (sources demo and nifti)
    volume: VolumeParams  # dims 3, source nifti
    demo3d: Demo3DParams  # dims 3, source demo


def load_demo(p: IngestParams, seed: int) -> tuple[list[Sample], int]:
    """The demo, split by the demo itself (it knows which slices neighbour), and its guard drop count."""
    from synthmed.data.demo import demo_samples

    if p.channels != 1:
        raise PipelineError("params.yaml: ingest.channels must be 1 for the demo (MRI is greyscale)")
    return demo_samples(resolution=p.resolution, split_fractions=p.split_fractions, seed=seed, **as_dict(p.demo))


def check_dataset_path(p: IngestParams) -> None:
    """A missing or empty dataset, in one line saying how this checkout gets it: a fresh clone (a Prefect
    worker's), a queued or temporary experiment start without what the user put under data/raw/."""
    path = Path(p.path)
    if path.exists() and (path.is_file() or any(path.iterdir())):
        return
    state = "is empty" if path.exists() else "does not exist"
    if Path(f"{path}.dvc").is_file():
        fix = f"it is tracked by DVC: `dvc pull {path}.dvc` (a worker needs the DVC remote configured)"
    elif not path.resolve().is_relative_to(Path.cwd().resolve()):
        fix = "it lies outside the repository: mount it at that path on this machine, or point ingest.path at it"
    else:
        fix = (f"put your {p.source} dataset there and track it, `dvc add {path}` then `dvc push` to a DVC remote, "
               "so that clones, queued experiments and workers get it, or point ingest.path at a location every "
               "machine can read")
    raise PipelineError(f"params.yaml: ingest.path={p.path!r} {state} in this checkout; {fix}")


def load_samples(p: IngestParams, problems: Problems) -> list[Sample]:
    check_dataset_path(p)
    if p.source == "nifti":
        from synthmed.data.nifti import read_nifti

        return read_nifti(p.path, p.nifti, resolution=p.resolution, crop=p.crop, channels=p.channels,
                          problems=problems)
    if p.source == "dicom":
        from synthmed.data.dicom import read_dicom

        return read_dicom(p.path, p.dicom, resolution=p.resolution, crop=p.crop, channels=p.channels,
                          problems=problems, workers=p.workers)
    from synthmed.data.imagefolder import read_imageclef, read_imagefolder

    reader = read_imagefolder if p.source == "imagefolder" else read_imageclef
    opts = DecodeOptions(p.resolution, p.crop, p.channels, p.max_image_pixels)
    return reader(p.path, opts, problems, p.workers)


def load_volumes(p: IngestParams, seed: int, problems: Problems) -> tuple[list[Sample], int, list[str]]:
    """dims 3: (samples, guard drop count, card notes)."""
    if p.source == "demo":
        from synthmed.data.demo3d import demo3d_samples

        samples, dropped = demo3d_samples(resolution=p.resolution, split_fractions=p.split_fractions, seed=seed,
                                          **as_dict(p.demo3d))
        spacing = p.demo3d.extent_mm / p.resolution
        return samples, dropped, [f"Cubes of {p.demo3d.extent_mm:g} mm from the MNI152 2009 T1 template, "
                                  f"{spacing:g} mm voxels, RAS voxel order"]
    check_dataset_path(p)
    from synthmed.data.volumes import read_volumes

    samples, spacing = read_volumes(p.path, p.volume, resolution=p.resolution, crop=p.crop, problems=problems)
    return samples, 0, [f"Volumes resampled to {spacing:g} mm isotropic voxels, RAS voxel order"] if samples else []


def split_notes(p: IngestParams, samples: list[Sample], guard_dropped: int) -> tuple[list[str], dict[str, int]]:
    """What the split had to leave out or could not group: card lines and metrics of the source."""
    if p.source == "demo" and p.dims == 3:
        return [f"Guard: {guard_dropped} train cubes dropped, so every val/test cube centre (and its left-right "
                f"mirror) is at least `ingest.demo3d.guard_mm` = {p.demo3d.guard_mm:g} mm (largest per-axis "
                "distance) from every train cube centre"], {"guard_dropped": guard_dropped}
    if p.source == "demo":
        return [f"Guard: {guard_dropped} train slices dropped, so every val/test slice is at least "
                f"`ingest.demo.guard_mm` = {p.demo.guard_mm:g} mm from the nearest train slice of its plane"
                ], {"guard_dropped": guard_dropped}
    if p.source == "dicom":
        n = without_patient_id(samples)
        return ([f"No PatientID: {n} images grouped by study, series or file instead, so two studies of "
                 "one such patient may straddle splits"] if n else []), {"images_without_patient_id": n}
    return [], {}


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    check_volume_params(p.dims, p.source, p.channels, p.resolution)
    seed_everything(seed)
    problems = Problems(p.on_error)
    volume_notes: list[str] = []
    if p.dims == 3:
        samples, guard_dropped, volume_notes = load_volumes(p, seed, problems)
    else:
        samples, guard_dropped = load_demo(p, seed) if p.source == "demo" else (load_samples(p, problems), 0)
    if len(samples) < p.min_images:
        raise PipelineError(
            f"ingest found {len(samples)} usable images, fewer than ingest.min_images={p.min_images}; "
            "add images or lower the threshold"
        )
    # A split given by the dataset wins; the rest is assigned group-aware.
    for s in samples:
        if s.split and s.split not in SPLITS:
            raise PipelineError(f"{s.source}: split '{s.split}' is not one of {', '.join(SPLITS)}; fix the split column")
    todo = [s for s in samples if not s.split]
    for s, split in zip(todo, assign_splits([s.group for s in todo], [s.label for s in todo],
                                            p.split_fractions, seed)):
        s.split = split
    check_no_leak([s.group for s in samples], [s.split for s in samples])
    shard_file_names(samples)  # before the manifest: its ids are the file names
    images, pairs = build_manifest(samples), build_pairs(samples)
    check_pixels_not_shared(images)
    stats = dataset_stats(images, pairs)
    notes, figures = split_notes(p, samples, guard_dropped)
    notes = volume_notes + notes

    write_imagefolder(f"{OUT}/dataset", samples)
    write_manifest(f"{OUT}/manifest", images, pairs)
    problems.write(f"{OUT}/problems.csv")
    n = 8 if p.dims == 3 else 16  # a volume's tile is its three central planes
    preview = samples[:: max(1, len(samples) // n)][:n]
    save_png(image_grid([s.array() for s in preview], [s.captions[0] for s in preview], ncol=n // 2 if p.dims == 3 else 8),
             f"{OUT}/samples.png")
    write_text(f"{OUT}/card.md", dataset_card(source=p.source if p.source == "demo" else f"{p.source}: {p.path}",
                                              params=as_dict(p), stats=stats, images=images, pairs=pairs,
                                              problems=problems.counts(), notes=notes, volumes=p.dims == 3))
    stage.write_provenance([p.path] if p.source != "demo" else [])
    stage.write_metrics({**stats, "rows_dropped": len(problems.items), **figures}, headline=["images"])
    print(f"ingest: {stats['images']} {'volumes' if p.dims == 3 else 'images'}, {stats['pairs']} pairs "
          f"({stats['images_train']}/{stats['images_val']}/{stats['images_test']}) -> {OUT}/dataset"
          + (f"; {len(problems.items)} rows dropped, see {OUT}/problems.csv" if problems.items else "")
          + "".join(f"\n  {note}" for note in notes))


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, IngestParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
