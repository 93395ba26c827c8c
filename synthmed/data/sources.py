"""Where ingest's samples come from, by `ingest.source`: the embedded 2-D and 3-D demos, the ImageFolder,
ImageCLEF, NIfTI and DICOM readers; a dataset path a checkout lacks, in one line saying how to get it there;
what each source's split had to leave out, and what its groups are, for the dataset card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synthmed.core.config import as_dict, require_at_least_one, require_non_negative
from synthmed.core.errors import PipelineError
from synthmed.data.decode import DecodeOptions
from synthmed.data.dicom import without_patient_id
from synthmed.data.problems import Problems
from synthmed.data.sample import Sample


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


def load_demo(p, seed: int) -> tuple[list[Sample], int]:
    """The demo, split by the demo itself (it knows which slices neighbour), and its guard drop count."""
    from synthmed.data.demo import demo_samples

    if p.channels != 1:
        raise PipelineError("params.yaml: ingest.channels must be 1 for the demo (MRI is greyscale)")
    return demo_samples(resolution=p.resolution, split_fractions=p.split_fractions, seed=seed, **as_dict(p.demo))


def check_dataset_path(p) -> None:
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


def load_samples(p, problems: Problems) -> list[Sample]:
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


def load_volumes(p, seed: int, problems: Problems) -> tuple[list[Sample], int, list[str]]:
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


@dataclass
class GroupUnit:
    """What one group of a source is: the unit a split keeps whole, and so all the split guarantees."""
    text: str  # for the dataset card
    known: bool  # False: the data gave no groups, every image is its own, the split is image-level
    alone: str = ""  # unknown: what fell back to a group of its own, e.g. "each image"
    fix: str = ""  # unknown: how to give the images groups

    @classmethod
    def none(cls, alone: str, level: str, fix: str) -> "GroupUnit":
        return cls(f"none: {alone} is its own group — {level}-level split; images of one patient may fall in "
                   "different splits", False, alone, fix)


def group_unit(p, samples: list[Sample]) -> GroupUnit:
    """Where each source's groups come from (see its reader), worded for the card; ``known`` is False where the
    data gave none, so each image (volume, DICOM file) fell back to a group of its own."""
    volumes = p.dims == 3
    if p.source == "demo":
        what, guard, mirror = (("cube", "ingest.demo3d.guard_mm", "the guard covers a cube's left-right mirror")
                               if volumes else ("slice", "ingest.demo.guard_mm", "a sagittal slice and its mirror "
                                                "share one"))
        return GroupUnit(f"{what} position in the one MNI152 template brain ({mirror}): every image shows the same "
                         f"subject, so the split separates positions, `{guard}` apart, not subjects", True)
    singletons = len({s.group for s in samples}) == len(samples)
    if p.source == "nifti" and volumes:
        if singletons:
            return GroupUnit.none("each volume", "volume", "add a `group` column (the patient ID) to the "
                                  "captions CSV (ingest.volume.captions)")
        return GroupUnit("the captions CSV's `group` column (e.g. patient); a volume without one is its own group", True)
    if p.source == "nifti":
        if p.nifti.slab_slices:
            return GroupUnit(f"slab of {p.nifti.slab_slices} neighbouring slices of one volume: the slabs of one "
                             "volume, and so near-identical slices at slab borders, fall in different splits", True)
        return GroupUnit("volume (one NIfTI file): a volume's slices share a split; two volumes of one patient "
                         "may not", True)
    if p.source == "dicom":
        n = without_patient_id(samples)
        if samples and all(s.group.startswith("file-") for s in samples):
            return GroupUnit.none("each file", "file", "no file has PatientID, StudyInstanceUID or "
                                  "SeriesInstanceUID: export them with PatientID (or those UIDs) kept")
        return GroupUnit("patient (a keyed pseudonym of PatientID)" + (
            f"; {n} images without PatientID are grouped by study, series or file" if n else ""), True)
    metadata = "prompt-gt.csv" if p.source == "imageclef" else "the metadata (metadata.csv or metadata.jsonl)"
    if singletons:
        return GroupUnit.none("each image", "image", f"add a `group` column (the patient ID) to {metadata}")
    return GroupUnit("the metadata's `group` column (e.g. patient); an image without one is its own group", True)


def split_notes(p, samples: list[Sample], guard_dropped: int) -> tuple[list[str], dict[str, int]]:
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
