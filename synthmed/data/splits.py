"""Group-aware, label-stratified, seeded train/val/test assignment."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from synthmed.core.errors import PipelineError

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


def contiguous_splits(coords: list[float], strata: list[str], fractions: dict[str, float], guard: float,
                      seed: int) -> list[str]:
    """Split the slices of one axis into contiguous runs; "" marks a slice dropped as guard.

    Neighbouring slices of one volume are near-identical images, so random slabs put 1 mm neighbours
    on both sides of the split. Here each stratum (a band of ``coords``) holds out one run at its
    centre, val in the middle and test on either side of it, sized by ``fractions`` of the slices
    kept; train slices nearer than ``guard`` to a val or test slice are dropped, so a held-out
    slice's nearest train slice is at least ``guard`` away (val and test may touch: neither is
    trained on). Held-out runs at band borders would be cheaper (one guard per band instead of two)
    but leave ambiguous images to score and no train image of the band near them: a classifier
    could then not tell one band from the next (the demo's real-only accuracy fell to 0.44).
    The split is decided per coordinate, so every image at one position shares it.
    """
    target = _normalised(fractions)
    out = [""] * len(coords)
    for band in sorted(set(strata)):
        members = [i for i, t in enumerate(strata) if t == band]
        lo, hi = min(coords[i] for i in members), max(coords[i] for i in members)
        centre = (lo + hi) / 2 + random.Random(f"{seed}:{band}").uniform(-0.5, 0.5)  # breaks ties between sides
        members.sort(key=lambda i: (abs(coords[i] - centre), coords[i]))  # from the centre outward
        for i, split in zip(members, _runs([coords[i] for i in members], target, guard)):
            out[i] = split
    return _drop_near_held_out(coords, out, guard)  # also across band borders, e.g. after an all-held-out band


def _normalised(fractions: dict[str, float]) -> dict[str, float]:
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()) or not sum(fractions.values()):
        raise PipelineError(f"split fractions must give train, val and test (>= 0), got {fractions}")
    total = sum(fractions.values())
    return {k: v / total for k, v in fractions.items()}


def _runs(coords: list[float], target: dict[str, float], guard: float) -> list[str]:
    """val, test, guard ("") and train along ``coords``, which run from the held-out centre outward."""
    kept = len(coords)
    for _ in range(2):  # the second pass sizes the runs on the slices the guard leaves
        n_val = round(target["val"] * kept)
        n_held = n_val + round(target["test"] * kept)
        split_at: dict[float, str] = {}
        before, held = 0, []
        for c in coords:
            if c not in split_at:
                # every held-out split asked for gets at least one position, even in a small band
                if before < n_val or (target["val"] > 0 and "val" not in split_at.values()):
                    split = "val"
                elif before < n_held or (target["test"] > 0 and "test" not in split_at.values()):
                    split = "test"
                else:
                    split = "train"
                if split == "train" and any(abs(c - h) < guard for h in held):
                    split = ""
                held += [c] if split in ("val", "test") else []
                split_at[c] = split
            before += 1
        out = [split_at[c] for c in coords]
        kept = sum(1 for s in out if s)
    return out


def _drop_near_held_out(coords: list[float], splits: list[str], guard: float) -> list[str]:
    held = [c for c, s in zip(coords, splits) if s in ("val", "test")]
    return ["" if s == "train" and any(abs(c - h) < guard for h in held) else s for c, s in zip(coords, splits)]
