"""NIfTI volumes (.nii / .nii.gz) sliced into captioned 2-D images.

Follows the demo reader's conventions: volumes are reoriented to RAS so axis 0
is x (sagittal), 1 is y (coronal) and 2 is z (axial); slices are shown with
superior (or anterior) at the top; positions are world millimetres from the
affine; near-empty slices are skipped; neighbouring slices share a group so the
splitter keeps them on one side.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from synthmed.data.problems import Problems
from synthmed.data.sample import Sample
from synthmed.data.transforms import prepare, to_uint8
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_file

PLANES = {"sagittal": (0, "x"), "coronal": (1, "y"), "axial": (2, "z")}  # RAS axis, world coordinate
TEMPLATE_FIELDS = ("plane", "axis", "position", "volume", "regions")
MAX_REGIONS = 3
# What a damaged file can raise inside nibabel (bad gzip, short read, bad header).
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


@dataclass
class NiftiParams:
    planes: list[str]  # subset of PLANES
    slice_step: int  # take every k-th slice along each plane
    percentiles: list[float]  # [low, high] intensity window per volume
    min_foreground: float  # skip slices with fewer than this fraction of pixels above the low window
    slab_slices: int  # 0: one group per volume (patient-level splits); k: slabs of k neighbouring slices
    atlas: str  # "" or an integer label volume on the same grid as the images
    atlas_names: str  # "" or a CSV/TSV with columns index,name
    caption_template: str  # str.format with fields TEMPLATE_FIELDS

    def __post_init__(self) -> None:
        # ValueError: config.load_params turns it into a PipelineError naming params.yaml.
        unknown = [p for p in self.planes if p not in PLANES]
        if unknown or not self.planes:
            raise ValueError(f"planes {self.planes!r}: use one or more of {', '.join(PLANES)}")
        if self.slice_step < 1 or self.slab_slices < 0:
            raise ValueError("slice_step must be >= 1 and slab_slices >= 0")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles {self.percentiles!r}: expected [low, high] with 0 <= low < high <= 100")
        if not 0 <= self.min_foreground <= 1:
            raise ValueError(f"min_foreground {self.min_foreground!r}: expected a fraction in [0, 1]")


def check_template(template: str) -> None:
    """Fail before any volume is read if the caption template cannot be filled."""
    allowed = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    dummy = dict(plane="axial", axis="z", position=0.0, volume="v", regions="")
    try:
        template.format(**dummy)  # unknown or positional fields, bad specs such as {position:d}
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise PipelineError(
            f"ingest.nifti.caption_template: cannot use {template!r} ({type(exc).__name__}: {exc}); "
            f"allowed fields: {allowed}"
        ) from None


def volume_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))


def find_volumes(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if _is_nifti(p))
    return [path] if _is_nifti(path) else []


def read_names(path: str) -> dict[int, str]:
    """index -> name from a CSV or TSV (a tab in the header line means TSV)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"ingest.nifti.atlas_names: cannot read {path} ({exc}); fix the path or the file") from None
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    rows = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if not rows.fieldnames or not {"index", "name"} <= {f.strip() for f in rows.fieldnames}:
        raise PipelineError(f"ingest.nifti.atlas_names: {path} needs a header with columns index,name")
    names: dict[int, str] = {}
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        try:
            names[int(row["index"])] = row["name"]
        except ValueError:
            raise PipelineError(
                f"ingest.nifti.atlas_names: {path}, row {line_no}: index {row['index']!r} is not an integer"
            ) from None
    return names


def load_atlas(p: NiftiParams) -> tuple[np.ndarray, dict[int, str]] | None:
    """(labels in RAS, names), or None without an atlas. A bad atlas stops the run: it affects every volume."""
    if not p.atlas:
        return None
    try:
        img = nib.as_closest_canonical(nib.load(p.atlas))
        labels = np.rint(np.asarray(img.dataobj, dtype=np.float64)).astype(np.int64)
    except _READ_ERRORS as exc:  # includes a missing file (OSError)
        raise PipelineError(f"ingest.nifti.atlas: cannot read {p.atlas} ({exc}); fix the path or the file") from None
    if labels.ndim == 4 and labels.shape[3] == 1:
        labels = labels[..., 0]
    return labels, read_names(p.atlas_names) if p.atlas_names else {}


def regions_text(labels: np.ndarray, names: dict[int, str]) -> str:
    """The labels covering most pixels of one slice, largest first (ties by index)."""
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    top = sorted(zip(-counts, values))[:MAX_REGIONS]
    if not top:
        return ""
    return "; regions: " + ", ".join(names.get(int(v), f"label {int(v)}") for _, v in top)


