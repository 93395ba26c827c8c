"""Is the memorization audit calibrated, and does it catch copies? Prints JSON.

Real images: the demo's MNI152 slices (every slice at 1 mm, 64 px), embedded once with EfficientNet-Lite0.
Each of ``--splits`` random splits puts the slices of each plane into train and held-out the way the demo does
(contiguous held-out runs, train slices nearer than ``--guard-mm`` to a held-out slice dropped; ``--no-guard``:
random positions, no guard) and halves the held-out positions at random into the reference and an honest
"synthetic" set: real images the generator never saw, which the audit should flag at its expected rate
k / (m + 1). Copies of the train images, shifted, mirrored, noised and blurred, show what it catches.
Per space (feature, pixel; pixel also with the mirror search, `evaluate.privacy.mirror`):

- ``honest_flag_rate``: the share of honest images below the threshold over all splits, beside
  ``expected_rate`` (the mean of k / (m + 1)); ``gate_fired``: the share of splits where the gate's exact test
  (beta-binomial) fires at ``--level`` on the honest set alone, beside what a binomial test against
  k / (m + 1) (which ignores the threshold's own spread) and the old rule (the 1st percentile of the
  reference, np.percentile) would give;
- ``catch_rate``: per kind of copy, the share below the threshold.

    .venv/bin/python benchmarks/memorization_calibration.py [--splits 300] [--alpha 0.05] [--level 0.01]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from synthmed.metrics.privacy import PixelSpace, audit, copy_test, threshold

COPIES = ("shift", "mirror", "noise", "blur")


def copies_of(images: torch.Tensor, seed: int, shift: int = 2, noise: float = 0.05, blur: float = 1.0) -> dict:
    """uint8 copies [N, C, H, W]: shifted ``shift`` px right and down (zero fill), mirrored left-right, Gaussian
    noise of sd ``noise`` (intensity range 1), Gaussian blur of sd ``blur`` px."""
    g = torch.Generator().manual_seed(seed)
    x = images.float()
    shifted = F.pad(x, (shift, 0, shift, 0))[..., : x.shape[-2], : x.shape[-1]]
    noised = x + torch.randn(x.shape, generator=g) * noise * 255
    r = int(3 * blur + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * blur**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    blurred = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    blurred = F.conv2d(F.pad(blurred, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    u8 = lambda t: t.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return {"shift": u8(shifted), "mirror": images.flip(-1), "noise": u8(noised), "blur": u8(blurred)}


def guarded_split(coords: np.ndarray, planes: np.ndarray, rng: np.random.Generator, held_out: float = 0.3,
                  runs: int = 3, guard: float = 6.0) -> np.ndarray:
    """Per plane, ``runs`` contiguous held-out runs at random places ("held") covering about ``held_out`` of
    its positions; train ("train") the positions at least ``guard`` from every held-out one; "" dropped."""
    out = np.full(len(coords), "", dtype=object)
    for plane in np.unique(planes):
        at = planes == plane
        values = np.unique(coords[at])
        length = max(1, round(held_out * len(values) / runs))
        held = set()
        for start in rng.integers(0, len(values) - length + 1, size=runs):
            held.update(values[start : start + length])
        held = np.array(sorted(held))
        gap = np.abs(coords[at][:, None] - held[None]).min(1)
        out[np.flatnonzero(at)] = np.where(gap == 0, "held", np.where(gap >= guard, "train", ""))
    return out


def random_split(coords: np.ndarray, planes: np.ndarray, rng: np.random.Generator, held_out: float = 0.3) -> np.ndarray:
    """Positions (the leakage groups) held out at random, no guard."""
    keys = np.array([f"{p}{c}" for p, c in zip(planes, coords)])
    groups = np.unique(keys)
    held = set(rng.choice(groups, size=round(held_out * len(groups)), replace=False))
    return np.array(["held" if k in held else "train" for k in keys], dtype=object)


def distances(images: torch.Tensor, feats: dict | None, resolution: int = 64) -> dict:
    """Per space, [queries, N] distances from every image and every copy (rows: "image" then COPIES, N each)
    to every image; "pixel_mirror" the nearer of each query and its mirror image. Splits then only pick
    columns: the audit's figures without a search per split (`check_against_audit` shows they agree)."""
    copies = copies_of(images, 0)
    queries = torch.cat([images, *(copies[c] for c in COPIES)])
    px = lambda x, mirror=False: PixelSpace(x, resolution, mirror)[:].double()  # noqa: E731
    out = {"pixel": torch.cdist(px(queries), px(images))}
    out["pixel_mirror"] = torch.minimum(out["pixel"], torch.cdist(px(queries, True), px(images)))
    if feats:
        out["feature"] = torch.cdist(torch.cat([feats["image"], *(feats[c] for c in COPIES)]).double(),
                                     feats["image"].double())
    return {k: v.numpy() for k, v in out.items()}


