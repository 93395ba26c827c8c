"""Group-aware, label-stratified, seeded train/val/test assignment."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from synthmed.errors import PipelineError

SPLITS = ("train", "val", "test")


def assign_splits(
    groups: list[str], labels: list[str], fractions: dict[str, float], seed: int
) -> list[str]:
    """Return a split name per item such that no group spans two splits.

    Groups are stratified by their majority label and dealt, in a seeded order,
    to the split furthest below its target count (within the stratum and overall).
    """
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()):
        raise PipelineError(f"split fractions must give train, val and test (>= 0), got {fractions}")
    total = sum(fractions.values())
    target = {k: v / total for k, v in fractions.items()}
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, idx in members.items():
        label = Counter(labels[i] for i in idx).most_common(1)[0][0]
        by_label[label].append(g)
    rng = random.Random(seed)
    group_split: dict[str, str] = {}
    taken_total = dict.fromkeys(SPLITS, 0)
    for label in sorted(by_label):
        stratum = sorted(by_label[label])
        rng.shuffle(stratum)
        taken = dict.fromkeys(SPLITS, 0)
        for g in stratum:
            n = len(members[g])
            # Deficit after adding this group, within the stratum and overall, so that
            # rounding in small strata does not pile up on one split.
            def deficit(s: str) -> float:
                stratum_size, total = sum(taken.values()) + n, sum(taken_total.values()) + n
                return (target[s] * stratum_size - taken[s]) + (target[s] * total - taken_total[s])

            split = max(SPLITS, key=deficit)
            group_split[g] = split
            taken[split] += n
            taken_total[split] += n
    return [group_split[g] for g in groups]


def check_no_leak(groups: list[str], splits: list[str]) -> None:
    seen: dict[str, str] = {}
    for g, s in zip(groups, splits):
        if seen.setdefault(g, s) != s:
            raise PipelineError(f"group '{g}' appears in both '{seen[g]}' and '{s}'; give it one split")
