from collections import Counter

import pytest

from synthmed.data.splits import assign_splits, check_no_leak
from synthmed.errors import PipelineError

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
