import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from synthmed.data.nifti import NiftiParams, read_nifti
from synthmed.data.problems import Problems
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_file

SHAPE = (20, 24, 16)
# 2 mm voxels, RAS, with an offset: world = 2 * index + offset.
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20.0, -30.0, -10.0]
TEMPLATE = "{plane} slice of {volume} at {axis} = {position:+.1f} mm{regions}"
NAMES_TSV = "index\tname\n1\tputamen\n2\tthalamus\n4\tcaudate\n"  # 3 has no name on purpose


def grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")


def ellipsoid() -> np.ndarray:
    """Tissue from 50 (rim) to 100 (centre) inside radii 7, 8, 5 voxels; zero outside."""
    x, y, z = grid()
    c = (np.array(SHAPE) - 1) / 2
    r2 = ((x - c[0]) / 7) ** 2 + ((y - c[1]) / 8) ** 2 + ((z - c[2]) / 5) ** 2
    return np.where(r2 <= 1, 50 + 50 * (1 - r2), 0).astype(np.float32)


def atlas_labels() -> np.ndarray:
    """1 = left part of the ellipsoid (largest), 2 = right part, 3 and 4 = small blocks at z 7..8."""
    x, _, _ = grid()
    inside = ellipsoid() > 0
    labels = np.where(inside, np.where(x < 12, 1, 2), 0).astype(np.int16)
    labels[4:7, 10:13, 7:9] = 3  # 9 voxels per axial slice
    labels[14:16, 10:12, 7:9] = 4  # 4 voxels per axial slice: 4th largest, so never listed there
    return labels


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def params(**overrides) -> NiftiParams:
    base = dict(
        planes=["axial", "coronal", "sagittal"],
        slice_step=1,
        percentiles=[0.5, 99.5],
        min_foreground=0.1,
        slab_slices=3,
        atlas="",
        atlas_names="",
        caption_template=TEMPLATE,
    )
    return NiftiParams(**{**base, **overrides})


def read(path, p=None, *, resolution=32, crop="pad", channels=1, on_error="fail"):
    problems = Problems(on_error)
    samples = read_nifti(path, p or params(), resolution=resolution, crop=crop, channels=channels, problems=problems)
    return samples, problems


def position(caption: str) -> float:
    return float(re.search(r"[xyz] = ([+-]\d+\.\d) mm", caption).group(1))


@pytest.fixture
def brain(tmp_path) -> Path:
    return save(tmp_path / "brain.nii.gz", ellipsoid())


@pytest.mark.parametrize("channels, shape", [(1, (32, 32)), (3, (32, 32, 3))])
def test_requested_planes_shape_and_dtype(brain, channels, shape):
    samples, _ = read(brain, params(planes=["axial", "sagittal"]), channels=channels)
    assert {s.label for s in samples} == {"axial", "sagittal"}
    for s in samples:
        assert s.pixels.shape == shape and s.pixels.dtype == np.uint8
        assert s.pixels.max() > 64  # every kept slice cuts through tissue
        assert s.source == str(brain) and s.source_sha256 == sha256_file(brain)


def test_near_empty_slices_skipped(brain):
    everything, _ = read(brain, params(planes=["axial"], min_foreground=0.0))
    assert len(everything) == SHAPE[2]  # threshold 0 keeps all 16 axial slices
    samples, _ = read(brain, params(planes=["axial"]))
    kept = {round((position(s.captions[0]) + 10) / 2) for s in samples}  # world z -> slice index
    assert 7 in kept and 8 in kept  # the centre
    assert kept.isdisjoint({0, 1, 2, 3, 12, 13, 14, 15})  # empty or a sliver of tissue
    assert kept == set(range(min(kept), max(kept) + 1))


def test_captions_give_plane_and_world_position(brain):
    samples, _ = read(brain)
    assert samples
    for s in samples:
        (caption,) = s.captions
        plane, axis = s.label, {"sagittal": "x", "coronal": "y", "axial": "z"}[s.label]
        assert caption.startswith(f"{plane} slice of brain at {axis} = ")
        assert caption.endswith(" mm")  # no atlas: no regions text
        pos = position(caption)
        offset = AFFINE["xyz".index(axis), 3]
        index = (pos - offset) / 2
        assert index == int(index) and 0 <= index < SHAPE["xyz".index(axis)]
        assert s.file_name == f"brain_{plane}_{axis}{pos:+04.0f}.png"
    # the centre of the ellipsoid (index 9.5, 11.5, 7.5) is at world (-1, -7, 5): slices on both sides
    axial = sorted(position(s.captions[0]) for s in samples if s.label == "axial")
    assert axial[0] < 5 < axial[-1] and 4.0 in axial and 6.0 in axial


