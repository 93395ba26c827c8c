"""The embedded demo dataset: 2-D slices of the MNI152 2009 T1 template.

nilearn ships the template and its grey/white-matter probability maps, so the
demo needs no download. Each slice gets a caption from its plane, position in
mm and tissue composition, a label (plane x position band), a group (its
position: a sagittal slice and its mirror image share one) and a split. Each slice
carries its tissue mask (0 background, 1 CSF, 2 grey, 3 white matter: segment.classes) for the zero-shot
segmentation scores. The demo
splits itself: every slice comes from one volume, so the split is contiguous runs
per band with a guard gap to train (see ``splits.contiguous_splits``).
"""

from __future__ import annotations

import warnings

import numpy as np

from synthmed.data.sample import Sample
from synthmed.data.splits import contiguous_splits
from synthmed.data.transforms import prepare, to_uint8
from synthmed.core.io import sha256_bytes

# axis of the volume, world-coordinate name, band names from low to high band coordinate.
# The 2009 template is left-right symmetric, so sagittal slices at -x and +x are
# identical images: their band and group use |x| (laterality stays in the caption).
PLANES = {
    "sagittal": (0, "x", ("medial", "intermediate", "lateral")),
    "coronal": (1, "y", ("posterior", "central", "anterior")),
    "axial": (2, "z", ("inferior", "middle", "superior")),
}


def _load_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1)
        wm = datasets.load_mni152_wm_template(resolution=1)
        mask = datasets.load_mni152_brain_mask(resolution=1)
    return t1.get_fdata(), gm.get_fdata(), wm.get_fdata(), mask.get_fdata() > 0.5, t1.affine


def _slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """All slices along ``axis``, each with superior (or anterior) at the top of the image."""
    return np.ascontiguousarray(np.rot90(np.moveaxis(volume, axis, 0), axes=(1, 2)))


def tissue_labels(brain: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """uint8 (0..255) brain mask and grey/white-matter probabilities, resampled as the image -> class indices:
    outside the brain mask background (0), inside it the likeliest of CSF (1; what grey and white matter leave),
    grey (2) and white matter (3)."""
    g, w = gm / 255.0, wm / 255.0
    tissue = 1 + np.stack([np.clip(1 - g - w, 0, 1), g, w]).argmax(0)
    return np.where(brain >= 128, tissue, 0).astype(np.uint8)


def _band(position: float, edges: tuple[float, float], names: tuple[str, str, str]) -> str:
    return names[0] if position < edges[0] else names[1] if position < edges[1] else names[2]


def demo_samples(
    *,
    resolution: int,
    slice_step_mm: int,
    guard_mm: float,
    min_brain_fraction: float,
    split_fractions: dict[str, float],
    seed: int,
    planes: list[str] | None = None,
) -> tuple[list[Sample], int]:
    """The demo's samples, split, and the number of slices dropped as guard between train and held-out."""
    t1, gm, wm, brain, affine = _load_volumes()
    high = float(np.percentile(t1[brain], 99.5))
    samples: list[Sample] = []
    dropped = 0
    for plane in planes or list(PLANES):
        axis, coord, band_names = PLANES[plane]
        t1_s, gm_s, wm_s, brain_s = (_slices(v, axis) for v in (t1, gm, wm, brain))
        # Crop every slice of the plane to the brain's extent (+4 mm) so it fills the frame.
        rows, cols = np.nonzero(brain_s.any(axis=0))
        box = (slice(max(rows.min() - 4, 0), rows.max() + 5), slice(max(cols.min() - 4, 0), cols.max() + 5))
        # near-empty slices at the edge of the head are skipped
        kept = [i for i in range(0, len(t1_s), slice_step_mm) if brain_s[i].mean() >= min_brain_fraction]
        positions = [float(affine[axis, axis] * i + affine[axis, 3]) for i in kept]
        if not positions:
            continue
        band_coord = [abs(p) for p in positions] if plane == "sagittal" else positions
        # Bands are tertiles of the kept extent, so every class has members.
        lo, hi = min(band_coord), max(band_coord)
        edges = (lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3)
        bands = [_band(bc, edges, band_names) for bc in band_coord]
        splits = contiguous_splits(band_coord, bands, split_fractions, guard_mm, seed)
        dropped += splits.count("")
        for index, pos, bc, band, split in zip(kept, positions, band_coord, bands, splits):
            if not split:
                continue
            mask = brain_s[index]
            n = max(int(mask.sum()), 1)
            gm_frac = float(gm_s[index][mask].sum()) / n
            wm_frac = float(wm_s[index][mask].sum()) / n
            side = ("left " if pos < 0 else "right " if pos > 0 else "") if plane == "sagittal" else ""
            caption = (
                f"{band.capitalize()} {side}{plane} T1-weighted brain MRI slice at {coord} = {pos:+.0f} mm; "
                f"{100 * gm_frac:.0f}% grey matter, {100 * wm_frac:.0f}% white matter"
            )
            pixels = prepare(to_uint8(t1_s[index][box], 0.0, high), resolution)
            tissue = tissue_labels(*(prepare(to_uint8(v[index][box], 0.0, 1.0), resolution) for v in (brain_s, gm_s, wm_s)))
            raw = t1_s[index].astype(np.float32).tobytes()
            samples.append(
                Sample(
                    file_name=f"{plane}_{coord}{pos:+04.0f}.png",
                    pixels=pixels,
                    captions=[caption],
                    group=f"{plane}-{coord}{bc:+04.0f}",  # |x| for sagittal: mirror images are one group
                    label=f"{plane}_{band}",
                    split=split,
                    source=f"nilearn:MNI152_2009_T1[{plane}={index}]",
                    source_sha256=sha256_bytes(raw),
                    mask=tissue,
                )
            )
    return samples, dropped
