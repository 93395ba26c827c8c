import re
from collections import Counter

import numpy as np
import pytest

from synthmed.data.demo import demo_samples

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
GUARD = 6.0


def build(step: int = 8, guard: float = 8.0, resolution: int = 32):
    return demo_samples(resolution=resolution, slice_step_mm=step, guard_mm=guard, min_brain_fraction=0.08,
                        split_fractions=FRACTIONS, seed=42)


@pytest.fixture(scope="module")
def samples():
    return build()[0]


@pytest.fixture(scope="module")
def guarded():
    """2 mm slices (1 mm in params.yaml; 2 keeps the test fast) with the default 6 mm guard."""
    return build(step=2, guard=GUARD, resolution=8)


def position(sample) -> tuple[str, float]:
    """Plane and position along its axis; |x| for sagittal, where x and -x are the same image."""
    plane, value = re.fullmatch(r"([a-z]+)_[xyz]([+-]\d+)\.png", sample.file_name).groups()
    return plane, abs(float(value)) if plane == "sagittal" else float(value)


def train_gaps(samples) -> dict[str, float]:
    """Per plane, the least distance (mm) from a val/test slice to a train slice."""
    train, held = {}, {}
    for s in samples:
        plane, pos = position(s)
        (train if s.split == "train" else held).setdefault(plane, []).append(pos)
    return {plane: min(abs(h - t) for h in held[plane] for t in train[plane]) for plane in held}


def test_three_planes_nine_classes_sized_and_captioned(samples):
    assert len(samples) > 40
    labels = Counter(s.label for s in samples)
    assert len(labels) == 9 and min(labels.values()) >= 2
    for s in samples:
        assert s.pixels.shape == (32, 32) and s.pixels.dtype == np.uint8
        assert s.pixels.mean() > 10  # near-empty slices were skipped
        (caption,) = s.captions
        plane = s.label.split("_")[0]
        assert plane in caption
        assert re.search(r"[xyz] = [+-]?\d+ mm", caption)
        assert re.search(r"\d+% grey matter, \d+% white matter", caption)


def test_mirrored_sagittal_slices_share_a_group_and_split(samples):
    # The symmetric template makes x and -x identical images: they must not be split apart.
    by_pixels = {}
    for s in samples:
        by_pixels.setdefault(s.pixels.tobytes(), set()).add((s.group, s.split))
    assert all(len(groups) == 1 for groups in by_pixels.values())


def test_demo_is_deterministic(samples):
    again, _ = build()
    assert [(s.file_name, s.split) for s in again] == [(s.file_name, s.split) for s in samples]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(again, samples))


def test_held_out_slices_are_a_guard_away_from_train(guarded):
    samples, dropped = guarded
    gaps = train_gaps(samples)
    assert set(gaps) == {"sagittal", "coronal", "axial"}
    assert min(gaps.values()) >= GUARD, gaps


def test_guard_keeps_fractions_and_every_label_in_every_split(guarded):
    samples, dropped = guarded
    everything, none_dropped = build(step=2, guard=0.0, resolution=8)
    assert none_dropped == 0 and dropped > 0 and len(samples) + dropped == len(everything)
    shares = Counter(s.split for s in samples)
    for split, fraction in FRACTIONS.items():
        assert abs(shares[split] / len(samples) - fraction) < 0.02, shares
    assert len({(s.label, s.split) for s in samples}) == 27


def test_without_guard_neighbours_straddle_the_split():
    # What the guard prevents: a test slice one slice step from a train slice (a near-copy), which
    # makes the privacy audit's test-to-train reference distance tiny.
    samples, _ = build(step=2, guard=0.0, resolution=8)
    assert set(train_gaps(samples).values()) == {2.0}


def test_every_slice_carries_a_tissue_mask_that_lines_up_with_its_t1_contrast(samples):
    masks = np.stack([s.mask for s in samples])
    images = np.stack([s.pixels for s in samples]).astype(float)
    assert masks.shape == images.shape and set(np.unique(masks)) == {0, 1, 2, 3}
    mean = [images[masks == c].mean() for c in range(4)]  # T1: background < CSF < grey < white matter
    assert mean[0] < mean[1] < mean[2] < mean[3]
    assert all((s.mask > 0).mean() > 0.05 for s in samples)  # every slice shows brain
