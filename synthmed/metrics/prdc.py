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


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: each point is its own nearest neighbour


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """All four on feature vectors [N, D] and [M, D]; needs more than k points in each set."""
    if k < 1:
        raise ValueError(f"PRDC needs k >= 1 nearest neighbours, got k={k}")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} real and fake samples "
                         f"(got {len(real)} and {len(fake)})")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(real, fake)  # [N, M]
    in_real = d <= r_real[:, None]  # fake j inside real ball i
    precision = in_real.any(dim=0).double().mean().item()
    recall = (d <= r_fake[None, :]).any(dim=1).double().mean().item()
    density = in_real.sum().item() / (k * len(fake))
    coverage = (d.min(dim=1).values <= r_real).double().mean().item()
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage, "f1_pr": f1}