def test_orientation_is_reoriented_to_ras_and_displayed_like_the_demo(tmp_path):
    # Brightness grows towards anterior (y) and superior (z): the top row of every image is brightest.
    cube = (16, 16, 16)
    _, y, z = np.meshgrid(*(np.arange(n) for n in cube), indexing="ij")
    data = (1 + y + z).astype(np.float32)
    ras = save(tmp_path / "ras.nii", data, np.eye(4))
    # The same world image stored left-right flipped (LAS): must give identical slices and positions.
    las_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    las_affine[0, 3] = 15.0
    las = save(tmp_path / "las" / "las.nii", data[::-1].copy(), las_affine)
    p = params(min_foreground=0.0, percentiles=[0.0, 100.0])
    a, _ = read(ras, p, resolution=16)
    b, _ = read(las, p, resolution=16)
    for s in a:
        assert s.pixels[0].mean() > s.pixels[-1].mean(), s.file_name
    assert [s.file_name.replace("ras", "") for s in a] == [s.file_name.replace("las", "") for s in b]
    assert all(np.array_equal(s.pixels, t.pixels) for s, t in zip(a, b))


def test_window_uses_tissue_percentiles(brain, tmp_path):
    samples, _ = read(brain, params(planes=["axial"]), resolution=24)  # 24x20 padded to 24: no resampling
    centre = next(s for s in samples if s.file_name == "brain_axial_z+004.png")
    tissue = np.rot90(ellipsoid()[:, :, 7]) > 0
    tissue = np.pad(tissue, ((0, 0), (2, 2)))
    # Over all voxels the low percentile would be 0 and the rim (~50 of 100) would map to ~128.
    assert centre.pixels[tissue].min() < 40 and centre.pixels[tissue].max() == 255
    assert (centre.pixels[~tissue] == 0).all()
    # The window is relative to the volume: rescaled intensities give the same images.
    scaled = save(tmp_path / "scaled" / "brain.nii.gz", ellipsoid() * 1000)
    again, _ = read(scaled, params(planes=["axial"]), resolution=24)
    assert all(np.array_equal(s.pixels, t.pixels) for s, t in zip(samples, again))


@pytest.mark.parametrize("names_file, text", [("names.tsv", NAMES_TSV), ("names.csv", NAMES_TSV.replace("\t", ","))])
def test_atlas_regions_in_captions(brain, tmp_path, names_file, text):
    atlas = save(tmp_path / "atlas.nii.gz", atlas_labels())
    (tmp_path / names_file).write_text(text)
    samples, _ = read(brain, params(atlas=str(atlas), atlas_names=str(tmp_path / names_file)))
    caption = {s.file_name: s.captions[0] for s in samples}
    # axial z index 7: putamen > thalamus > label 3 (9 voxels) > caudate (4 voxels, left out)
    assert caption["brain_axial_z+004.png"].endswith("; regions: putamen, thalamus, label 3")
    assert caption["brain_axial_z+010.png"].endswith("; regions: putamen, thalamus")  # index 10: no blocks
    # sagittal: world x = 2 * index - 20
    assert caption["brain_sagittal_x-012.png"].endswith("; regions: putamen, label 3")  # index 4
    assert caption["brain_sagittal_x-006.png"].endswith("; regions: putamen")  # index 7
    assert caption["brain_sagittal_x+006.png"].endswith("; regions: thalamus")  # index 13
    assert caption["brain_sagittal_x+010.png"].endswith("; regions: thalamus, caudate")  # index 15


def test_groups_are_slabs_per_volume_and_plane(tmp_path):
    folder = tmp_path / "vols"
    save(folder / "a.nii.gz", ellipsoid())
    save(folder / "b.nii", ellipsoid())
    samples, _ = read(folder, params(slab_slices=3))
    for volume, file in (("a", "a.nii.gz"), ("b", "b.nii")):
        for plane in ("axial", "coronal", "sagittal"):
            these = [s for s in samples if Path(s.source).name == file and s.label == plane]
            assert len(these) > 3
            assert [s.group for s in these] == [f"{volume}-{plane}-slab{k // 3:02d}" for k in range(len(these))]
    whole, _ = read(folder, params(slab_slices=0))
    assert {s.group for s in whole} == {"a", "b"}  # volume-level groups: planes of one volume never split


