"""NIfTI volumes as 3-D samples (`ingest.dims: 3`, source nifti): one uint8 cube per volume.

Each volume is reoriented to RAS (``nibabel.as_closest_canonical``; a residual oblique rotation
is ignored), then resampled with scipy (trilinear, order=1; Gaussian pre-smoothing where it is
downsampled) onto a cube of ``resolution`` voxels per side, centred on the volume's field of view,
at one isotropic spacing shared by all volumes:

- ``crop``: the spacing is ``ingest.volume.spacing_mm`` (0: the coarsest voxel size found among
  the volumes); a larger field of view is centre-cropped, a smaller one zero-padded;
- ``pad``: the same spacing, raised where needed so that the largest field of view among the
  volumes fits the cube; every volume keeps its whole field of view, and all share one scale.

Intensities are windowed to the ``percentiles`` of the non-zero voxels of the resampled field of
view, then mapped to 0..255. Voxel order is RAS: axis 0 x (left -> right), 1 y (posterior ->
anterior), 2 z (inferior -> superior).

Captions, in order of precedence: rows of the CSV ``ingest.volume.captions`` (relative to
``ingest.path``; columns file_name,text[,label,group,split]; several rows for one file give
several captions), else the header's ``descrip`` if not empty, else "{modality}MRI volume {stem}",
where the modality comes from a BIDS suffix of the file name (``_T1w`` -> "T1-weighted ", ...;
none: empty). The group is the CSV's group, else the file's stem (patient-level splits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthmed.data.nifti import _READ_ERRORS, find_volumes, volume_stem
from synthmed.data.problems import Problems, where
from synthmed.data.sample import Sample
from synthmed.data.transforms import to_uint8
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_file

MODALITIES = {"t1w": "T1-weighted ", "t2w": "T2-weighted ", "flair": "FLAIR ", "pdw": "PD-weighted ",
              "t2starw": "T2*-weighted "}


@dataclass
class VolumeParams:
    spacing_mm: float  # isotropic voxel size of the cubes; 0 = the coarsest found among the volumes
    percentiles: list[float]  # [low, high] intensity window per volume (non-zero voxels)
    captions: str  # CSV (file_name,text[,label,group,split]) relative to ingest.path; "" or absent: none

    def __post_init__(self) -> None:
        if self.spacing_mm < 0:
            raise ValueError(f"volume.spacing_mm must be 0 (coarsest) or more, got {self.spacing_mm}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"volume.percentiles {self.percentiles!r}: expected [low, high] with "
                             "0 <= low < high <= 100")


@dataclass
class _Volume:
    file: Path
    img: nib.spatialimages.SpatialImage  # RAS
    shape: tuple[int, int, int]
    voxel_mm: np.ndarray  # (3,) in RAS axis order


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _check(file: Path, problems: Problems) -> _Volume | None:
    """Header checks: a 3-D volume with a usable orientation; None (reported) otherwise."""
    try:
        img = nib.load(file)
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        problems.report("unreadable", f"{file}: cannot read NIfTI ({type(exc).__name__}: {exc}); "
                        "re-export or re-copy it, or remove it", file=file)
        return None
    if len(shape) == 4 and shape[3] == 1:  # one volume stored as 4-D (common in exports)
        shape = shape[:3]
    if len(shape) > 3:
        problems.report("not_3d", f"{file}: shape {img.shape} is a 4-D series, not one 3-D volume; split it "
                        "(e.g. nibabel.funcs.four_to_three) and keep the volumes you want, or remove the file",
                        file=file)
        return None
    if len(shape) < 3 or min(shape) < 2:
        problems.report("not_3d", f"{file}: shape {img.shape} is a 2-D image, not a 3-D volume; "
                        "ingest.dims: 3 needs volumes: remove the file, or set ingest.dims: 2 to ingest slices",
                        file=file)
        return None
    det = np.linalg.det(affine[:3, :3]) if np.isfinite(affine).all() else 0.0
    if not abs(det) > 1e-12:
        problems.report("no_orientation", f"{file}: its affine (voxel-to-world matrix) is singular or not "
                        "finite, so its orientation is unknown; fix the header's sform/qform or remove the file",
                        file=file)
        return None
    try:
        ras = nib.as_closest_canonical(img)
    except _READ_ERRORS as exc:
        problems.report("no_orientation", f"{file}: cannot reorient to RAS ({exc}); fix the header's "
                        "sform/qform or remove the file", file=file)
        return None
    ras_shape = tuple(int(n) for n in ras.shape[:3])
    return _Volume(file, ras, ras_shape, voxel_sizes(ras.affine))


def common_spacing(volumes: list[_Volume], spacing_mm: float, resolution: int, crop: str) -> float:
    """The isotropic spacing every cube gets (see the module docstring)."""
    spacing = spacing_mm or max(float(v.voxel_mm.max()) for v in volumes)
    if crop == "pad":
        largest = max(float((np.array(v.shape) * v.voxel_mm).max()) for v in volumes)
        spacing = max(spacing, largest / resolution)
    return spacing


def resample_cube(data: np.ndarray, voxel_mm: np.ndarray, spacing: float, resolution: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """RAS data -> (cube (R, R, R) float, mask of the cube's voxels inside the field of view)."""
    data = np.asarray(data, dtype=np.float64)
    factor = spacing / voxel_mm
    sigma = np.maximum(0.0, (factor - 1) / 2)  # anti-aliasing where the cube's voxels are coarser
    if sigma.any():
        data = ndimage.gaussian_filter(data, sigma=sigma, mode="nearest")
    offsets = (np.arange(resolution) - (resolution - 1) / 2) * spacing  # mm from the field of view's centre
    axes = [(n - 1) / 2 + offsets / v for n, v in zip(data.shape, voxel_mm)]  # voxel coordinates per axis
    inside_axes = [(a >= -0.5) & (a <= n - 0.5) for a, n in zip(axes, data.shape)]
    coords = np.stack(np.meshgrid(*[np.clip(a, 0, n - 1) for a, n in zip(axes, data.shape)], indexing="ij"))
    cube = ndimage.map_coordinates(data, coords, order=1, mode="nearest")
    inside = inside_axes[0][:, None, None] & inside_axes[1][None, :, None] & inside_axes[2][None, None, :]
    return np.where(inside, cube, 0.0), inside


def window(cube: np.ndarray, inside: np.ndarray, percentiles: list[float]) -> np.ndarray:
    values = cube[inside]
    tissue = values[values != 0]
    low, high = (float(v) for v in np.percentile(tissue if tissue.size else values, percentiles))
    out = to_uint8(cube, low, high)
    out[~inside] = 0
    return out


def default_caption(file: Path, img: nib.spatialimages.SpatialImage) -> str:
    descrip = img.header.get("descrip") if hasattr(img.header, "get") else None
    if descrip is not None:
        text = np.asarray(descrip).tobytes().split(b"\0")[0].decode("utf-8", "replace").strip()
        if text:
            return text
    stem = volume_stem(file)
    suffix = stem.rsplit("_", 1)[-1].lower() if "_" in stem else ""
    return f"{MODALITIES.get(suffix, '')}MRI volume {stem}"


def read_caption_rows(csv_path: Path, files: list[Path], problems: Problems) -> dict[str, tuple[list[str], dict]]:
    """file name -> (captions, label/group/split) from the captions CSV."""
    from synthmed.data.imagefolder import read_csv_rows

    names = {f.name for f in files}
    out: dict[str, tuple[list[str], dict, int]] = {}
    for row in read_csv_rows(csv_path, columns={"file_name": "file_name", "text": "text"}):
        name = PurePosixPath(row.file_name.strip().replace("\\", "/")).as_posix()
        at = where(csv_path, row.line)
        if name not in names:
            problems.report("missing_volume", f"{at}: file_name {row.file_name!r} is not a .nii/.nii.gz volume in "
                            f"{files[0].parent if files else csv_path.parent}; fix the name or drop the row",
                            file=csv_path, row=row.line)
            continue
        text = row.texts[0].strip()
        if not text:
            problems.report("empty_caption", f"{at}: empty caption for '{name}'; write a caption or drop the row",
                            file=csv_path, row=row.line)
            continue
        if name in out and out[name][1] != row.meta:
            problems.report("conflicting_rows", f"{at}: '{name}' has label/group/split {row.meta} but row "
                            f"{out[name][2]} says {out[name][1]}; make them agree", file=csv_path, row=row.line)
            continue
        captions, meta, first = out.get(name, ([], row.meta, row.line))
        if text not in captions:
            captions.append(text)
        out[name] = (captions, meta, first)
    return {k: (c, m) for k, (c, m, _) in out.items()}


def read_volumes(path: str | Path, p: VolumeParams, *, resolution: int, crop: str,
                 problems: Problems) -> tuple[list[Sample], float]:
    """One sample per usable volume, and the isotropic spacing (mm) of the cubes."""
    path = Path(path)
    files = find_volumes(path)
    if not files:
        problems.report("no_volumes", f"{path}: no .nii or .nii.gz volumes found; point ingest.path at such a "
                        "file or a folder holding them", file=path)
        return [], 0.0
    csv_path = (path if path.is_dir() else path.parent) / p.captions if p.captions else None
    rows = read_caption_rows(csv_path, files, problems) if csv_path is not None and csv_path.is_file() else {}
    volumes = [v for v in (_check(f, problems) for f in files) if v is not None]
    if not volumes:
        return [], 0.0
    spacing = common_spacing(volumes, p.spacing_mm, resolution, crop)
    samples: list[Sample] = []
    used: set[str] = set()
    for v in volumes:
        try:
            data = np.nan_to_num(v.img.get_fdata(dtype=np.float32).reshape(v.shape))
        except _READ_ERRORS as exc:
            problems.report("unreadable", f"{v.file}: cannot read NIfTI data ({type(exc).__name__}: {exc}); "
                            "re-export or re-copy it, or remove it", file=v.file)
            continue
        cube, inside = resample_cube(data, v.voxel_mm, spacing, resolution)
        digest = sha256_file(v.file)
        stem = volume_stem(v.file)
        name = f"{stem}.npy"
        if name in used:  # a.nii and a.nii.gz
            name = f"{stem}_{digest[:8]}.npy"
        used.add(name)
        captions, meta = rows.get(v.file.name, ([default_caption(v.file, v.img)], {}))
        samples.append(Sample(
            file_name=name, pixels=window(cube, inside, p.percentiles), captions=list(captions),
            group=meta.get("group") or stem, label=meta.get("label", ""), split=meta.get("split", ""),
            source=str(v.file), source_sha256=digest,
        ))
    return samples, spacing


def check_volume_params(dims: int, source: str, channels: int, resolution: int) -> None:
    """The stage's rules for `ingest.dims: 3`, one line each."""
    if dims != 3:
        return
    if source not in ("demo", "nifti"):
        raise PipelineError(f"params.yaml: ingest.dims: 3 reads volumes from ingest.source demo or nifti, not "
                            f"{source!r}; set ingest.source to demo or nifti, or ingest.dims to 2")
    if channels != 1:
        raise PipelineError(f"params.yaml: ingest.channels must be 1 with ingest.dims: 3 (volumes are greyscale), "
                            f"got {channels}")
    if resolution < 8:
        raise PipelineError(f"params.yaml: ingest.resolution must be at least 8 with ingest.dims: 3, got {resolution}")
