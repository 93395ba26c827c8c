"""Attention maps -> segments: DiffSeg's iterative merging by symmetric KL distance.

Each position's aggregated attention map is a distribution over the grid; positions of one object attend
alike. Anchors on a regular lattice start it: in the first iteration each anchor's proposal is the mean of
every position's map within ``threshold`` of it, in the later ones the proposals merge among themselves the
same way (identical member sets collapse to one). Every position of the output then takes the proposal
whose map, scaled to peak 1 and interpolated to the output size, is highest there: the label map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8
CHUNK = 1024  # rows per block of the all-pairs distance: memory A x CHUNK, not A x N


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[A, N] and [B, N] distributions -> [A, B] of (KL(p||q) + KL(q||p)) / 2 = sum (p - q)(log p - log q) / 2,
    computed in blocks of rows of ``q``."""
    p, q = p.double().clamp_min(EPS), q.double().clamp_min(EPS)
    lp = p.log()
    self_p = (p * lp).sum(1, keepdim=True)
    out = []
    for i in range(0, len(q), CHUNK):
        qb = q[i : i + CHUNK]
        lq = qb.log()
        out.append(self_p + (qb * lq).sum(1)[None] - p @ lq.T - lp @ qb.T)
    return (torch.cat(out, dim=1) / 2).float()


def anchor_positions(grid: tuple[int, ...], per_side: int) -> torch.Tensor:
    """Flat indices of a regular lattice of about ``per_side`` anchors per axis, centred in their cells."""
    axes = [torch.arange(0, s, max(1, s // per_side)) + max(1, s // per_side) // 2 for s in grid]
    axes = [a[a < s] for a, s in zip(axes, grid)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    strides = torch.tensor([int(torch.tensor(grid[i + 1:]).prod()) for i in range(len(grid))])
    return sum(m.flatten() * st for m, st in zip(mesh, strides))


def _merge(proposals: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    members = symmetric_kl(proposals, candidates) < threshold  # [A, C]
    members = torch.unique(members, dim=0)  # proposals with the same members are one
    members = members[members.any(1)]
    return (members.float() @ candidates) / members.sum(1, keepdim=True)


def merge_attention(attn: torch.Tensor, grid: tuple[int, ...], threshold: float, iterations: int,
                    anchors_per_side: int = 16) -> torch.Tensor:
    """[N, N] aggregated attention of one image (rows: query positions) -> [K, N] merged proposals."""
    proposals = attn[anchor_positions(grid, anchors_per_side)]
    proposals = _merge(proposals, attn, threshold)
    for _ in range(iterations - 1):
        merged = _merge(proposals, proposals, threshold)
        if len(merged) == len(proposals):
            break  # nothing merges any more
        proposals = merged
    return proposals


def label_map(proposals: torch.Tensor, grid: tuple[int, ...], size: tuple[int, ...]) -> torch.Tensor:
    """[K, N] proposals over ``grid`` -> int64 labels of shape ``size`` (0..K-1, renumbered by first
    appearance in raster order so the map does not depend on the proposals' order)."""
    maps = proposals.reshape(1, len(proposals), *grid)
    if tuple(size) != tuple(grid):
        maps = F.interpolate(maps, size=size, mode="bilinear" if len(grid) == 2 else "trilinear", align_corners=False)
    # each proposal as a soft mask (its peak 1): a small segment's map is denser, which must not win it pixels
    maps = maps / maps.flatten(2).amax(2).view(1, -1, *[1] * len(grid)).clamp_min(EPS)
    flat = maps[0].argmax(0).flatten()
    values, inverse = torch.unique(flat, return_inverse=True)
    first = torch.full((len(values),), flat.numel()).scatter_reduce(0, inverse, torch.arange(flat.numel()), "amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(len(values))
    return rank[inverse].reshape(tuple(size))


def segment_attention(attn: torch.Tensor, grid: tuple[int, ...], size: tuple[int, ...], threshold: float,
                      iterations: int, anchors_per_side: int = 16) -> torch.Tensor:
    """One image's aggregated attention [N, N] -> its label map at ``size``."""
    return label_map(merge_attention(attn, grid, threshold, iterations, anchors_per_side), grid, size)


__all__ = ["anchor_positions", "label_map", "merge_attention", "segment_attention", "symmetric_kl"]
