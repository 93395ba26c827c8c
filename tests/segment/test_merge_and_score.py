"""Merging attention into segments, the Hungarian matching, Dice and the intensity baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import synthmed.segment.merge as merge
from synthmed.segment.merge import segment_attention, symmetric_kl
from synthmed.metrics.stats import bootstrap_ci
from synthmed.segment.score import (UNMATCHED, dice, foreground_dice, kmeans_segments,
                                    match_segments, otsu_segments)


def blob_attention(labels: torch.Tensor, leak: float = 0.01) -> torch.Tensor:
    """Each position attends evenly to its own region (and a little to everything)."""
    flat = labels.flatten()
    attn = (flat[:, None] == flat[None]).float() + leak
    return attn / attn.sum(1, keepdim=True)


def two_blobs(side: int = 16, dims: int = 2) -> torch.Tensor:
    labels = torch.zeros((side,) * dims, dtype=torch.long)
    labels[(slice(4, 12), slice(3, 9), slice(2, 7))[:dims]] = 1
    return labels


@pytest.mark.parametrize("dims", [2, 3])
def test_two_separable_blobs_merge_into_exactly_their_segments(dims):
    truth = two_blobs(dims=dims)
    grid = tuple(truth.shape)
    seg = segment_attention(blob_attention(truth), grid, grid, threshold=0.5, iterations=3, anchors_per_side=8)
    matched = match_segments(seg.numpy(), truth.numpy(), 2)
    assert seg.max() == 1 and np.array_equal(dice(matched, truth.numpy(), 2), [1.0, 1.0])
    if dims == 2:  # at 4x the grid the bilinear maps round the blob's corners only
        big = segment_attention(blob_attention(truth), grid, (64, 64), 0.5, 3, 8).numpy()
        up = F.interpolate(truth[None, None].float(), size=(64, 64), mode="nearest")[0, 0].long().numpy()
        assert np.nanmin(dice(match_segments(big, up, 2), up, 2)) > 0.97


def test_the_threshold_decides_between_fragments_and_one_segment():
    truth = two_blobs()
    attn = blob_attention(truth)
    attn = attn + 0.002 * torch.rand(attn.shape, generator=torch.Generator().manual_seed(0))  # unlike positions
    attn = attn / attn.sum(1, keepdim=True)
    counts = [int(segment_attention(attn, (16, 16), (16, 16), th, 3).max()) + 1 for th in (1e-4, 0.5, 50.0)]
    assert counts[0] > 2 and counts[1] == 2 and counts[2] == 1


def test_symmetric_kl_is_the_mean_of_both_kls_in_any_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(5, 7, generator=g).softmax(-1), torch.rand(6, 7, generator=g).softmax(-1)
    kl = lambda a, b: (a * (a / b).log()).sum()  # noqa: E731
    expected = torch.stack([torch.stack([(kl(a, b) + kl(b, a)) / 2 for b in q]) for a in p])
    assert torch.allclose(symmetric_kl(p, q), expected, atol=1e-6)
    monkeypatch.setattr(merge, "CHUNK", 2)
    assert torch.allclose(symmetric_kl(p, q), expected, atol=1e-6)


def test_hungarian_matching_and_dice_arithmetic():
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 2, 2]])
    segments = np.array([[5, 5, 3, 3],   # segment 3 covers class 1, segment 5 class 0
                         [5, 5, 3, 0],   # segment 0 a fragment of class 1 (left without a class)
                         [4, 4, 4, 4]])
    matched = match_segments(segments, truth, 3)
    assert np.array_equal(matched, [[0, 0, 1, 1], [0, 0, 1, UNMATCHED], [2, 2, 2, 2]])
    assert np.allclose(dice(matched, truth, 3), [1.0, 2 * 3 / (3 + 4), 1.0])
    assert dice(np.zeros((2, 2), int), np.zeros((2, 2), int), 3)[1:].tolist() == [pytest.approx(np.nan, nan_ok=True)] * 2
    assert foreground_dice(matched, truth) == pytest.approx(2 * 7 / (7 + 8))
    one = np.zeros_like(truth)  # fewer segments than classes: one class gets it (4 of 4 pixels), the others score 0
    assert np.allclose(sorted(dice(match_segments(one, truth, 3), truth, 3)), [0.0, 0.0, 2 * 4 / (12 + 4)])


def test_the_intensity_baselines_find_three_clean_levels():
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 32), int)
    truth[4:28, 4:28], truth[10:20, 12:22] = 1, 2  # nested regions, a few dozen pixels at the least
    image = np.array([20, 120, 220])[truth] + rng.integers(-10, 10, truth.shape)
    for seg in (otsu_segments(image, 3), kmeans_segments(image, 3, seed=0)):
        assert np.array_equal(seg, truth)  # dark to bright


def test_bootstrap_interval_holds_the_mean_and_repeats_with_its_seed():
    values = np.r_[np.linspace(0.2, 0.8, 40), np.nan]
    mean, low, high = bootstrap_ci(values, 500, seed=1)
    assert low < mean < high and mean == pytest.approx(0.5) and bootstrap_ci(values, 500, seed=1) == (mean, low, high)
