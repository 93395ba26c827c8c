"""Improved precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Each set's manifold is the union of balls around its points with radius the distance
to the point's k-th nearest neighbour in the same set.

- precision: share of fake points inside the real manifold (are the samples realistic?)
- recall: share of real points inside the fake manifold (is the real variety covered?)
- density: how many real balls contain each fake point, / k (≈ 1 when fake ~ real; rewards
  samples in dense real regions and is robust to real outliers, unlike precision)
- coverage: share of real points whose ball contains at least one fake point
"""

from __future__ import annotations

import torch


PRDC_KEYS = ("precision", "recall", "density", "coverage", "f1_pr")


CHUNK = 1024  # rows of one distance block: memory O(CHUNK x set size), never set size^2
MAX_POINTS = 10_000  # per side; larger sets are subsampled (seeded), as the PRDC papers do


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i : i + CHUNK], x).kthvalue(k + 1, dim=1).values  # +1: a point is its own neighbour
                      for i in range(0, len(x), CHUNK)])


def subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most ``n`` rows of ``x``: all of them, or a seeded sample (in row order)."""
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values]


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5, max_points: int = MAX_POINTS,
         seed: int = 0) -> dict[str, float]:
    """All four on feature vectors [N, D] and [M, D] (each subsampled to ``max_points``), in blocks of CHUNK
    real rows; needs more than k points in each set."""
    if k < 1:
        raise ValueError(f"PRDC needs k >= 1 nearest neighbours, got k={k}")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and fake samples "
                         f"(got {len(real)} and {len(fake)})")
    real, fake = subsample(real, max_points, seed).double(), subsample(fake, max_points, seed + 1).double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    inside_any = torch.zeros(len(fake), dtype=torch.bool)  # fake j inside some real ball
    balls, recalled, covered = 0, 0, 0
    for i in range(0, len(real), CHUNK):
        d = torch.cdist(real[i : i + CHUNK], fake)  # [chunk, M]
        in_real = d <= r_real[i : i + CHUNK, None]  # fake j inside real ball i
        inside_any |= in_real.any(dim=0)
        balls += int(in_real.sum())
        recalled += int((d <= r_fake[None, :]).any(dim=1).sum())
        covered += int(in_real.any(dim=1).sum())
    precision = inside_any.double().mean().item()
    recall, density, coverage = recalled / len(real), balls / (k * len(fake)), covered / len(real)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage, "f1_pr": f1}
