"""Memorization audit: is any synthetic image a near copy of a training image?

For each synthetic image, the distance to its nearest real-train neighbour, in feature
space and in pixel space. The reference is the same distance from each real *test*
image to real train: images the generator never saw. A generator that does not copy
should put about 1 % of its images below the 1st percentile of that reference and about
5 % below the 5th; a much larger share means near-duplicates of training images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def nearest(query: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance to, and index of, each query row's nearest reference row."""
    q, r = query.flatten(1).double(), reference.flatten(1).double()
    dists, idx = [], []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i : i + chunk], r)
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """Pixel space: intensities in [0, 1], flattened (distance ~ sqrt(#pixels) x RMS difference)."""
    return images_uint8.flatten(1).double() / 255.0


def audit(spaces: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[pd.DataFrame, dict]:
    """spaces: name -> (synthetic, real train, real test) representations.

    Returns a per-synthetic-image table (nearest train index and distance per space,
    flagged when below the reference's 1st percentile in any space) and the summary.
    """
    table, summary = {}, {}
    flagged = None
    for name, (synth, train, test) in spaces.items():
        d_syn, i_syn = nearest(synth, train)
        d_ref, _ = nearest(test, train)
        p1, p5 = np.percentile(d_ref.numpy(), [1, 5])
        table[f"nn_train_index_{name}"] = i_syn.numpy()
        table[f"nn_distance_{name}"] = d_syn.numpy()
        below = d_syn.numpy() < p1
        flagged = below if flagged is None else flagged | below
        summary.update({
            f"mem_frac_below_p1_{name}": float(below.mean()),
            f"mem_frac_below_p5_{name}": float((d_syn.numpy() < p5).mean()),
            f"mem_nn_median_{name}": float(d_syn.median()),
            f"mem_ref_nn_median_{name}": float(d_ref.median()),
        })
    table["flagged"] = flagged
    return pd.DataFrame(table), summary
