"""Memorization audit: is any synthetic image a near copy of a training image?

For each synthetic image, the distance to its nearest real-train neighbour, in feature space and in pixel
space. The reference is the same distance from every held-out real image (all real images that are not train:
val and test) to the training set: images the generator never saw. As Dar et al. (Nature BME 2025) do, a
synthetic image is flagged when it is nearer to train than the reference's low tail, calibrated as a conformal
order statistic: with m reference distances and a nominal false-positive rate alpha, the threshold is the k-th
smallest, k = floor(alpha (m + 1)). An image exchangeable with the held-out ones (what a generator that does
not copy draws) falls below it with probability exactly k / (m + 1) <= alpha: the expected rate reported beside
the share. Across synthetic images that rate is shared through the one threshold, so the count below follows a
beta-binomial law (k, m + 1 - k) under "no copies": the gate's exact one-sided test. With too few held-out
images for alpha (k = 0) the smallest reference distance is the threshold, at the rate 1 / (m + 1) reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from synthmed.core.config import require_non_negative
from synthmed.core.runtime import pick_device


@dataclass
class PrivacyParams:
    """evaluate.privacy: the memorization audit's threshold, its gate and pixel-space resolution."""
    fail_on_violation: bool  # stop the stage when significantly more synthetic images than expected fall below
    alpha: float  # nominal false-positive rate: the threshold is the k-th smallest held-out distance, k = floor(alpha (m + 1))
    gate_level: float  # the gate's one-sided test level (beta-binomial, Bonferroni over the spaces)
    max_excess: float  # the gate also needs the share to exceed the expected rate by more than this
    mirror: bool  # pixel space: each image's distance is its own or its mirror image's, the nearer (flipped copies)
    pixel_resolution: int  # pixel-space distances at this side (area-averaged down from larger images); 0 = native

    def __post_init__(self):
        require_non_negative(self, "pixel_resolution", "max_excess")
        if not 0 < self.alpha < 1 or not 0 < self.gate_level < 1:
            raise ValueError(f"evaluate.privacy: alpha and gate_level must lie in (0, 1), got {self.alpha}, "
                             f"{self.gate_level}")


CHUNK = 512  # query rows of one distance block
REFERENCE_BYTES = 2**28  # float32 reference rows held at once (at least CHUNK): each query chunk is read once per
# such block, so the slow side of a pixel-space search (reading and pooling images) is read a few times, not once
# per 512 reference rows; memory is O(REFERENCE_BYTES + CHUNK x rows), whatever the set sizes


