"""Distribution distances between image sets on a named feature space.

Features are extracted once per image set; torchmetrics' FID/KID then run on
those features through an identity extractor, so each set is embedded once no
matter how many comparisons use it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from synthmed.runtime import progress


class _Precomputed(nn.Identity):
    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


@torch.no_grad()
def extract_features(extractor: nn.Module, images_uint8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    device = next(extractor.parameters()).device
    feats = [extractor(images_uint8[i : i + batch_size].to(device).float() / 255.0).double().cpu()
             for i in progress(range(0, len(images_uint8), batch_size), desc="features")]
    return torch.cat(feats)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int,
                    seed: int) -> tuple[float, float, int]:
    """KID mean and std over random subsets; subset size capped at the smaller set."""
    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets from the global generator
    try:
        mean, std = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std), size
