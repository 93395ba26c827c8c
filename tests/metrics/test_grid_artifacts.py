"""The checkerboard figure: near 0 dB without a grid, high with one, and which grid it sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthmed.metrics.grid_artifacts import grid_artifacts, grid_excess_db, grid_ratios


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 72, 72, generator=g), 9, stride=1)  # 64 px, smooth
    return x


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def test_a_four_pixel_grid_shows_as_excess_power_and_smooth_images_do_not():
    clean = smooth_images(8)
    base = (clean - clean.mean()) * 4 + 0.5
    grid = torch.zeros(64, 64)
    grid[::4, ::4] = 1.0  # one bright pixel per 4 x 4 block, as a packed latent's corner would leave
    checkered = base + 0.08 * grid
    plain_db, _, _ = grid_excess_db(grid_ratios(as_uint8(base)), 0, 0)
    grid_db, low, high = grid_excess_db(grid_ratios(as_uint8(checkered)), 100, 0)
    assert abs(plain_db) < 3 and grid_db > plain_db + 10
    assert low <= grid_db <= high
    # a grid of another period (5 px) leaves the 4-pixel frequencies alone
    other = torch.zeros(64, 64)
    other[::5, ::5] = 1.0
    assert grid_excess_db(grid_ratios(as_uint8(base + 0.08 * other)), 0, 0)[0] < plain_db + 3


def test_the_figures_come_with_intervals_and_volumes_get_none():
    x = as_uint8(smooth_images(6) * 2)
    out = grid_artifacts(x, x, 50, 0)
    assert out["grid_excess_db"] == pytest.approx(out["grid_excess_db_real"])
    assert out["grid_excess_db_ci_low"] <= out["grid_excess_db"] <= out["grid_excess_db_ci_high"]
    assert grid_artifacts(torch.zeros(2, 1, 8, 8, 8, dtype=torch.uint8), x, 10, 0) == {}
    with pytest.raises(ValueError, match="4-pixel grid"):
        grid_ratios(torch.zeros(1, 1, 30, 30, dtype=torch.uint8))
    assert np.isfinite(grid_ratios(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))).all()  # flat: no division by 0
