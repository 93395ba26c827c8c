from collections import Counter

import pytest

from synthmed.data.splits import assign_splits, check_no_leak, contiguous_splits
from synthmed.core.errors import PipelineError

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def dataset(n_groups=60, per_group=4):
    groups = [f"g{i}" for i in range(n_groups) for _ in range(per_group)]
    labels = [f"c{i % 3}" for i in range(n_groups) for _ in range(per_group)]
    return groups, labels


def test_split_never_cuts_a_group_and_is_reproducible():
    groups, labels = dataset()
    a = assign_splits(groups, labels, FRACTIONS, seed=1)
    assert a == assign_splits(groups, labels, FRACTIONS, seed=1)
    assert a != assign_splits(groups, labels, FRACTIONS, seed=2)
    check_no_leak(groups, a)
    for g in set(groups):
        assert len({s for s, gg in zip(a, groups) if gg == g}) == 1


def test_split_fractions_and_stratification():
    groups, labels = dataset()
    a = assign_splits(groups, labels, FRACTIONS, seed=0)
    counts = Counter(a)
    assert abs(counts["train"] / len(a) - 0.7) < 0.08
    for label in {"c0", "c1", "c2"}:
        assert {s for s, l in zip(a, labels) if l == label} == {"train", "val", "test"}


def test_leak_check_and_bad_fractions():
    with pytest.raises(PipelineError, match="group 'g' appears in both"):
        check_no_leak(["g", "g"], ["train", "test"])
    with pytest.raises(PipelineError, match="train, val and test"):
        assign_splits(["a"], ["x"], {"train": 1.0}, seed=0)


def axis(n=300, mirrored=False):
    """1 mm slices in three bands (tertiles); mirrored: every position twice, as |x| of sagittal slices."""
    coords = [float(c) for c in range(n) for _ in range(2 if mirrored else 1)]
    return coords, [f"band{int(3 * c // n)}" for c in coords]


def held_out_gap(coords, splits):
    held = [c for c, s in zip(coords, splits) if s in ("val", "test")]
    return min(abs(h - c) for h in held for c, s in zip(coords, splits) if s == "train")


@pytest.mark.parametrize("mirrored", [False, True])
def test_contiguous_splits_guard_fractions_and_runs(mirrored):
    coords, strata = axis(mirrored=mirrored)
    splits = contiguous_splits(coords, strata, FRACTIONS, guard=10, seed=0)
    assert held_out_gap(coords, splits) >= 10
    kept = [s for s in splits if s]
    assert splits.count("") == 3 * 2 * 9 * (2 if mirrored else 1)  # a guard of 9 slices on each side of each run
    for split, fraction in FRACTIONS.items():
        assert abs(kept.count(split) / len(kept) - fraction) < 0.02
    for band in set(strata):
        runs = [s for s, t in zip(splits, strata) if t == band]
        changes = sum(a != b for a, b in zip(runs, runs[1:]))
        # train | guard | test | val | test | guard | train, centred in the band
        assert set(runs) == {"train", "val", "test", ""} and changes == 6
        held = [c for c, s, t in zip(coords, splits, strata) if t == band and s in ("val", "test")]
        members = [c for c, t in zip(coords, strata) if t == band]
        assert abs((min(held) + max(held)) / 2 - (min(members) + max(members)) / 2) <= 1
    by_coord = {}
    for c, s in zip(coords, splits):
        by_coord.setdefault(c, set()).add(s)
    assert all(len(v) == 1 for v in by_coord.values())
    assert splits == contiguous_splits(coords, strata, FRACTIONS, guard=10, seed=0)


def test_contiguous_splits_without_guard_put_neighbours_on_both_sides():
    coords, strata = axis()
    splits = contiguous_splits(coords, strata, FRACTIONS, guard=0, seed=0)
    assert "" not in splits and held_out_gap(coords, splits) == 1


def test_contiguous_splits_guard_holds_across_band_borders():
    # A band too small for a train run is all held out: the next band's train slices keep their distance.
    coords = [float(c) for c in range(40)]
    strata = ["a"] * 2 + ["b"] * 38
    for seed in range(4):  # both orientations
        splits = contiguous_splits(coords, strata, {"train": 0.2, "val": 0.4, "test": 0.4}, guard=5, seed=seed)
        assert set(splits[:2]) == {"val", "test"} and held_out_gap(coords, splits) >= 5
