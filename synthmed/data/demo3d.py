"""The embedded 3-D demo: cubes cut from the MNI152 2009 T1 template (`ingest.dims: 3`, source demo).

Cube centres lie on a grid of ``step_mm`` anchored at the world origin (so a position's centre
does not depend on which other positions exist); a cube spans ``extent_mm`` per side and is
sampled at ``resolution`` voxels per side. Cubes with less brain than ``min_brain_fraction`` are
skipped. Each cube gets a small random intensity transform (gamma and scale) and a small elastic
deformation, both drawn from a seed derived from the global seed and the cube's position only:
a cube's bytes never depend on which other cubes are built.

Voxel order is RAS, as in `synthmed.data.volumes`: axis 0 is x (left -> right), 1 is y
(posterior -> anterior), 2 is z (inferior -> superior).

Captions give position and tissue composition; the label is the z band (inferior / middle /
superior tertiles of the kept centres). Cubes of one template overlap, so the demo splits itself:
per label, a compact blob of positions is held out (val nearest its anchor, then test) and train
cubes nearer than ``guard_mm`` to any held-out cube are dropped. The distance is the Chebyshev
(largest per-axis) distance between centres, taken to the nearer of the cube and its left-right
mirror image (the template is exactly symmetric, so a cube at -x is the flipped cube at +x).
Two axis-aligned cubes of side E whose centres are d >= guard apart along some axis share at most
a fraction 1 - guard / E of their voxels (before deformation): guard = E means no shared voxel.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
from scipy import ndimage

from synthmed.data.sample import Sample
from synthmed.data.splits import SPLITS, _normalised
from synthmed.core.io import sha256_bytes

BANDS = ("inferior", "middle", "superior")
CONTROL_POINTS = 4  # per axis, of the elastic displacement field before its cubic upsampling


def _load_template() -> dict[str, np.ndarray]:
    from synthmed.data.demo import _load_volumes

    t1, gm, wm, brain, affine = _load_volumes()
    # nilearn ships no CSF map: CSF is taken as brain mask minus grey minus white matter (ventricles,
    # sulci), clipped at 0.
    csf = np.clip(brain.astype(np.float64) - gm - wm, 0.0, 1.0)
    high = float(np.percentile(t1[brain], 99.5))
    return {"t1": t1 / high, "gm": gm, "wm": wm, "csf": csf, "brain": brain.astype(np.float64), "affine": affine}


def candidate_centres(brain: np.ndarray, affine: np.ndarray, *, extent_mm: float, step_mm: int,
                      min_brain_fraction: float) -> np.ndarray:
    """Grid centres (world mm, integers, sorted x, y, z) whose undeformed cube holds enough brain."""
    size = max(1, int(round(extent_mm / affine[0, 0])))
    fraction = ndimage.uniform_filter(brain.astype(np.float32), size=size, mode="constant")
    lo = affine[:3, 3]
    hi = lo + np.diag(affine)[:3] * (np.array(brain.shape) - 1)
    axes = [np.arange(np.ceil(a / step_mm) * step_mm, b + 1e-9, step_mm) for a, b in zip(lo, hi)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    index = np.rint((centres - lo) / np.diag(affine)[:3]).astype(int)
    keep = fraction[tuple(index.T)] >= min_brain_fraction
    return centres[keep].astype(int)


def cube_seed(seed: int, centre: tuple[int, int, int]) -> np.random.Generator:
    """The random stream of one cube: a function of the global seed and the position only."""
    digest = hashlib.sha256(f"demo3d:{seed}:{centre[0]}:{centre[1]}:{centre[2]}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render_cube(template: dict[str, np.ndarray], centre: tuple[int, int, int], *, seed: int, resolution: int,
                extent_mm: float, elastic_mm: float, intensity: float,
                smoothed: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """One cube: uint8 (R, R, R) in RAS order, and its tissue fractions (of the whole cube)."""
    rng = cube_seed(seed, centre)
    affine = template["affine"]
    spacing = extent_mm / resolution
    # voxel centres of the cube, world mm
    offsets = (np.arange(resolution) - (resolution - 1) / 2) * spacing
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"))  # (3, R, R, R)
    control = rng.uniform(-1.0, 1.0, size=(3, CONTROL_POINTS, CONTROL_POINTS, CONTROL_POINTS)) * elastic_mm
    w = _smooth_weights(resolution)
    # rows of w are convex weights, so no displacement exceeds elastic_mm
    field = np.einsum("ia,jb,kc,dabc->dijk", w, w, w, control, optimize=True)
    world = grid + field + np.asarray(centre, dtype=np.float64)[:, None, None, None]
    coords = (world - affine[:3, 3][:, None, None, None]) / np.diag(affine)[:3][:, None, None, None]
    t1 = ndimage.map_coordinates(template["t1"] if smoothed is None else smoothed, coords, order=1,
                                 mode="constant", cval=0.0)
    gamma = float(np.exp(rng.uniform(-intensity, intensity)))
    scale = 1.0 + float(rng.uniform(-intensity, intensity))
    pixels = np.clip(np.rint(scale * np.clip(t1, 0.0, None) ** gamma * 255.0), 0, 255).astype(np.uint8)
    box = _box(affine, centre, extent_mm)
    n = float(round(extent_mm / affine[0, 0]) ** 3)  # voxels outside the template count as background
    fractions = {k: float(template[k][box].sum()) / n for k in ("gm", "wm", "csf", "brain")}
    return pixels, fractions


def _smooth_weights(resolution: int) -> np.ndarray:
    """(R, CONTROL_POINTS) Gaussian interpolation weights, rows summing to 1: a smooth upsampling."""
    points = (np.arange(resolution) + 0.5) / resolution * CONTROL_POINTS - 0.5  # in control-point units
    w = np.exp(-0.5 * (points[:, None] - np.arange(CONTROL_POINTS)[None]) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _box(affine: np.ndarray, centre: tuple[int, int, int], extent_mm: float) -> tuple[slice, ...]:
    """Index box of the undeformed cube, clipped to the template."""
    lo = np.rint((np.asarray(centre) - extent_mm / 2 - affine[:3, 3]) / np.diag(affine)[:3]).astype(int)
    size = int(round(extent_mm / affine[0, 0]))
    return tuple(slice(max(a, 0), max(a + size, 0)) for a in lo)


def smoothed_t1(template: dict[str, np.ndarray], resolution: int, extent_mm: float) -> np.ndarray:
    """The T1 pre-smoothed against aliasing when the cube's voxels are coarser than the template's."""
    factor = extent_mm / resolution / template["affine"][0, 0]
    if factor <= 1:
        return template["t1"]
    return ndimage.gaussian_filter(template["t1"], sigma=(factor - 1) / 2)


def mirror_chebyshev(centres: np.ndarray) -> np.ndarray:
    """Pairwise distance: the largest per-axis difference, to the nearer of a cube and its x-mirror."""
    c = centres.astype(np.float64)
    m = c * np.array([-1.0, 1.0, 1.0])
    return np.minimum(np.abs(c[:, None] - c[None]).max(axis=2), np.abs(c[:, None] - m[None]).max(axis=2))


def guarded_splits(centres: np.ndarray, labels: list[str], fractions: dict[str, float], guard_mm: float,
                   seed: int) -> list[str]:
    """val / test / train per centre, "" for train cubes dropped as guard.

    Per label (in sorted order), the held-out cubes are the ones nearest (Euclidean) an anchor
    position: val first, then test; the anchor is the label member whose blob costs the fewest
    guard drops (ties broken by a seeded order), given the blobs already placed. Blobs are sized on
    the cubes the guard leaves (two passes), so the shares follow ``fractions`` per label.
    Finally every train cube nearer than ``guard_mm`` to any held-out cube is dropped.
    """
    target = _normalised(fractions)
    distance = mirror_chebyshev(centres)
    near = distance < guard_mm
    n = len(centres)
    held = np.zeros(n, dtype=bool)
    out = ["train"] * n
    labels_arr = np.asarray(labels)
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels_arr == label)
        order_seed = random.Random(f"{seed}:{label}").sample(range(len(members)), len(members))
        kept = len(members)
        for _ in range(2):  # the second pass sizes the blob on what the guard leaves
            n_val = round(target["val"] * kept)
            n_held = n_val + round(target["test"] * kept)
            if target["val"] > 0:
                n_val = max(n_val, 1)
            if target["test"] > 0:
                n_held = max(n_held, n_val + 1)
            n_held = min(n_held, len(members))
            best = None
            for rank in order_seed:
                anchor = centres[members[rank]]
                d = np.linalg.norm(centres[members] - anchor, axis=1)
                order = members[np.lexsort((*centres[members].T[::-1], d))]
                blob = held.copy()
                blob[order[:n_held]] = True
                dropped = int((near[blob].any(axis=0) & ~blob).sum()) if blob.any() else 0
                if best is None or dropped < best[0]:
                    best = (dropped, order)
            order = best[1]
            blob = held.copy()
            blob[order[:n_held]] = True
            lost = near[blob].any(axis=0) & ~blob if blob.any() else np.zeros(n, dtype=bool)
            kept = len(members) - int(lost[members].sum())
        for k, i in enumerate(order[:n_held]):
            out[i] = "val" if k < n_val else "test"
        held[order[:n_held]] = True
    if held.any():
        drop = near[held].any(axis=0) & ~held
        out = ["" if d else s for s, d in zip(out, drop)]
    assert set(out) <= {*SPLITS, ""}
    return out


def _raw_cube(template: dict[str, np.ndarray], centre: tuple[int, int, int], extent_mm: float) -> np.ndarray:
    """The template's voxels under the undeformed cube (its provenance hash)."""
    return np.ascontiguousarray(template["t1"][_box(template["affine"], centre, extent_mm)], dtype=np.float32)