def nearest(query, reference, chunk: int = CHUNK, exclude: np.ndarray | None = None,
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, each query row's nearest reference row; ``exclude`` [n_query, k]
    lists reference rows that do not count for each query row (-1 = none). Both sides are anything sliceable
    into row tensors (a tensor, a `PixelSpace`), read ``chunk`` rows at a time: float32 blocks of
    |q|^2 + |r|^2 - 2 q.r on rows centred on the reference's mean (which keeps the cancellation small) pick
    the neighbour, whose distance is then computed directly. Reference rows are taken REFERENCE_BYTES at a time
    (``chunk`` rows at the least). The blocks are computed on ``device`` (default:
    the accelerator when there is one); the results come back to the CPU."""
    device = device or pick_device()
    centre = row_mean(reference, chunk).to(device)
    best_d = torch.full((len(query),), float("inf"))
    best_i = torch.zeros(len(query), dtype=torch.long)
    block = max(chunk, REFERENCE_BYTES // (4 * centre.numel()))
    for j in range(0, len(reference), block):
        r = rows_of(reference, j, block).to(device) - centre  # (not in place: the rows may be the caller's)
        r2 = r.pow(2).sum(1)
        for i in range(0, len(query), chunk):
            q = rows_of(query, i, chunk).to(device) - centre
            d2 = (q.pow(2).sum(1, keepdim=True) + r2 - 2 * q @ r.T).clamp_min_(0)
            if exclude is not None:
                e = exclude[i : i + chunk] - j
                hit_rows, hit_cols = np.nonzero((e >= 0) & (e < len(r)) & (exclude[i : i + chunk] >= 0))
                d2[hit_rows, e[hit_rows, hit_cols]] = float("inf")
            values, indices = (t.cpu() for t in d2.min(dim=1))
            better = values < best_d[i : i + chunk]
            best_d[i : i + chunk][better] = values[better]
            best_i[i : i + chunk][better] = indices[better] + j
    for i in range(0, len(query), chunk):  # the winners' distances exactly (the expansion rounds a copy's 0 up)
        q, r = rows_of(query, i, chunk), reference[best_i[i : i + chunk]].flatten(1).float()
        best_d[i : i + chunk] = (q - r).norm(dim=1)
    return best_d, best_i


def rows_of(x, start: int, n: int) -> torch.Tensor:
    """Rows start .. start + n of ``x`` as float32 [n, dims], read CHUNK rows at a time (a `PixelSpace` row is
    larger before it is pooled)."""
    n = min(n, len(x) - start)
    if n <= CHUNK:
        return x[start : start + n].flatten(1).float()
    first = x[start : start + CHUNK].flatten(1).float()
    out = first.new_empty((n, first.shape[1]))
    out[:CHUNK] = first
    for k in range(CHUNK, n, CHUNK):
        out[k : k + CHUNK] = x[start + k : start + min(k + CHUNK, n)].flatten(1)
    return out


def row_mean(x, chunk: int) -> torch.Tensor:
    total = None
    for i in range(0, len(x), chunk):
        part = rows_of(x, i, chunk).double().sum(0)
        total = part if total is None else total + part
    return (total / max(len(x), 1)).float()


class PixelSpace:
    """Images as pixel-space rows, intensities in [0, 1] at ``resolution`` (area-averaged down when the images
    are larger; 0 = as they are), converted only for the rows asked for (distance ~ sqrt(#pixels) x RMS
    difference); ``mirror``: each image flipped left-right first (`mirrored()`)."""

    def __init__(self, images_uint8, resolution: int = 0, mirror: bool = False):
        self.images, self.resolution, self.mirror = images_uint8, resolution, mirror

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> torch.Tensor:
        images, side = self.images[index], self.side
        rows = []
        for piece in images.split(max(1, 2**23 // max(images[0].numel(), 1))):  # float copies of 8 M pixels at most
            x = piece.float().div_(255.0)
            if self.mirror:
                x = x.flip(-1)
            if side < x.shape[-1]:
                x = F.adaptive_avg_pool3d(x, side) if x.ndim == 5 else F.adaptive_avg_pool2d(x, side)
            rows.append(x.flatten(1))
        return torch.cat(rows) if rows else images.flatten(1).float()

    @property
    def side(self) -> int:
        side = self.images.shape[-1]
        return min(side, self.resolution) if self.resolution else side

    def mirrored(self) -> "PixelSpace":
        return PixelSpace(self.images, self.resolution, not self.mirror)


def threshold(reference: np.ndarray, alpha: float) -> tuple[float, int]:
    """The audit's threshold: the k-th smallest of the m reference distances, k = floor(alpha (m + 1)), and k.
    A fresh distance exchangeable with the reference falls strictly below it with probability k / (m + 1) (at
    most that with ties). With m < 1 / alpha - 1 (k = 0) the smallest is taken: rate 1 / (m + 1) > alpha."""
    m = len(reference)
    if m == 0:
        raise ValueError("the memorization audit needs held-out real images (val, test) as its reference; none given")
    k = max(1, math.floor(alpha * (m + 1) + 1e-9))
    return float(np.partition(np.asarray(reference, dtype=np.float64), k - 1)[k - 1]), k


def binomial_interval(x: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Jeffreys interval of the rate behind x successes in n trials (the Beta(x + 1/2, n - x + 1/2) quantiles). Its
    coverage stays near the level at the small rates the audit sees (benchmarks/coverage.py: 0.96, 0.95, 0.94 at
    n = 46, 200, 1,000), where the exact Clopper-Pearson interval covers 0.99 and 0.97: wider than it says."""
    a = (1 - level) / 2
    low = stats.beta.ppf(a, x + 0.5, n - x + 0.5) if x > 0 else 0.0
    high = stats.beta.ppf(1 - a, x + 0.5, n - x + 0.5) if x < n else 1.0
    return float(low), float(high)


def copy_test(x: int, n: int, k: int, m: int) -> float:
    """One-sided p-value of x or more of n synthetic images below the k-th smallest of m reference distances
    when they are exchangeable with the reference (no copies): beta-binomial (n, k, m + 1 - k), exact, the
    threshold's own spread included (a binomial test at k / (m + 1) would ignore it and fire too often)."""
    return float(stats.betabinom.sf(x - 1, n, k, m + 1 - k)) if x > 0 else 1.0


def _nearest_either(query, train, mirror, exclude=None) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest(), or the nearer of the query and its mirror image (``mirror``: the mirrored query rows)."""
    d, i = nearest(query, train, exclude=exclude)
    if mirror is not None:
        d_m, i_m = nearest(mirror, train, exclude=exclude)
        better = d_m < d
        d, i = torch.where(better, d_m, d), torch.where(better, i_m, i)
    return d, i


def audit(spaces: dict[str, tuple], sources: np.ndarray | None = None, alpha: float = 0.05,
          mirrors: dict[str, tuple] | None = None) -> tuple[pd.DataFrame, dict]:
    """spaces: name -> (synthetic, real train, real held-out) representations (tensors of rows or `PixelSpace`s);
    held-out: every real image that is not train (val and test), the reference.

    Returns a per-synthetic-image table (nearest train index and distance per space, `below_<space>` when under
    the space's threshold, `flagged` when under it in any space) and the summary per space: the share below
    (`mem_frac_below_<space>`) with its 95 % (Jeffreys) interval (`_ci_low`, `_ci_high`), the expected rate of a
    generator that copies nothing (`mem_expected_rate_<space>` = k / (m + 1), see `threshold`), the excess over
    it, the exact one-sided p-value of that excess (`mem_p_<space>`, `copy_test`), the threshold and medians;
    `mem_n_reference` = m.

    ``mirrors``: name -> (synthetic, held-out) representations of the same images mirrored left-right; a
    distance is then the nearer of an image's and its mirror image's (reference and synthetic alike, so the
    calibration holds), which catches flipped copies.

    ``sources`` [n_synth, k]: the train rows each synthetic image was conditioned on (-1 = none), as an
    image-conditioned model's variants are. Its nearest training image is then the nearest *other*
    one, and the distance to its first source is reported apart (`source_distance_*`,
    `mem_source_*`): near its source by design, a copy of it when below the threshold too.
    """
    table, summary = {}, {}
    flagged = None
    for name, (synth, train, held_out) in spaces.items():
        synth_m, held_out_m = (mirrors or {}).get(name, (None, None))
        d_syn, i_syn = _nearest_either(synth, train, synth_m, exclude=sources)
        d_ref = _nearest_either(held_out, train, held_out_m)[0].numpy()
        cut, k = threshold(d_ref, alpha)
        m, n = len(d_ref), len(synth)
        expected = k / (m + 1)
        if sources is not None and (sources[:, 0] >= 0).any():
            own = sources[:, 0] >= 0
            d_src = np.full(n, np.nan)
            rows = np.flatnonzero(own)
            for j in range(0, len(rows), CHUNK):
                at = rows[j : j + CHUNK]
                source = train[sources[at, 0]].flatten(1).double()
                d = (synth[at].flatten(1).double() - source).norm(dim=1)
                if synth_m is not None:
                    d = torch.minimum(d, (synth_m[at].flatten(1).double() - source).norm(dim=1))
                d_src[at] = d.numpy()
            table[f"source_distance_{name}"] = d_src
            summary.update({f"mem_source_frac_below_{name}": float((d_src[own] < cut).mean()),
                            f"mem_source_median_{name}": float(np.median(d_src[own]))})
        d = d_syn.numpy()
        below = d < cut
        table[f"nn_train_index_{name}"] = i_syn.numpy()
        table[f"nn_distance_{name}"] = d
        table[f"below_{name}"] = below
        flagged = below if flagged is None else flagged | below
        x = int(below.sum())
        low, high = binomial_interval(x, n)
        summary.update({
            f"mem_frac_below_{name}": x / max(n, 1),
            f"mem_frac_below_{name}_ci_low": low,
            f"mem_frac_below_{name}_ci_high": high,
            f"mem_expected_rate_{name}": expected,
            f"mem_excess_{name}": x / max(n, 1) - expected,
            f"mem_p_{name}": copy_test(x, n, k, m),
            f"mem_threshold_{name}": cut,
            f"mem_nn_median_{name}": float(np.median(d)) if n else float("nan"),
            f"mem_ref_nn_median_{name}": float(np.median(d_ref)),
        })
        summary["mem_n_reference"] = m
    table["flagged"] = flagged
    return pd.DataFrame(table), summary


def source_rows(synth_rows: pd.DataFrame, train_names) -> np.ndarray | None:
    """[n_synth, 2] train rows of each image's source and partner (an image-conditioned model's; -1 = none or
    not a training image); None when no image has one."""
    if "mode" not in synth_rows or not synth_rows["mode"].isin(["reconstruction", "interpolation"]).any():
        return None
    row_of = {n: i for i, n in enumerate(train_names)}
    cols = [synth_rows.get(c, pd.Series("", index=synth_rows.index)) for c in ("source_file_name", "partner_file_name")]
    return np.array([[row_of.get(n, -1) for n in col] for col in cols]).T.reshape(len(synth_rows), 2)


def memorization_table(synth: dict, train: dict, held_out: dict, synth_rows: pd.DataFrame, train_names,
                       alpha: float = 0.05, mirror: bool = False) -> tuple[pd.DataFrame, dict]:
    """audit() over the spaces given (name -> representations of each set; ``held_out``: every real image that
    is not train), as a table people read: each synthetic image's file and caption, and the file name of its
    nearest training image per space (the nearest other than its sources, for an image-conditioned model's
    images). ``mirror``: pixel spaces (`PixelSpace`) also search with each image mirrored (see audit)."""
    mirrors = {name: (synth[name].mirrored(), held_out[name].mirrored())
               for name in synth if mirror and isinstance(synth[name], PixelSpace)}
    table, summary = audit({name: (synth[name], train[name], held_out[name]) for name in synth},
                           source_rows(synth_rows, train_names), alpha=alpha, mirrors=mirrors)
    table.insert(0, "file_name", synth_rows["file_name"].to_numpy())
    table.insert(1, "text", synth_rows["text"].to_numpy())
    train_names = np.asarray(train_names)
    for name in synth:
        table[f"nn_train_file_{name}"] = train_names[table.pop(f"nn_train_index_{name}").to_numpy()]
    summary["mem_flagged"] = int(table["flagged"].sum())
    return table, summary


def closest_pairs(table: pd.DataFrame, train_names, n: int = 8, space: str = "pixel") -> list[tuple[int, int, float]]:
    """The n synthetic images closest to a training image: (synthetic row, train row, distance)."""
    row_of = {name: i for i, name in enumerate(train_names)}
    return [(int(i), row_of[r[f"nn_train_file_{space}"]], float(r[f"nn_distance_{space}"]))
            for i, r in table.nsmallest(n, f"nn_distance_{space}").iterrows()]


def gate(summary: dict, level: float, max_excess: float = 0.0) -> str | None:
    """The privacy gate's verdict: a message when, in some space, significantly more synthetic images fall below
    the threshold than a generator that copies nothing would put there (``summary``: audit()'s; one-sided exact
    test at ``level`` / the number of spaces, Bonferroni) and the share exceeds that expected rate by more than
    ``max_excess``."""
    spaces = [k[len("mem_p_"):] for k in summary if k.startswith("mem_p_")]
    fired = [s for s in spaces if summary[f"mem_p_{s}"] < level / len(spaces)
             and summary[f"mem_excess_{s}"] > max_excess]
    if not fired:
        return None
    return "privacy gate: " + "; ".join(
        f"{summary[f'mem_frac_below_{s}']:.1%} of synthetic images (95 % CI {summary[f'mem_frac_below_{s}_ci_low']:.1%}"
        f"-{summary[f'mem_frac_below_{s}_ci_high']:.1%}) are nearer to a training image than the {s}-space threshold, "
        f"which a generator that copies nothing meets at {summary[f'mem_expected_rate_{s}']:.1%} "
        f"(p = {summary[f'mem_p_{s}']:.2g} < {level / len(spaces):.2g}"
        + (f", excess over {max_excess:.1%}" if max_excess else "") + ")" for s in fired)