def test_folder_of_two_volumes_gives_unique_file_names(tmp_path):
    folder = tmp_path / "vols"
    save(folder / "a.nii.gz", ellipsoid())
    save(folder / "b.nii.gz", ellipsoid())
    (folder / "notes.txt").write_text("not a volume")
    samples, _ = read(folder)
    names = [s.file_name for s in samples]
    assert len(names) == len(set(names))
    assert {n.split("_")[0] for n in names} == {"a", "b"}
    assert len(names) == 2 * len(read(folder / "a.nii.gz")[0])


def test_sub_millimetre_slices_keep_file_names_unique(tmp_path):
    fine = save(tmp_path / "fine.nii.gz", ellipsoid(), np.diag([0.4, 0.4, 0.4, 1.0]))
    samples, _ = read(fine)
    names = [s.file_name for s in samples]
    assert len(names) == len(set(names))
    # 0.8 and 1.2 mm both round to 1 mm: the second one gets its slice index appended
    suffixed = [n for n in names if "_i0" in n]
    assert suffixed and all(re.sub(r"_i\d+", "", n) in names for n in suffixed)


def test_corrupt_volume(tmp_path):
    folder = tmp_path / "vols"
    good = save(folder / "a.nii.gz", ellipsoid())
    (folder / "x.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(PipelineError, match=r"x\.nii\.gz"):
        read(folder, on_error="fail")
    samples, problems = read(folder, on_error="skip")
    assert samples and {s.source for s in samples} == {str(good)}
    assert [(Path(p.file).name, p.reason) for p in problems.items] == [("x.nii.gz", "corrupt_volume")]
    assert "x.nii.gz" in problems.items[0].message


def test_truncated_volume_is_corrupt(tmp_path):
    path = save(tmp_path / "t.nii", ellipsoid())
    path.write_bytes(path.read_bytes()[:-1000])
    samples, problems = read(path, on_error="skip")
    assert samples == [] and problems.counts() == {"corrupt_volume": 1}


def test_shapes_other_than_one_3d_volume(tmp_path):
    flat = save(tmp_path / "flat.nii.gz", ellipsoid()[:, :, 7])
    with pytest.raises(PipelineError, match=r"flat\.nii\.gz: expected a 3-D volume, got shape \(20, 24\)"):
        read(flat)
    series = save(tmp_path / "series.nii.gz", np.stack([ellipsoid()] * 2, axis=-1))
    _, problems = read(series, on_error="skip")
    assert problems.counts() == {"bad_volume": 1} and "(20, 24, 16, 2)" in problems.items[0].message
    # A 4-D file holding a single volume is read like the 3-D one.
    single = save(tmp_path / "single" / "brain.nii.gz", ellipsoid()[..., None])
    plain = save(tmp_path / "brain.nii.gz", ellipsoid())
    a, b = read(single)[0], read(plain)[0]
    assert a and [s.file_name for s in a] == [s.file_name for s in b]
    assert all(np.array_equal(s.pixels, t.pixels) for s, t in zip(a, b))


def test_atlas_shape_mismatch(brain, tmp_path):
    atlas = save(tmp_path / "small_atlas.nii.gz", np.ones((10, 12, 8), dtype=np.int16))
    p = params(atlas=str(atlas))
    with pytest.raises(PipelineError, match="atlas"):
        read(brain, p)
    samples, problems = read(brain, p, on_error="skip")
    assert samples == [] and problems.counts() == {"atlas_mismatch": 1}
    message = problems.items[0].message
    assert "brain.nii.gz" in message and "small_atlas.nii.gz" in message and "(10, 12, 8)" in message


@pytest.mark.parametrize("template", ["{plane} at {depth} mm", "{plane} {}", "{position:d}", "{plane"])
def test_bad_caption_template(tmp_path, template):
    # Checked before anything is read: the missing path would otherwise be the error.
    with pytest.raises(PipelineError, match=r"ingest\.nifti\.caption_template") as info:
        read(tmp_path / "missing", params(caption_template=template))
    assert "{position}" in str(info.value) and "{regions}" in str(info.value)


def test_no_volumes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no .nii"):
        read(tmp_path / "empty")
    samples, problems = read(tmp_path / "empty", on_error="skip")
    assert samples == [] and problems.counts() == {"no_volumes": 1}


def test_params_are_validated():
    with pytest.raises(ValueError, match="planes"):
        params(planes=["oblique"])
    with pytest.raises(ValueError, match="percentiles"):
        params(percentiles=[99.0, 1.0])
