"""3-D NIfTI ingest (`ingest.dims: 3`): resampling, problems, captions, .npy folders, the stage."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from synthmed.data.imagefolder import load_images, write_imagefolder
from synthmed.data.problems import Problems
from synthmed.data.sample import Sample
from synthmed.data.volumes import VolumeParams, read_volumes
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_file
from tests.test_ingest_stage import run_ingest


def field(points: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric blob in world mm (zero far out): the same object however it is stored."""
    x, y, z = points
    r2 = (x / 30) ** 2 + ((y - 5) / 36) ** 2 + (z / 24) ** 2
    return np.where(r2 < 1, 100 + 0.8 * x + 0.5 * y - 0.6 * z, 0.0) * np.clip(3 * (1 - r2), 0, 1)


def volume_on(shape, affine) -> np.ndarray:
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return field(world).reshape(shape).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def ras_copy(folder: Path, name: str = "ras.nii.gz") -> Path:
    # 1.5 mm voxels, RAS, field of view 72 x 84 x 60 mm centred near the origin
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-35.25, -39.25, -29.25]
    return save(folder / name, volume_on((48, 56, 40), affine), affine)


def permuted_copy(folder: Path, name: str = "lps.nii") -> Path:
    # The same field of view with 2 mm voxels stored as (z, y, x), y and x flipped (LPS-like, permuted).
    shape = (30, 42, 36)  # z, y, x
    affine = np.zeros((4, 4))
    affine[0, 2] = -2.0  # x decreases along axis 2
    affine[1, 1] = -2.0  # y decreases along axis 1
    affine[2, 0] = 2.0  # z increases along axis 0
    affine[3, 3] = 1.0
    # centre the field of view on the RAS copy's centre: (0.0, 2.0, 0.0)
    centre_idx = (np.array(shape) - 1) / 2
    affine[:3, 3] = np.array([0.0, 2.0, 0.0]) - affine[:3, :3] @ centre_idx
    return save(folder / name, volume_on(shape, affine), affine)


def params(**kw) -> VolumeParams:
    return VolumeParams(**{"spacing_mm": 0.0, "percentiles": [0.5, 99.5], "captions": "captions.csv", **kw})


def read(path, p=None, *, resolution=32, crop="pad", on_error="fail"):
    problems = Problems(on_error)
    samples, spacing = read_volumes(path, p or params(), resolution=resolution, crop=crop, problems=problems)
    return samples, spacing, problems


@pytest.mark.parametrize("crop", ["pad", "crop"])
def test_orientation_voxel_order_and_spacing_do_not_change_the_cube(tmp_path, crop):
    # One dataset holding two copies of one object: 1.5 mm RAS, and 2 mm stored (z, y, x) with x, y flipped.
    ras_copy(tmp_path / "vols")
    permuted_copy(tmp_path / "vols")
    samples, spacing, _ = read(tmp_path / "vols", resolution=32, crop=crop)
    assert spacing == (2.0 if crop == "crop" else 84 / 32)  # the coarsest; pad: the largest extent fits
    cube_b, cube_a = (s.pixels for s in samples)  # lps.npy, ras.npy
    assert cube_a.shape == cube_b.shape == (32, 32, 32) and cube_a.dtype == np.uint8
    assert cube_a.max() == 255 and (cube_a > 0).mean() > 0.1
    assert np.abs(cube_a.astype(int) - cube_b.astype(int)).mean() <= 2
    # RAS: brightness grows with x (0.8 per mm), so the right half is brighter than the left
    inside = cube_a > 0
    right, left = cube_a[16:][inside[16:]].mean(), cube_a[:16][inside[:16]].mean()
    assert right > left


def test_mixed_spacings_share_the_coarsest_and_pad_fits_every_field_of_view(tmp_path):
    ras_copy(tmp_path / "vols")
    permuted_copy(tmp_path / "vols")
    samples, spacing, _ = read(tmp_path / "vols", resolution=16, crop="crop")
    assert spacing == 2.0 and [s.file_name for s in samples] == ["lps.npy", "ras.npy"]
    samples, spacing, _ = read(tmp_path / "vols", resolution=16, crop="pad")
    assert spacing == pytest.approx(84 / 16)  # the largest extent, 84 mm, fits 16 voxels
    for s in samples:  # y (84 mm) fills the cube; x (72 mm) and z (60 mm) are zero-padded
        assert s.pixels[[0, -1]].max() == 0 and s.pixels[:, :, [0, -1]].max() == 0
        assert s.pixels.max(axis=(0, 2))[[1, -2]].min() > 0


