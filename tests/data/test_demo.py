import re
from collections import Counter

import numpy as np
import pytest

from synthmed.data.demo import demo_samples


@pytest.fixture(scope="module")
def samples():
    return demo_samples(resolution=32, slice_step_mm=8, slab_slices=2, min_brain_fraction=0.08)


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


def test_mirrored_sagittal_slices_share_a_group(samples):
    # The symmetric template makes x and -x identical images: they must not be split apart.
    by_pixels = {}
    for s in samples:
        by_pixels.setdefault(s.pixels.tobytes(), set()).add(s.group)
    assert all(len(groups) == 1 for groups in by_pixels.values())


def test_demo_is_deterministic(samples):
    again = demo_samples(resolution=32, slice_step_mm=8, slab_slices=2, min_brain_fraction=0.08)
    assert [s.file_name for s in again] == [s.file_name for s in samples]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(again, samples))
