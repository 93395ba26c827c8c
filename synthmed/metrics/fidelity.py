"""Distribution distances between image sets on a named feature space.

Features are extracted once per image set (feature_cache); the distances run on those features, so each
set is embedded once no matter how many comparisons use it. FD and KID are torchmetrics' definitions
(tested against it), computed without its import (4-5 s per process) and, for FD, exactly in whichever of
the feature or the sample space is smaller: at n = 46 images of 3 x 1,280-d plane features, a 46 x 46
problem in place of a 3,840 x 3,840 non-symmetric eigendecomposition.
"""

from __future__ import annotations

from statistics import NormalDist

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
    """Unbiased MMD^2 under the cubic polynomial kernel (x.y / D + 1)^3 of KID (Binkowski et al. 2018), of each
    pair of subsets x[s], y[s] ([subsets, m, D] each)."""
    kernel = lambda p, q: (p @ q.transpose(1, 2) / x.shape[-1] + 1) ** 3  # noqa: E731
    m = x.shape[1]
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within = (k_xx.sum((1, 2)) - k_xx.diagonal(dim1=1, dim2=2).sum(1) + k_yy.sum((1, 2))
              - k_yy.diagonal(dim1=1, dim2=2).sum(1)) / (m * (m - 1))
    return within - 2 * kernel(x, y).mean((1, 2))