def test_2d_image_in_a_3d_dataset_names_the_file_and_the_fix(tmp_path):
    ras_copy(tmp_path / "vols")
    save(tmp_path / "vols" / "slice.nii.gz", np.ones((20, 20), np.float32), np.eye(4))
    with pytest.raises(PipelineError, match=r"slice\.nii\.gz: shape \(20, 20\) is a 2-D image.*ingest\.dims: 2"):
        read(tmp_path / "vols")
    save(tmp_path / "vols" / "slice.nii.gz", np.ones((20, 20, 1), np.float32), np.eye(4))  # singleton axis
    samples, _, problems = read(tmp_path / "vols", on_error="skip")
    assert [s.file_name for s in samples] == ["ras.npy"]
    assert problems.counts() == {"not_3d": 1} and "slice.nii.gz" in problems.items[0].message


def test_4d_series_is_not_one_volume(tmp_path):
    save(tmp_path / "series.nii.gz", np.ones((8, 8, 8, 3), np.float32), np.eye(4))
    _, _, problems = read(tmp_path / "series.nii.gz", on_error="skip")
    assert problems.counts() == {"not_3d": 1}
    assert "(8, 8, 8, 3)" in problems.items[0].message and "four_to_three" in problems.items[0].message


def test_singular_affine_is_no_orientation(tmp_path):
    ras_copy(tmp_path / "vols")
    singular = np.diag([1.0, 1.0, 0.0, 1.0])  # axis 2 maps nowhere: orientation unknown
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None)
    img.header.set_sform(singular, code=2)
    img.header.set_qform(None, code=0)
    nib.save(img, tmp_path / "vols" / "flat.nii")
    assert abs(np.linalg.det(nib.load(tmp_path / "vols" / "flat.nii").affine[:3, :3])) < 1e-12
    with pytest.raises(PipelineError, match=r"flat\.nii: its affine .* orientation is unknown"):
        read(tmp_path / "vols")
    samples, _, problems = read(tmp_path / "vols", on_error="skip")
    assert len(samples) == 1 and problems.counts() == {"no_orientation": 1}


def test_unreadable_volume(tmp_path):
    ras_copy(tmp_path / "vols")
    (tmp_path / "vols" / "bad.nii.gz").write_bytes(b"not a nifti at all" * 50)
    samples, _, problems = read(tmp_path / "vols", on_error="skip")
    assert len(samples) == 1 and problems.counts() == {"unreadable": 1}
    assert "bad.nii.gz" in problems.items[0].message


def test_captions_csv_several_per_file_then_descrip_then_template(tmp_path):
    folder = tmp_path / "vols"
    ras_copy(folder, "sub-01_T1w.nii.gz")
    permuted_copy(folder, "sub-02_T1w.nii")
    img = nib.load(permuted_copy(folder, "sub-03_FLAIR.nii.gz"))
    img.header["descrip"] = b"axial FLAIR, 3 T"
    nib.save(img, folder / "sub-03_FLAIR.nii.gz")
    ras_copy(folder, "sub-04_T2w.nii.gz")
    (folder / "captions.csv").write_text(
        "file_name,text,label,group\n"
        "sub-01_T1w.nii.gz,healthy adult brain,control,p1\n"
        "sub-01_T1w.nii.gz,\"T1 MRI, no lesion\",control,p1\n")
    samples, _, _ = read(folder)
    by = {s.file_name: s for s in samples}
    assert by["sub-01_T1w.npy"].captions == ["healthy adult brain", "T1 MRI, no lesion"]
    assert (by["sub-01_T1w.npy"].label, by["sub-01_T1w.npy"].group) == ("control", "p1")
    assert by["sub-02_T1w.npy"].captions == ["T1-weighted MRI volume sub-02_T1w"]
    assert by["sub-02_T1w.npy"].group == "sub-02_T1w" and by["sub-02_T1w.npy"].label == ""
    assert by["sub-03_FLAIR.npy"].captions == ["axial FLAIR, 3 T"]
    assert by["sub-04_T2w.npy"].captions == ["T2-weighted MRI volume sub-04_T2w"]
    assert by["sub-04_T2w.npy"].source_sha256 == sha256_file(folder / "sub-04_T2w.nii.gz")


