"""Distribution distances between image sets on a named feature space.

Features are extracted once per image set; torchmetrics' FID/KID then run on
those features through an identity extractor, so each set is embedded once no
matter how many comparisons use it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from synthmed.metrics.prdc import PRDC_KEYS, prdc
from synthmed.provenance import derive_seed
from synthmed.progress import progress


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