KID_BLOCK = 2**25  # kernel entries computed at once (256 MB of float64)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int,
                    seed: int) -> tuple[float, float, int]:
    """KID mean and std over random subsets (each drawn without replacement from both sets; seeded). A subset
    is a proper one, at most half the smaller set: at the whole set every subset would be the same, and the
    spread a fake 0. The subsets are computed as a batch, KID_BLOCK kernel entries at a time."""
    size = max(2, min(subset_size, len(real) // 2, len(fake) // 2))
    g = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    picks = [(torch.randperm(len(real), generator=g)[:size], torch.randperm(len(fake), generator=g)[:size])
             for _ in range(subsets)]  # drawn in torchmetrics' order: real then fake, subset by subset
    per_block = max(1, KID_BLOCK // (3 * size * size))
    values = torch.cat([_mmd2(real[torch.stack([r for r, _ in picks[i : i + per_block]])],
                              fake[torch.stack([f for _, f in picks[i : i + per_block]])])
                        for i in range(0, subsets, per_block)])
    return float(values.mean()), float(values.std(unbiased=False)), size  # torchmetrics: the population std


def set_figures(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int, kid_subsets: int, prdc_k: int,
                seed: int) -> dict[str, float]:
    """FD, KID (with its subsets' spread) and PRDC of ``fake`` against ``real`` features."""
    mean, std, size = kernel_distance(real, fake, kid_subset_size, kid_subsets, seed)
    return {"fd_effnet": frechet_distance(real, fake), "kid_effnet": mean, "kid_effnet_std": std,
            "kid_subset_size": size, **prdc(real, fake, prdc_k)}


def group_codes(groups, n: int) -> np.ndarray:
    """Integer group codes of ``n`` rows: the rows' leakage units (patient, volume, source image), each row its own
    group when ``groups`` is None."""
    if groups is None:
        return np.arange(n)
    return pd.factorize(pd.Series(np.asarray(groups), dtype="string").fillna(""))[0]


def draw_groups(codes: np.ndarray, share: float, least: int, g: torch.Generator) -> tuple[torch.Tensor, int, int]:
    """Rows of a random ``share`` of the groups, drawn without replacement (more groups while fewer than ``least``
    rows, never all of them); with the number of groups drawn and of groups in all."""
    n_groups = int(codes.max()) + 1
    order = torch.randperm(n_groups, generator=g).numpy()
    sizes = np.bincount(codes, minlength=n_groups)[order]
    take = min(max(int(n_groups * share), int(np.searchsorted(np.cumsum(sizes), least)) + 1), n_groups - 1)
    chosen = np.zeros(n_groups, bool)
    chosen[order[:take]] = True
    return torch.from_numpy(np.flatnonzero(chosen[codes])), take, n_groups


def resampled_interval(real: torch.Tensor, fake: torch.Tensor, figures, point: dict[str, float], draws: int,
                       seed: int, least: int = 2, level: float = 0.95, groups: tuple = (None, None)
                       ) -> dict[str, tuple[float, float]]:
    """A ``level`` interval for each figure ``figures(real, fake)`` returns (``point``: its value on the full sets),
    by half-sampling: ``draws`` times (seeded) half of each set's groups (``groups``: a label per row of real and
    of fake, e.g. patient; None: each image its own) drawn without replacement. The standard error is the halves'
    standard deviation scaled by sqrt(b / (G - b)) (b of G groups drawn: 1 at b = G/2); the interval is the full
    sets' figure +- z times it.

    That is the delete-d jackknife with d = n/2: a half drawn without replacement varies about as much as the full
    sets' figure (the finite-population factor); Politis & Romano's sqrt(b/n) holds only for b/n -> 0 and made
    intervals 0.71x too narrow. The interval is symmetric, not the halves' reflected quantiles: a figure near its
    bound (recall near 1) has skewed halves whose reflected tail points away from the truth (coverage 0.81 against
    0.94). Coverage is measured by benchmarks/coverage.py (docs/benchmarks.md): near 95 % where a figure's spread is
    first order (a real difference between the sets); wider than needed for FD and KID of two sets from one
    distribution, whose spread falls as 1/n (real train vs test). The plain bootstrap (draws with replacement)
    repeats images, which moves FD, KID and the nearest-neighbour figures themselves. Every half keeps at least
    ``least`` images (PRDC's k + 1); a set with a single group has no interval (NaN)."""
    codes = [group_codes(x, len(s)) for x, s in zip(groups, (real, fake))]
    if min(int(c.max()) + 1 for c in codes) < 2:
        return {k: (float("nan"), float("nan")) for k in point}
    g = torch.Generator().manual_seed(derive_seed(seed, "resampled_interval"))
    samples: dict[str, list[float]] = {}
    factors = []
    for _ in range(draws):
        (r, br, gr), (f, bf, gf) = draw_groups(codes[0], 0.5, least, g), draw_groups(codes[1], 0.5, least, g)
        factors.append((br / (gr - br) + bf / (gf - bf)) / 2)
        for key, value in figures(real[r], fake[f]).items():
            samples.setdefault(key, []).append(value)
    half = float(np.mean(factors)) ** 0.5 * NormalDist().inv_cdf(0.5 + level / 2)
    return {key: (point[key] - half * float(np.std(values)), point[key] + half * float(np.std(values)))
            for key, values in samples.items()}


def frechet_extrapolated(real: torch.Tensor, fake: torch.Tensor, seed: int, fractions=(0.5, 0.625, 0.75, 0.875, 1.0),
                         repeats: int = 5) -> float:
    """FD at infinite sample size (Chong & Forsyth 2020, FD-infinity): FD on seeded subsets of both sets at
    several sizes N, fitted linearly against 1/N; the intercept. FD's bias falls as 1/N, so this removes the
    part of the figure that is the sample size's, not the generator's."""
    g = torch.Generator().manual_seed(derive_seed(seed, "fd_infinity"))
    n = min(len(real), len(fake))
    xs, ys = [], []
    for fraction in fractions:
        size = max(2, round(fraction * n))
        for _ in range(1 if size == n == len(real) == len(fake) else repeats):
            r = real[torch.randperm(len(real), generator=g)[:size]]
            f = fake[torch.randperm(len(fake), generator=g)[:size]]
            xs.append(1 / size)
            ys.append(frechet_distance(r, f))
    return float(np.polyfit(xs, ys, 1)[1])


RANGES = {"precision": (0, 1), "recall": (0, 1), "coverage": (0, 1), "f1_pr": (0, 1), "density": (0, np.inf),
          "fd_effnet": (0, np.inf)}


def fidelity_with_reference(test: torch.Tensor, synth: torch.Tensor, train: torch.Tensor, kid_subset_size: int,
                            kid_subsets: int, prdc_k: int, seed: int, resamples: int = 0,
                            groups: dict | None = None) -> dict[str, float]:
    """FD/KID/PRDC of synthetic vs real test features, each beside real train vs real test (`_real_train_vs_test`),
    with FD-infinity, the sizes they rest on, and (``resamples`` draws) 95 % intervals from resampling the images
    (`_ci_low`, `_ci_high`; resampled_interval) by group: ``groups`` maps "test", "synth" and "train" to a label per
    row (patient, volume, source image; a set left out: each image its own).

    The real reference is a seeded random subset of train as large as the synthetic set: FD and PRDC
    depend on sample size, so only equal sizes compare. FD needs far more images than feature dimensions
    (each covariance has rank < n): `fd_reliable` is 0 when the smaller set has fewer images than
    five times the dimensions (FID's authors ask for 10,000 images in 2,048), and FD's figures then measure n as
    much as the generator. Raises ValueError when a set is too small for k.
    """
    n = min(len(synth), len(train))
    rng = np.random.default_rng(derive_seed(seed, "fidelity_reference"))
    pick = np.sort(rng.choice(len(train), n, replace=False))
    fd_n = min(len(test), n)
    out: dict[str, float] = {"n_real_reference": n, "fd_n": fd_n, "fd_dims": int(test.shape[1]),
                             "fd_reliable": int(fd_n >= 5 * test.shape[1])}

    def figures(real, fake):  # those with an interval (the subsets' spread and size have none)
        return {k: v for k, v in set_figures(real, fake, kid_subset_size, kid_subsets, prdc_k, seed).items()
                if k not in ("kid_effnet_std", "kid_subset_size")}

    groups = groups or {}
    train_groups = None if groups.get("train") is None else np.asarray(groups["train"])[pick]
    for suffix, fake, fake_groups in (("", synth, groups.get("synth")), ("_real_train_vs_test", train[pick], train_groups)):
        point = set_figures(test, fake, kid_subset_size, kid_subsets, prdc_k, seed)
        out.update({f"{k}{suffix}": v for k, v in point.items()})
        out[f"fd_effnet_inf{suffix}"] = frechet_extrapolated(test, fake, seed)
        if resamples:
            for k, (low, high) in resampled_interval(test, fake, figures, point, resamples, seed, prdc_k + 1,
                                                   groups=(groups.get("test"), fake_groups)).items():
                floor, ceiling = RANGES.get(k, (-np.inf, np.inf))  # a share's interval stays a share
                out[f"{k}{suffix}_ci_low"], out[f"{k}{suffix}_ci_high"] = max(low, floor), min(high, ceiling)
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