def test_caption_row_naming_a_missing_file(tmp_path):
    folder = tmp_path / "vols"
    ras_copy(folder, "a.nii.gz")
    (folder / "captions.csv").write_text("file_name,text\na.nii.gz,brain\nb.nii.gz,another brain\n")
    with pytest.raises(PipelineError, match=r"captions\.csv, row 3: file_name 'b\.nii\.gz'"):
        read(folder)
    samples, _, problems = read(folder, on_error="skip")
    assert samples[0].captions == ["brain"] and problems.items[0].reason == "missing_volume"
    assert problems.items[0].row == 3


def test_npy_write_load_round_trip_and_deterministic_bytes(tmp_path):
    rng = np.random.default_rng(0)
    cubes = [rng.integers(0, 256, (8, 8, 8), dtype=np.uint8) for _ in range(3)]
    samples = [Sample(f"v{i}.npy", c, [f"cube {i}"], group=f"g{i}", split="train") for i, c in enumerate(cubes)]
    first = write_imagefolder(tmp_path / "a", samples)
    # a non-contiguous view of the same values gives the same file
    samples[1] = Sample("v1.npy", np.asfortranarray(cubes[1]), ["cube 1"], group="g1", split="train")
    second = write_imagefolder(tmp_path / "b", samples)
    assert first["sha256"].tolist() == second["sha256"].tolist()
    assert (tmp_path / "a/v0.npy").read_bytes() == (tmp_path / "b/v0.npy").read_bytes()
    loaded = load_images(tmp_path / "a", ["v0.npy", "v1.npy", "v2.npy"])
    assert loaded.shape == (3, 1, 8, 8, 8) and loaded.dtype == np.uint8
    assert all(np.array_equal(loaded[i, 0], c) for i, c in enumerate(cubes))
    assert list(pd.read_csv(tmp_path / "a/metadata.csv").columns) == ["file_name", "text", "label", "group",
                                                                       "split", "sha256"]


def test_ingest_stage_on_a_nifti_folder(tmp_path):
    folder = tmp_path / "data/raw/vols"
    for i in range(6):
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        affine[:3, 3] = [-35.25 + i, -39.25, -29.25]  # shifted copies: distinct cubes
        save(folder / f"sub-{i:02d}_T1w.nii.gz", volume_on((48, 56, 40), affine), affine)
    # shifted copies of one phantom, without groups: the leakage audit stops ingest unless volume-level splits
    # are accepted
    proc = run_ingest(tmp_path, source="nifti", path="data/raw/vols", dims=3, resolution=16, min_images=4)
    assert proc.returncode == 2 and "each volume is its own" in proc.stderr and "ingest.volume.captions" in proc.stderr
    proc = run_ingest(tmp_path, source="nifti", path="data/raw/vols", dims=3, resolution=16, min_images=4,
                      image_level_splits=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data/ingest"
    images = pd.read_parquet(out / "manifest/images.parquet")
    assert len(images) == 6 and (images[["depth", "height", "width"]] == 16).all().all()
    assert images["group"].nunique() == 6
    rows = pd.read_csv(out / "dataset/metadata.csv")
    assert load_images(out / "dataset", rows["file_name"].tolist()).shape == (6, 1, 16, 16, 16)
    card = (out / "card.md").read_text()
    assert "- Volumes: 6" in card and "16^3 voxels" in card and "isotropic" in card
    assert "none: each volume is its own group — volume-level split" in card and "central axial plane" in card


def test_ingest_stage_refuses_dims_3_for_image_sources(tmp_path):
    proc = run_ingest(tmp_path, source="imagefolder", path="data/raw/ds", dims=3)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "ingest.dims" in line and "demo or nifti" in line
    assert not (tmp_path / "data/ingest").exists()
    proc = run_ingest(tmp_path, source="demo", dims=3, channels=3)
    assert proc.returncode == 2 and "ingest.channels must be 1" in proc.stderr
