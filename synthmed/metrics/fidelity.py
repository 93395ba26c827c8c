"""Distribution distances between image sets on a named feature space.

Features are extracted once per image set (feature_cache); the distances run on those features, so each
set is embedded once no matter how many comparisons use it. FD and KID are torchmetrics' definitions
(tested against it), computed without its import (4-5 s per process) and, for FD, exactly in whichever of
the feature or the sample space is smaller: at n = 46 images of 3 x 1,280-d plane features, a 46 x 46
problem in place of a 3,840 x 3,840 non-symmetric eigendecomposition.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from synthmed.metrics.prdc import MAX_POINTS as PRDC_MAX_POINTS, PRDC_KEYS, prdc
from synthmed.core.provenance import derive_seed
from synthmed.core.progress import progress


@torch.no_grad()
def extract_features(extractor: nn.Module, images_uint8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    device = next(extractor.parameters()).device
    feats = [extractor(images_uint8[i : i + batch_size].to(device).float() / 255.0).double().cpu()
             for i in progress(range(0, len(images_uint8), batch_size), desc="features")]
    return torch.cat(feats)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2) of features [N, D] (unbiased covariances).

    With centred features A, B, S_r S_f = A'A B'B / ((n_r - 1)(n_f - 1)) has the non-zero eigenvalues of
    (A B')(A B')', so the trace term is the sum of A B''s singular values: exact, and n_r x n_f in size.
    When both sets outnumber the dimensions, the D x D form S_r^1/2 S_f S_r^1/2 (symmetric) is smaller.
    """
    a, b = real.double(), fake.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    if min(len(a), len(b)) <= a.shape[1]:
        root_trace = torch.linalg.svdvals(a @ b.T).sum() / (na * nb) ** 0.5
    else:
        s_a, s_b = a.T @ a / na, b.T @ b / nb
        w, v = torch.linalg.eigh(s_a)
        root = (v * w.clamp_min(0).sqrt()) @ v.T
        root_trace = torch.linalg.eigvalsh(root @ s_b @ root).clamp_min(0).sqrt().sum()
    trace_a, trace_b = a.pow(2).sum() / na, b.pow(2).sum() / nb
    return float((mu_a - mu_b).pow(2).sum() + trace_a + trace_b - 2 * root_trace)


def _mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 under the cubic polynomial kernel (x.y / D + 1)^3 of KID (Binkowski et al. 2018)."""
    kernel = lambda p, q: (p @ q.T / x.shape[1] + 1) ** 3  # noqa: E731
    m = len(x)
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * kernel(x, y).mean()


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int,
                    seed: int) -> tuple[float, float, int]:
    """KID mean and std over random subsets (each drawn without replacement from both sets; seeded); the
    subset size capped at the smaller set."""
    size = min(subset_size, len(real), len(fake))
    g = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    values = torch.stack([_mmd2(real[torch.randperm(len(real), generator=g)[:size]],
                                fake[torch.randperm(len(fake), generator=g)[:size]]) for _ in range(subsets)])
    return float(values.mean()), float(values.std(unbiased=False)), size  # torchmetrics: the population std


def fidelity_with_reference(test: torch.Tensor, synth: torch.Tensor, train: torch.Tensor, kid_subset_size: int,
                            kid_subsets: int, prdc_k: int, seed: int) -> dict[str, float]:
    """FD/KID/PRDC of synthetic vs real test features, each beside real train vs real test (`_real_train_vs_test`).

    The real reference is a seeded random subset of train as large as the synthetic set: FD and PRDC
    depend on sample size, so only equal sizes compare. Raises ValueError when a set is too small for k.
    """
    n = min(len(synth), len(train))
    rng = np.random.default_rng(derive_seed(seed, "fidelity_reference"))
    pick = np.sort(rng.choice(len(train), n, replace=False))
    out: dict[str, float] = {"n_real_reference": n}
    for suffix, fake in (("", synth), ("_real_train_vs_test", train[pick])):
        out[f"fd_effnet{suffix}"] = frechet_distance(test, fake)
        mean, std, size = kernel_distance(test, fake, kid_subset_size, kid_subsets, seed)
        out[f"kid_effnet{suffix}"], out[f"kid_effnet{suffix}_std"] = mean, std
        out.setdefault("kid_subset_size", size)
        out.update({f"{k}{suffix}": v for k, v in prdc(test, fake, prdc_k).items()})
    out["prdc_points"] = min(len(test), n, PRDC_MAX_POINTS)  # the smaller side PRDC saw (subsampled above it)
    return out


def per_label_prdc(test: torch.Tensor, test_labels, synth: torch.Tensor, synth_labels, k: int) -> pd.DataFrame:
    """PRDC per label, for labels with more than k real and synthetic images."""
    test_labels, synth_labels = np.asarray(test_labels), np.asarray(synth_labels)
    rows = []
    for label in sorted(set(test_labels) & set(synth_labels) - {""}):
        real, fake = test_labels == label, synth_labels == label
        if real.sum() > k and fake.sum() > k:
            rows.append({"label": label, "n_real": int(real.sum()), "n_synthetic": int(fake.sum()),
                         **prdc(test[real], synth[fake], k)})
    return pd.DataFrame(rows, columns=["label", "n_real", "n_synthetic", *PRDC_KEYS])
