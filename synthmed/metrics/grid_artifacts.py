"""Periodic grid artefacts (the checkerboard of packed latents or of an autoencoder's upsampling), measured.

A generator that builds its images from blocks of ``period`` pixels (a VAE of factor f whose latents the UNet
sees packed p x p: period f * p) leaves power at the spatial frequencies that are multiples of 1/period; real
images have none to speak of there. The figure is the power at those frequencies against the power two bins
away from them (the local level of the spectrum), averaged over the images and the grid frequencies, in dB:
about 0 for real images, several dB for a visible checkerboard. Its 95 % interval comes from resampling the
images (each image's spectrum is computed once).
"""

from __future__ import annotations

import numpy as np
import torch

from synthmed.data.disk_array import as_rows, rows_per_batch

PERIOD = 4  # pixels: the 2 x 2 packing of an f = 2 VAE's latents, or an f = 4 VAE; its multiples of 1/4 include 1/2
RING = [(dy, dx) for dy in (-2, 0, 2) for dx in (-2, 0, 2) if (dy, dx) != (0, 0)]


def grid_ratios(images, period: int = PERIOD) -> np.ndarray:
    """Per image [N]: mean over the grid frequencies (k H / period, l W / period), (k, l) != (0, 0), of their
    power over the mean power of the eight bins two away. Images uint8 [N, C, H, W] (channels averaged)."""
    images = as_rows(images)
    h, w = images.shape[-2:]
    if h % period or w % period:
        raise ValueError(f"{h}x{w} images do not tile into a {period}-pixel grid")
    peaks = [(k * h // period, l * w // period) for k in range(period) for l in range(period) if k or l]
    out = []
    n = rows_per_batch(images.shape)
    for i in range(0, len(images), n):
        x = images[i : i + n].double().mean(1)
        x = x - x.mean(dim=(-2, -1), keepdim=True)
        power = torch.fft.fft2(x).abs().pow(2)
        ratio = [power[:, y, z] / torch.stack([power[:, (y + dy) % h, (z + dx) % w] for dy, dx in RING]).mean(0)
                 .clamp_min(1e-12) for y, z in peaks]
        out.append(torch.stack(ratio).mean(0).numpy())
    return np.concatenate(out)


def grid_excess_db(ratios: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """The figure in dB of per-image ratios, and its 95 % resampling interval (equal bounds without resamples)."""
    value = float(10 * np.log10(ratios.mean()))
    if not resamples:
        return value, value, value
    rng = np.random.default_rng(seed)
    draws = 10 * np.log10(ratios[rng.integers(len(ratios), size=(resamples, len(ratios)))].mean(1))
    low, high = np.percentile(draws, [2.5, 97.5])
    return value, float(low), float(high)


def grid_artifacts(synth, real, resamples: int, seed: int) -> dict[str, float]:
    """`grid_excess_db` of synthetic and real images (2-D) with intervals; {} for volumes."""
    if as_rows(synth).ndim != 4:
        return {}
    out = {}
    for name, images in (("grid_excess_db", synth), ("grid_excess_db_real", real)):
        value, low, high = grid_excess_db(grid_ratios(images), resamples, seed)
        out.update({name: value, f"{name}_ci_low": low, f"{name}_ci_high": high})
    return out
