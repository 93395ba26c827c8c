"""Segments against real masks: Hungarian matching, Dice per class and for the whole foreground, the two
training-free intensity baselines (multi-level Otsu, k-means), and bootstrap intervals over images.

A label map's segments carry no class: each image's segments are matched one-to-one to the mask's classes
by the assignment that maximises the pixels they share (Hungarian, scipy's linear_sum_assignment). A segment
left without a class scores as no class (fragmentation costs Dice); a class left without a segment scores 0
where the mask has it. Dice of a class absent from both the mask and the matched prediction is undefined
(NaN, left out of the means).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from synthmed.metrics.stats import bootstrap_ci

UNMATCHED = -1


def overlap(segments: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """[K, n_classes] pixel counts shared by segment k and class c."""
    k = int(segments.max()) + 1
    return np.bincount(segments.ravel() * n_classes + truth.ravel(), minlength=k * n_classes).reshape(k, n_classes)


def match_segments(segments: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """The segments relabelled with their matched class (UNMATCHED for a segment without one)."""
    shared = overlap(segments, truth, n_classes)
    rows, cols = linear_sum_assignment(-shared)
    to_class = np.full(len(shared), UNMATCHED)
    to_class[rows] = cols
    return to_class[segments]


def dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice per class (NaN where the class is in neither) of class maps of the same shape."""
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        p, t = pred == c, truth == c
        total = p.sum() + t.sum()
        if total:
            out[c] = 2 * (p & t).sum() / total
    return out


def foreground_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of everything but class 0 (the background; on the demo, the brain mask)."""
    p, t = pred > 0, truth > 0
    total = p.sum() + t.sum()
    return float(2 * (p & t).sum() / total) if total else float("nan")


def otsu_thresholds(values: np.ndarray, classes: int, bins: int = 64) -> np.ndarray:
    """The ``classes - 1`` thresholds that maximise the between-class variance of ``values`` (multi-level
    Otsu, exhaustive over a ``bins``-bin histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w, m = np.concatenate([[0], np.cumsum(hist)]), np.concatenate([[0], np.cumsum(hist * centres)])
    best, best_cuts = -1.0, ()
    for cuts in itertools.combinations(range(1, bins), classes - 1):
        bounds = (0, *cuts, bins)
        score = 0.0
        for a, b in zip(bounds, bounds[1:]):
            n = w[b] - w[a]
            if n:
                score += (m[b] - m[a]) ** 2 / n
        if score > best:
            best, best_cuts = score, cuts
    return edges[list(best_cuts)]


def otsu_segments(image: np.ndarray, classes: int) -> np.ndarray:
    return np.digitize(image, otsu_thresholds(image.ravel(), classes)).astype(np.int64)


def kmeans_segments(image: np.ndarray, classes: int, seed: int, inits: int = 4, iterations: int = 100) -> np.ndarray:
    """k-means (Lloyd, k-means++ starts, the best of ``inits``) on each pixel's intensity and the mean of its 3x3
    neighbourhood: unlike Otsu (the exact optimum of k-means on intensity alone) it sees a little texture.
    Labels run dark to bright."""
    from scipy.ndimage import uniform_filter

    img = image.astype(np.float64)
    x = np.stack([img.ravel(), uniform_filter(img, 3, mode="nearest").ravel()], 1)
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(inits):
        centres = x[[rng.integers(len(x))]]
        for _ in range(classes - 1):  # k-means++: far from the centres so far, by squared distance
            d = ((x[:, None] - centres[None]) ** 2).sum(-1).min(1)
            centres = np.vstack([centres, x[rng.choice(len(x), p=d / d.sum()) if d.sum() else rng.integers(len(x))]])
        for _ in range(iterations):
            nearest = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[nearest == k].mean(0) if (nearest == k).any() else centres[k] for k in range(classes)])
            if np.allclose(new, centres):
                break
            centres = new
        cost = ((x - centres[nearest]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = (nearest, centres), cost
    nearest, centres = best
    order = np.argsort(np.argsort(centres[:, 0]))
    return order[nearest].reshape(image.shape)


def score_image(segments: np.ndarray, truth: np.ndarray, classes: list[str]) -> tuple[dict, np.ndarray]:
    """One image's segments against its mask: (segments, Dice per class, their mean over all but the background,
    foreground Dice) and the matched class map."""
    matched = match_segments(segments, truth, len(classes))
    per_class = dice(matched, truth, len(classes))
    tissue = per_class[1:][np.isfinite(per_class[1:])]
    return ({"segments": int(segments.max()) + 1, **{f"dice_{c}": d for c, d in zip(classes, per_class)},
             "dice_mean": float(tissue.mean()) if len(tissue) else np.nan,
             "dice_foreground": foreground_dice(matched, truth)}, matched)


def summarise(table: pd.DataFrame, classes: list[str], resamples: int, seed: int) -> dict[str, float]:
    """Per method (the attention's figures as seg_*, a baseline's as seg_<method>_*): segments per image and each
    Dice as the mean over images with its bootstrap interval; a Dice no image has (a class in no mask and no
    prediction) is left out."""
    metrics = {}
    for method, sub in table.groupby("method", sort=False):
        prefix = "seg" if method == "attention" else f"seg_{method}"
        metrics[f"{prefix}_segments_mean"] = float(sub["segments"].mean())
        for col in ["dice_mean", *[f"dice_{c}" for c in classes[1:]], "dice_foreground"]:
            mean, low, high = bootstrap_ci(sub[col], resamples, seed + len(metrics))
            if np.isfinite(mean):
                metrics.update({f"{prefix}_{col}": mean, f"{prefix}_{col}_ci_low": low, f"{prefix}_{col}_ci_high": high})
    return metrics


__all__ = ["UNMATCHED", "dice", "foreground_dice", "kmeans_segments", "match_segments",
           "otsu_segments", "otsu_thresholds", "overlap", "score_image", "summarise"]
