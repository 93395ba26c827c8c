"""Fidelity of synthetic volumes, with what exists offline: no pretrained 3-D feature extractor ships in any
package, so a volume is seen as (a) its three central planes through the 2-D extractor (slice-wise FD/KID,
precision/recall on the planes' features side by side) and (b) voxel by voxel against the nearest real
volume (PSNR/SSIM/MAE), each beside the same figure for real test volumes against real train ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from synthmed.metrics.fidelity import frechet_distance
from synthmed.metrics.privacy import nearest

PLANES = ("axial", "coronal", "sagittal")


def central_plane_images(volumes: torch.Tensor) -> list[torch.Tensor]:
    """[N, C, X, Y, Z] (RAS, as ingest stores them) -> the axial, coronal and sagittal central planes, each
    [N, C, H, W] with superior (or anterior) up, as `viz.central_planes` shows them."""
    x, y, z = (s // 2 for s in volumes.shape[2:])
    planes = (volumes[:, :, :, :, z], volumes[:, :, :, y, :], volumes[:, :, x, :, :])
    return [torch.rot90(p, 1, dims=(2, 3)) for p in planes]


class PlaneFeatures(nn.Module):
    """A 2-D feature extractor applied to the three central planes: [N, C, D, H, W] -> [N, 3 * F]
    (axial, coronal, sagittal blocks in that order)."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.extractor(p.contiguous()) for p in central_plane_images(volumes)], dim=1)


def plane_frechet(real: torch.Tensor, synth: torch.Tensor) -> dict[str, float]:
    """FD per central plane, from PlaneFeatures' blocks."""
    width = real.shape[1] // len(PLANES)
    return {f"fd_effnet_{name}": frechet_distance(real[:, i * width:(i + 1) * width], synth[:, i * width:(i + 1) * width])
            for i, name in enumerate(PLANES)}


def _gaussian_filter(x: torch.Tensor, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """Gaussian window over every spatial axis of a reflection-padded input (what torchmetrics' SSIM does),
    one axis at a time: torchmetrics' single 3-D convolution becomes a size**3-column matrix in float64
    (70 GB for 42 volumes of 32^3)."""
    k = torch.exp(-((torch.arange(size, dtype=x.dtype) - size // 2) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, [size // 2] * 2 * (x.ndim - 2), mode="reflect")
    conv = F.conv3d if x.ndim == 5 else F.conv2d
    for axis in range(2, x.ndim):
        shape = [1, 1] + [size if a == axis else 1 for a in range(2, x.ndim)]
        x = conv(x, k.view(shape))
    return x


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pair SSIM of images or volumes [N, 1, ...] in [0, 1] (Gaussian window 11, sigma 1.5; Wang et al.),
    torchmetrics' values with memory linear in the window size."""
    c1, c2 = 0.01**2, 0.03**2
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    vx = (_gaussian_filter(x * x) - mx * mx).clamp_min(0)
    vy = (_gaussian_filter(y * y) - my * my).clamp_min(0)
    cxy = _gaussian_filter(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def _pairwise(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (3-D Gaussian window) and MAE of uint8 volume pairs, on [0, 1]."""
    x, y = a.double() / 255, b.double() / 255
    mse = (x - y).pow(2).flatten(1).mean(1)
    psnr = float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
    values = torch.cat([ssim(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)])
    return {"psnr": psnr, "ssim": float(values.mean()), "mae": float((x - y).abs().mean())}


def nearest_volume_metrics(synth: torch.Tensor, train: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Each synthetic volume against its nearest real test volume (voxel L2), and as the scale, each real
    test volume against its nearest real train volume: how close a volume of the right distribution gets to
    its nearest real neighbour. Higher PSNR/SSIM and lower MAE than the reference = closer than real data is
    to itself (worth a look at the memorization audit); far lower = off the real manifold."""
    flat = lambda v: v.flatten(1).double() / 255  # noqa: E731
    _, i_syn = nearest(flat(synth), flat(test))
    _, i_ref = nearest(flat(test), flat(train))
    out = {f"volume_{k}": v for k, v in _pairwise(synth, test[i_syn]).items()}
    out.update({f"volume_{k}_real_test_vs_train": v for k, v in _pairwise(test, train[i_ref]).items()})
    return out