def display(slice_2d: np.ndarray) -> np.ndarray:
    """RAS slice -> image with superior (or anterior) at the top, as in the demo."""
    return np.ascontiguousarray(np.rot90(slice_2d))


def read_nifti(
    path: str | Path, p: NiftiParams, *, resolution: int, crop: str, channels: int, problems: Problems
) -> list[Sample]:
    check_template(p.caption_template)
    path = Path(path)
    files = find_volumes(path)
    if not files:
        problems.report(
            "no_volumes",
            f"{path}: no .nii or .nii.gz volumes found; point the input at such a file or a folder holding them",
            file=path,
        )
        return []
    atlas = load_atlas(p)
    samples: list[Sample] = []
    used_names: set[str] = set()
    for file in files:
        try:
            img = nib.load(file)
            shape = img.shape
            # A 4-D file with one volume is common (e.g. exported series); anything else is not one volume.
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            if len(shape) != 3 or min(shape) < 2:
                problems.report(
                    "bad_volume",
                    f"{file}: expected a 3-D volume, got shape {img.shape}; "
                    "split 4-D series into 3-D volumes (e.g. nibabel.funcs.four_to_three) or remove the file",
                    file=file,
                )
                continue
            img = nib.as_closest_canonical(img)  # RAS: axis 0 = x, 1 = y, 2 = z
            data = np.nan_to_num(img.get_fdata(dtype=np.float32).reshape(shape))
        except _READ_ERRORS as exc:
            problems.report(
                "corrupt_volume",
                f"{file}: cannot read NIfTI ({type(exc).__name__}: {exc}); re-export or re-copy it, or remove it",
                file=file,
            )
            continue
        if atlas is not None and atlas[0].shape != data.shape:
            problems.report(
                "atlas_mismatch",
                f"{file}: atlas {p.atlas} has shape {atlas[0].shape} but the volume has shape {data.shape} "
                "(both in RAS); resample the atlas onto the images' grid or set ingest.nifti.atlas to \"\"",
                file=file,
            )
            continue
        samples.extend(_volume_samples(file, data, img.affine, atlas, p, resolution, crop, channels, used_names))
    return samples


def _volume_samples(
    file: Path,
    data: np.ndarray,
    affine: np.ndarray,
    atlas: tuple[np.ndarray, dict[int, str]] | None,
    p: NiftiParams,
    resolution: int,
    crop: str,
    channels: int,
    used_names: set[str],
) -> list[Sample]:
    volume = volume_stem(file)
    digest = sha256_file(file)
    # Window on the tissue, not the (usually zero) background, so contrast is comparable across volumes.
    nonzero = data[data != 0]
    low, high = (float(v) for v in np.percentile(nonzero if nonzero.size else data, p.percentiles))
    centre = (np.array(data.shape) - 1) / 2
    out: list[Sample] = []
    for plane in p.planes:
        axis, coord = PLANES[plane]
        kept = [
            i for i in range(0, data.shape[axis], p.slice_step)
            if (np.take(data, i, axis=axis) > low).mean() >= p.min_foreground
        ]
        for k, index in enumerate(kept):
            # World coordinate of the slice centre: right for oblique affines too, not just diagonal ones.
            voxel = centre.copy()
            voxel[axis] = index
            position = float((affine @ np.append(voxel, 1.0))[axis])
            regions = regions_text(np.take(atlas[0], index, axis=axis), atlas[1]) if atlas is not None else ""
            caption = p.caption_template.format(
                plane=plane, axis=coord, position=position, volume=volume, regions=regions
            )
            pixels = prepare(to_uint8(display(np.take(data, index, axis=axis)), low, high), resolution, crop)
            if channels == 3:
                pixels = np.repeat(pixels[..., None], 3, axis=2)
            name = f"{volume}_{plane}_{coord}{position:+04.0f}.png"
            if name in used_names:  # sub-millimetre slices can round to the same mm
                name = f"{volume}_{plane}_{coord}{position:+04.0f}_i{index:03d}.png"
            used_names.add(name)
            out.append(
                Sample(
                    file_name=name,
                    pixels=pixels,
                    captions=[caption],
                    # The splitter never cuts a group. Slices of different planes of one volume
                    # share anatomy, so by default (0) the whole volume is one group; slabs suit a
                    # single volume, keeping near-identical neighbours on one side.
                    group=f"{volume}-{plane}-slab{k // p.slab_slices:02d}" if p.slab_slices else volume,
                    label=plane,
                    source=str(file),
                    source_sha256=digest,
                )
            )
    return out