def simulate(dist: dict, coords: np.ndarray, planes: np.ndarray, splits: int, seed: int, alpha: float = 0.05,
             level: float = 0.01, guard: float | None = 6.0) -> dict:
    """The calibration and catch figures over ``splits`` random splits, from `distances` (spaces: its keys;
    "either": below in feature or pixel_mirror space, as the audit's `flagged` column, when both are there).
    Copies: of every train image of the split."""
    rng = np.random.default_rng(seed)
    n_img = next(iter(dist.values())).shape[1]
    names = list(dist) + (["either"] if {"feature", "pixel_mirror"} <= set(dist) else [])
    honest = {s: [0, 0] for s in names}
    caught = {s: {c: [0, 0] for c in COPIES} for s in names}
    fired = {s: {"exact": 0, "binomial": 0, "old_p1": 0.0} for s in names}
    ms = []
    keys = np.array([f"{p}{c}" for p, c in zip(planes, coords)])
    for _ in range(splits):
        split = guarded_split(coords, planes, rng, guard=guard) if guard else random_split(coords, planes, rng)
        held = np.flatnonzero(split == "held")
        groups = np.unique(keys[held])  # halved by group: the demo's mirror-image sagittal twins stay together
        ref_groups = rng.choice(groups, size=len(groups) // 2, replace=False)
        in_ref = np.isin(keys[held], ref_groups)
        ref, fresh = held[in_ref], held[~in_ref]
        train = np.flatnonzero(split == "train")
        m, n = len(ref), len(fresh)
        ms.append(m)
        below = {}
        for s, d in dist.items():
            nn = d[:, train].min(1)
            cut, k = threshold(nn[ref], alpha)
            below[s] = (nn < cut, k)
            fired[s]["old_p1"] += float((nn[fresh] < np.percentile(nn[ref], 1)).mean()) / splits
        if "either" in names:
            below["either"] = (below["feature"][0] | below["pixel_mirror"][0], None)
        for s, (b, k) in below.items():
            x = int(b[fresh].sum())
            honest[s][0] += x
            honest[s][1] += n
            for j, c in enumerate(COPIES, 1):
                caught[s][c][0] += int(b[j * n_img + train].sum())
                caught[s][c][1] += len(train)
            if k is not None:
                fired[s]["exact"] += copy_test(x, n, k, m) < level
                fired[s]["binomial"] += bool(stats.binom.sf(x - 1, n, k / (m + 1)) < level) if x else 0
    expected = float(np.mean([max(1, np.floor(alpha * (m + 1) + 1e-9)) / (m + 1) for m in ms]))
    out = {"splits": splits, "alpha": alpha, "level": level, "guard_mm": guard, "reference_m_mean": float(np.mean(ms)),
           "honest_per_split_mean": honest[names[0]][1] / splits, "expected_rate": expected, "spaces": {}}
    for s in names:
        out["spaces"][s] = {"honest_flag_rate": honest[s][0] / honest[s][1],
                            "catch_rate": {c: caught[s][c][0] / caught[s][c][1] for c in COPIES}}
        if s != "either":
            out["spaces"][s].update({"gate_fired_exact": fired[s]["exact"] / splits,
                                     "gate_fired_binomial_at_expected": fired[s]["binomial"] / splits,
                                     "old_p1_rule_flag_rate": fired[s]["old_p1"]})
    return out


def check_against_audit(images: torch.Tensor, feats: dict | None, dist: dict, coords, planes, seed: int,
                        alpha: float, resolution: int = 64) -> float:
    """Largest gap between `distances`' nearest-train distances and audit()'s on one split (both spaces, the
    pixel one with the mirror search)."""
    split = guarded_split(coords, planes, np.random.default_rng(seed))
    train, held = np.flatnonzero(split == "train"), np.flatnonzero(split == "held")
    space = lambda i: PixelSpace(images[i], resolution)  # noqa: E731
    spaces = {"pixel_mirror": (space(held), space(train), space(held))}
    mirrors = {"pixel_mirror": (space(held).mirrored(), space(held).mirrored())}
    if feats:
        spaces["feature"] = (feats["image"][held], feats["image"][train], feats["image"][held])
    table, _ = audit(spaces, alpha=alpha, mirrors=mirrors)
    return max(float(np.abs(table[f"nn_distance_{s}"].to_numpy() - dist[s][held][:, train].min(1)).max())
               for s in spaces)


def demo_images() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every demo slice (1 mm apart, no guard dropped) as uint8 [N, 1, 64, 64], its position (|x| for sagittal,
    whose mirror images are one group) and plane."""
    from synthmed.data.demo import demo_samples

    samples, _ = demo_samples(resolution=64, slice_step_mm=1, guard_mm=0, min_brain_fraction=0.08,
                              split_fractions={"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    planes = np.array([s.file_name.split("_")[0] for s in samples])
    coords = np.array([abs(float(s.file_name.split("_")[1][1:-4])) if p == "sagittal" else
                       float(s.file_name.split("_")[1][1:-4]) for s, p in zip(samples, planes)])
    images = torch.from_numpy(np.stack([s.array() for s in samples]))[:, None]
    return images, coords, planes


def embed(images: torch.Tensor) -> dict:
    """EfficientNet-Lite0 features of the images and of each kind of copy, cached in the local store (the
    pipeline's extractor; minutes on 2 busy cores)."""
    from synthmed.core import store
    from synthmed.core.io import sha256_bytes
    from synthmed.metrics.features import load_effnet_lite0
    from synthmed.metrics.fidelity import extract_features

    path = store.cache_dir("benchmarks") / f"memorization_calibration_{sha256_bytes(images.numpy().tobytes())[:16]}.pt"
    if path.exists():
        return torch.load(path)
    model = load_effnet_lite0()
    with torch.no_grad():
        out = {kind: extract_features(model, x).float() for kind, x in {"image": images, **copies_of(images, 0)}.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--level", type=float, default=0.01)
    ap.add_argument("--guard-mm", type=float, default=6.0)
    ap.add_argument("--no-guard", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pixel-resolution", type=int, default=64)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    images, coords, planes = demo_images()
    feats = embed(images)
    t_embed = time.perf_counter() - t0
    dist = distances(images, feats, args.pixel_resolution)
    result = simulate(dist, coords, planes, args.splits, args.seed, args.alpha, args.level,
                      None if args.no_guard else args.guard_mm)
    result.update({"images": len(images), "pixel_resolution": args.pixel_resolution,
                   "max_gap_to_audit": check_against_audit(images, feats, dist, coords, planes, args.seed, args.alpha,
                                                           args.pixel_resolution),
                   "seconds_embedding": round(t_embed, 1), "seconds_total": round(time.perf_counter() - t0, 1),
                   "threads": torch.get_num_threads()})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
