"""The 3-D demo: cubes of the MNI152 template, guarded splits, per-cube seeds; the stage with dims 3."""

import functools
import json
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from synthmed.data import demo3d
from tests.test_ingest_stage import run_ingest

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
DEFAULTS = dict(extent_mm=64.0, step_mm=16, guard_mm=48.0, elastic_mm=3.0, intensity=0.1, min_brain_fraction=0.4)


@pytest.fixture(scope="module", autouse=True)
def cached_template():
    """Load the template once for the module (nilearn takes seconds)."""
    original = demo3d._load_template
    demo3d._load_template = functools.cache(original)
    yield
    demo3d._load_template = original


def build(resolution: int = 8, seed: int = 42, **kw):
    return demo3d.demo3d_samples(resolution=resolution, split_fractions=FRACTIONS, seed=seed, **{**DEFAULTS, **kw})


@pytest.fixture(scope="module")
def built():
    return build()


def centre(sample) -> tuple[int, int, int]:
    x, y, z = re.fullmatch(r"cube_x([+-]\d+)_y([+-]\d+)_z([+-]\d+)\.npy", sample.file_name).groups()
    return int(x), int(y), int(z)


def test_cubes_labels_and_captions(built):
    samples, dropped = built
    assert 250 <= len(samples) <= 400 and dropped > 0
    labels = Counter(s.label for s in samples)
    assert set(labels) == set(demo3d.BANDS) and min(labels.values()) >= 20
    assert len({(s.label, s.split) for s in samples}) == 9  # every label in every split
    for s in samples:
        assert s.pixels.shape == (8, 8, 8) and s.pixels.dtype == np.uint8 and s.pixels.mean() > 20
        (caption,) = s.captions
        assert caption.startswith("T1-weighted brain MRI sub-volume, ") and s.label in caption
        assert re.search(r"\d+% grey matter, \d+% white matter, \d+% CSF$", caption)
        assert ("left" in caption) == (centre(s)[0] < 0) and ("right" in caption) == (centre(s)[0] > 0)
    shares = Counter(s.split for s in samples)
    for split, fraction in FRACTIONS.items():
        assert abs(shares[split] / len(samples) - fraction) < 0.05, shares


def test_no_held_out_cube_within_the_guard_of_a_train_cube(built):
    samples, _ = built
    train = np.array([centre(s) for s in samples if s.split == "train"])
    held = np.array([centre(s) for s in samples if s.split != "train"])
    for h in held:
        for c in (h, h * [-1, 1, 1]):  # the cube and its left-right mirror image
            assert np.abs(train - c).max(axis=1).min() >= DEFAULTS["guard_mm"]


def test_deterministic_for_a_seed_and_different_for_another(built):
    samples, dropped = built
    again, dropped_again = build()
    assert dropped == dropped_again
    assert [(s.file_name, s.split, s.captions) for s in again] == [(s.file_name, s.split, s.captions) for s in samples]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(again, samples))
    other = {s.file_name: s.pixels for s in build(seed=7)[0]}
    shared = [s for s in samples if s.file_name in other]
    assert shared and not all(np.array_equal(s.pixels, other[s.file_name]) for s in shared)


def test_a_cube_does_not_depend_on_which_others_exist(built):
    samples, _ = built
    sparse, _ = build(step_mm=32)  # its grid is a subset of the 16 mm grid
    full = {s.file_name: s.pixels for s in samples}
    shared = [s for s in sparse if s.file_name in full]
    assert len(shared) > 10
    assert all(np.array_equal(s.pixels, full[s.file_name]) for s in shared)
    # and one cube rendered on its own
    template = demo3d._load_template()
    s = samples[0]
    alone, _ = demo3d.render_cube(template, centre(s), seed=42, resolution=8, extent_mm=64.0, elastic_mm=3.0,
                                  intensity=0.1, smoothed=demo3d.smoothed_t1(template, 8, 64.0))
    assert np.array_equal(alone, s.pixels)


def test_guarded_splits_on_a_line():
    centres = np.array([[0, 0, z] for z in range(0, 200, 10)])
    splits = demo3d.guarded_splits(centres, ["a"] * 20, FRACTIONS, guard_mm=25.0, seed=0)
    held = [c[2] for c, s in zip(centres, splits) if s in ("val", "test")]
    train = [c[2] for c, s in zip(centres, splits) if s == "train"]
    assert held and train and min(abs(h - t) for h in held for t in train) >= 25
    assert splits.count("") == 2  # a blob at one end of the line costs one guard gap of two positions


def test_ingest_stage_builds_the_3d_demo(tmp_path):
    proc = run_ingest(tmp_path, source="demo", dims=3, resolution=16)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data/ingest"
    images = pd.read_parquet(out / "manifest/images.parquet")
    assert (images[["depth", "height", "width"]] == 16).all().all() and images["id"].str.endswith(".npy").all()
    metrics = json.loads((tmp_path / "metrics/all/ingest.json").read_text())
    assert metrics["images"] == len(images) and metrics["guard_dropped"] > 0 and metrics["labels"] == 3
    card = (out / "card.md").read_text()
    assert f"- Volumes: {len(images)}" in card and "Guard: " in card and "16^3 voxels" in card
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.width == 4 * (3 * 16 + 2) * 2  # 4 volumes per row, 3 planes of 16 px and 2 gaps, scale 2
