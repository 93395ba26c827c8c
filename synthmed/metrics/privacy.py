"""Memorization audit: is any synthetic image a near copy of a training image?

For each synthetic image, the distance to its nearest real-train neighbour, in feature
space and in pixel space. The reference is the same distance from each real *test*
image to real train: images the generator never saw. A generator that does not copy
should put about 1 % of its images below the 1st percentile of that reference and about
5 % below the 5th; a much larger share means near-duplicates of training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from synthmed.core.config import require_non_negative
from synthmed.core.runtime import pick_device


@dataclass
class PrivacyParams:
    """evaluate.privacy: the memorization audit's gate and pixel-space resolution."""
    fail_on_violation: bool  # stop the stage when too many synthetic images are near copies
    max_fraction_below_p1: float  # gate: share of synthetic images below the reference's 1st percentile
    pixel_resolution: int  # pixel-space distances at this side (area-averaged down from larger images); 0 = native

    def __post_init__(self):
        require_non_negative(self, "pixel_resolution")


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
    difference)."""

    def __init__(self, images_uint8, resolution: int = 0):
        self.images, self.resolution = images_uint8, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> torch.Tensor:
        images, side = self.images[index], self.side
        rows = []
        for piece in images.split(max(1, 2**23 // max(images[0].numel(), 1))):  # float copies of 8 M pixels at most
            x = piece.float().div_(255.0)
            if side < x.shape[-1]:
                x = F.adaptive_avg_pool3d(x, side) if x.ndim == 5 else F.adaptive_avg_pool2d(x, side)
            rows.append(x.flatten(1))
        return torch.cat(rows) if rows else images.flatten(1).float()

    @property
    def side(self) -> int:
        side = self.images.shape[-1]
        return min(side, self.resolution) if self.resolution else side


def audit(spaces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
          sources: np.ndarray | None = None) -> tuple[pd.DataFrame, dict]:
    """spaces: name -> (synthetic, real train, real test) representations.

    Returns a per-synthetic-image table (nearest train index and distance per space,
    flagged when below the reference's 1st percentile in any space) and the summary.

    ``sources`` [n_synth, k]: the train rows each synthetic image was conditioned on (-1 = none), as an
    image-conditioned model's variants are. Its nearest training image is then the nearest *other*
    one, and the distance to its first source is reported apart (`source_distance_*`,
    `mem_source_*`): near its source by design, a copy of it when below the reference too.
    """
    table, summary = {}, {}
    flagged = None
    for name, (synth, train, test) in spaces.items():
        d_syn, i_syn = nearest(synth, train, exclude=sources)
        d_ref, _ = nearest(test, train)
        p1, p5 = np.percentile(d_ref.numpy(), [1, 5])
        if sources is not None and (sources[:, 0] >= 0).any():
            own = sources[:, 0] >= 0
            d_src = np.full(len(synth), np.nan)
            rows = np.flatnonzero(own)
            for k in range(0, len(rows), CHUNK):
                at = rows[k : k + CHUNK]
                d_src[at] = (synth[at].flatten(1).double() - train[sources[at, 0]].flatten(1).double()).norm(dim=1).numpy()
            table[f"source_distance_{name}"] = d_src
            summary.update({f"mem_source_frac_below_p1_{name}": float((d_src[own] < p1).mean()),
                            f"mem_source_median_{name}": float(np.median(d_src[own]))})
        table[f"nn_train_index_{name}"] = i_syn.numpy()
        table[f"nn_distance_{name}"] = d_syn.numpy()
        below = d_syn.numpy() < p1
        flagged = below if flagged is None else flagged | below
        summary.update({
            f"mem_frac_below_p1_{name}": float(below.mean()),
            f"mem_frac_below_p5_{name}": float((d_syn.numpy() < p5).mean()),
            f"mem_nn_median_{name}": float(d_syn.median()),
            f"mem_ref_nn_median_{name}": float(d_ref.median()),
        })
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


def memorization_table(synth: dict[str, torch.Tensor], train: dict[str, torch.Tensor], test: dict[str, torch.Tensor],
                       synth_rows: pd.DataFrame, train_names) -> tuple[pd.DataFrame, dict]:
    """audit() over the spaces given (name -> representations of each set), as a table people read:
    each synthetic image's file and caption, and the file name of its nearest training image per space
    (the nearest other than its sources, for an image-conditioned model's images)."""
    table, summary = audit({name: (synth[name], train[name], test[name]) for name in synth},
                           source_rows(synth_rows, train_names))
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


def gate(summary: dict, limit: float) -> str | None:
    """The privacy gate's verdict: a message when the worst space puts more synthetic images below the
    reference's 1st percentile than ``limit`` allows."""
    worst = max(v for k, v in summary.items() if k.startswith("mem_frac_below_p1_"))
    if worst <= limit:
        return None
    return (f"privacy gate: {worst:.1%} of synthetic images are closer to a training image than 99 % of real "
            f"test images are (limit {limit:.1%})")
