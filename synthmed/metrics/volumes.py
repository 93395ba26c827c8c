"""Fidelity of synthetic volumes, with what exists offline: no pretrained 3-D feature extractor ships in any
package, so a volume is seen as (a) its three central planes through the 2-D extractor (slice-wise FD/KID,
precision/recall on the planes' features side by side) and (b) voxel by voxel against the nearest real
volume (PSNR/SSIM/MAE), each beside the same figure for real test volumes against real train ones.
"""

from __future__ import annotations

import torch
from torch import nn

from synthmed.data.disk_array import as_rows
from synthmed.metrics.fidelity import frechet_distance
from synthmed.metrics.privacy import PixelSpace, nearest
from synthmed.metrics.similarity import psnr, ssim

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


@torch.no_grad()
def _pairwise(a, b, chunk: int = 8) -> dict[str, float]:
    """Mean PSNR (dB), SSIM (3-D Gaussian window) and MAE of uint8 volume pairs (row i of ``a`` and of ``b``:
    tensors, DiskArrays or Rows, read ``chunk`` pairs at a time), on [0, 1]."""
    values = {"psnr": [], "ssim": [], "mae": []}
    for i in range(0, len(a), chunk):
        x, y = a[i : i + chunk].double() / 255, b[i : i + chunk].double() / 255
        values["psnr"].append(psnr(x, y))
        values["ssim"].append(ssim(x, y))
        values["mae"].append((x - y).abs().flatten(1).mean(1))
    return {k: float(torch.cat(v).mean()) for k, v in values.items()}


def nearest_volume_metrics(synth, train, test) -> dict[str, float]:
    """Each synthetic volume against its nearest real test volume (voxel L2), and as the scale, each real
    test volume against its nearest real train volume: how close a volume of the right distribution gets to
    its nearest real neighbour. Higher PSNR/SSIM and lower MAE than the reference = closer than real data is
    to itself (worth a look at the memorization audit); far lower = off the real manifold. Volumes are read
    a chunk at a time (tensors, DiskArrays or Rows)."""
    _, i_syn = nearest(PixelSpace(synth), PixelSpace(test))
    _, i_ref = nearest(PixelSpace(test), PixelSpace(train))
    out = {f"volume_{k}": v for k, v in _pairwise(synth, as_rows(test).subset(i_syn)).items()}
    out.update({f"volume_{k}_real_test_vs_train": v for k, v in _pairwise(test, as_rows(train).subset(i_ref)).items()})
    return out