def _side(x: int) -> str:
    return "left" if x < 0 else "right" if x > 0 else "midline"


def _lobe(y: int) -> str:
    # coarse MNI y bands; "posterior"/"central"/"frontal" is a position, not an atlas lobe
    return "frontal" if y >= 10 else "central" if y >= -40 else "posterior"


def demo3d_samples(*, resolution: int, extent_mm: float, step_mm: int, guard_mm: float, elastic_mm: float,
                   intensity: float, min_brain_fraction: float, split_fractions: dict[str, float],
                   seed: int) -> tuple[list[Sample], int]:
    """The 3-D demo's samples, split, and the number of cubes dropped as guard between train and held-out."""
    template = _load_template()
    centres = candidate_centres(template["brain"] > 0.5, template["affine"], extent_mm=extent_mm,
                                step_mm=step_mm, min_brain_fraction=min_brain_fraction)
    if not len(centres):
        return [], 0
    z = centres[:, 2]
    lo, hi = int(z.min()), int(z.max())
    edges = (lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3)  # tertiles of the kept extent: every band has members
    bands = [BANDS[0] if v < edges[0] else BANDS[1] if v < edges[1] else BANDS[2] for v in z]
    splits = guarded_splits(centres, bands, split_fractions, guard_mm, seed)
    smoothed = smoothed_t1(template, resolution, extent_mm)
    samples = []
    for centre, band, split in zip(centres, bands, splits):
        if not split:
            continue
        x, y, zc = (int(v) for v in centre)
        pixels, f = render_cube(template, (x, y, zc), seed=seed, resolution=resolution, extent_mm=extent_mm,
                                elastic_mm=elastic_mm, intensity=intensity, smoothed=smoothed)
        side = _side(x)
        where = f"{band} {side} {_lobe(y)}" if side != "midline" else f"{band} midline {_lobe(y)}"
        caption = (f"T1-weighted brain MRI sub-volume, {where}, {100 * f['gm']:.0f}% grey matter, "
                   f"{100 * f['wm']:.0f}% white matter, {100 * f['csf']:.0f}% CSF")
        name = f"cube_x{x:+04d}_y{y:+04d}_z{zc:+04d}"
        samples.append(Sample(
            file_name=f"{name}.npy",
            pixels=pixels,
            captions=[caption],
            group=name,  # a position; the guard keeps overlapping (and mirrored) cubes out of train
            label=band,
            split=split,
            source=f"nilearn:MNI152_2009_T1[centre_mm=({x},{y},{zc}),extent_mm={extent_mm:g}]",
            source_sha256=sha256_bytes(_raw_cube(template, (x, y, zc), extent_mm).tobytes()),
        ))
    return samples, splits.count("")
