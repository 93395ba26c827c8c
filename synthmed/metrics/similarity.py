"""Per-pair image similarity (PSNR, SSIM) of images or volumes in [0, 1], any channel count.

The values are torchmetrics' (tested against it); the Gaussian window is applied one axis at a time,
so memory stays linear in the window size where a single 3-D convolution would unfold size**3 columns
(70 GB in float64 for 42 volumes of 32^3), and importing torchmetrics (4-5 s: its text and audio metrics
pull transformers and scipy.signal) is left to the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_filter(x: torch.Tensor, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """Gaussian window over every spatial axis of a reflection-padded input [N, 1, ...]."""
    k = torch.exp(-((torch.arange(size, dtype=x.dtype, device=x.device) - size // 2) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, [size // 2] * 2 * (x.ndim - 2), mode="reflect")
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    for axis in range(2, x.ndim):
        shape = [1, 1] + [size if a == axis else 1 for a in range(2, x.ndim)]
        x = conv(x, k.view(shape))
    return x


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair SSIM [N] of images or volumes [N, C, ...] (Gaussian window 11, sigma 1.5; Wang et al.), the
    mean over channels and positions; differentiable (a training loss)."""
    n, c = x.shape[:2]
    x, y = x.reshape(n * c, 1, *x.shape[2:]), y.reshape(n * c, 1, *y.shape[2:])
    c1, c2 = 0.01**2, 0.03**2
    mx, my = gaussian_filter(x), gaussian_filter(y)
    vx = (gaussian_filter(x * x) - mx * mx).clamp_min(0)
    vy = (gaussian_filter(y * y) - my * my).clamp_min(0)
    cxy = gaussian_filter(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(n, -1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair PSNR [N] (dB, peak 1) of images or volumes [N, ...]."""
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


class PerceptualDistance(torch.nn.Module):
    """Per-pair distance [N] of images in [0, 1] [N, 1 or 3, H, W] on the early feature maps of the offline
    EfficientNet-Lite0 (stem and ``stages`` stages, at the images' own size): each map unit-normalised over
    channels, squared differences summed over channels, averaged over positions, summed over maps (LPIPS
    without its learned weights). Frozen; differentiable in its inputs (a training loss). The maps stop at the
    third of seven stages, far from the pooled 1,280-d features that the fidelity metrics compare."""

    def __init__(self, stages: int = 3):
        super().__init__()
        from synthmed.metrics.features import load_effnet_lite0

        self.net, self.stages = load_effnet_lite0(), stages
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(len(x))
        with torch.no_grad():  # the reference images' maps need no gradient
            targets = self.net.stage_maps(y, self.stages)
        for a, b in zip(self.net.stage_maps(x, self.stages), targets):
            a, b = F.normalize(a, dim=1, eps=1e-8), F.normalize(b, dim=1, eps=1e-8)
            total = total + (a - b).pow(2).sum(1).flatten(1).mean(1)
        return total
