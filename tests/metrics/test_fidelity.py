import math

import pytest
import torch

from synthmed.metrics.fidelity import (fidelity_with_reference, frechet_distance, frechet_extrapolated,
                                      kernel_distance, resampled_interval, set_figures)


def test_distances_are_zero_for_the_same_set_and_grow_with_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g, dtype=torch.float64)
    b = torch.randn(200, 16, generator=g, dtype=torch.float64)
    near, far = frechet_distance(a, b), frechet_distance(a, b + 1.0)
    assert frechet_distance(a, a) < 1e-6
    assert 0 < near < far and abs(far - near - 16.0) < 2.0  # mean shift of 1 in 16 dims adds 16
    k_near, _, size = kernel_distance(a, b, subset_size=500, subsets=20, seed=0)
    k_far, _, _ = kernel_distance(a, b + 1.0, subset_size=500, subsets=20, seed=0)
    assert size == 100 and k_near < k_far  # a subset is at most half the set
    assert kernel_distance(a, b, 50, 10, seed=1) == kernel_distance(a, b, 50, 10, seed=1)


def _torchmetrics(metric_class, real, fake, **kwargs):
    class Precomputed(torch.nn.Identity):
        num_features = real.shape[1]

    metric = metric_class(feature=Precomputed(), **kwargs)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute()


@pytest.mark.parametrize("n_real, n_fake, dims", [(46, 40, 128), (300, 250, 24), (30, 500, 64)])
def test_frechet_distance_is_torchmetrics_fid_in_the_sample_and_the_feature_space(n_real, n_fake, dims):
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(n_real)
    real = torch.randn(n_real, dims, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(n_fake, dims, generator=g, dtype=torch.float64) @ torch.randn(dims, dims, generator=g,
                                                                                      dtype=torch.float64) / dims**0.5 + 0.3
    reference = float(_torchmetrics(FrechetInceptionDistance, real, fake))
    assert frechet_distance(real, fake) == pytest.approx(reference, rel=1e-6)


def test_kernel_distance_is_torchmetrics_kid_with_the_same_seed():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(60, 32, generator=g, dtype=torch.float64), torch.randn(50, 32, generator=g, dtype=torch.float64) + 0.2
    torch.manual_seed(11)  # torchmetrics draws its subsets from the global generator
    mean, std = _torchmetrics(KernelInceptionDistance, real, fake, subsets=7, subset_size=20)
    assert kernel_distance(real, fake, 20, 7, seed=11)[:2] == pytest.approx((float(mean), float(std)), rel=1e-9)


def test_kid_subsets_are_proper_subsets_whose_spread_is_real():
    """At the demo's 46 test images a 50-image subset would be the whole set every time (std 3.6e-16)."""
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(46, 32, generator=g, dtype=torch.float64), torch.randn(46, 32, generator=g, dtype=torch.float64)
    mean, std, size = kernel_distance(real, fake, subset_size=50, subsets=30, seed=0)
    assert size == 23 and std > 1e-4


def test_the_resampled_interval_holds_the_figure_and_narrows_with_more_images():
    g = torch.Generator().manual_seed(2)
    widths = []
    for n in (40, 400):
        real = torch.randn(n, 8, generator=g, dtype=torch.float64)
        fake = torch.randn(n, 8, generator=g, dtype=torch.float64) + 0.5

        def figures(r, f):
            return {"kid": kernel_distance(r, f, n, 5, seed=0)[0], "fd": frechet_distance(r, f)}

        point = figures(real, fake)
        ci = resampled_interval(real, fake, figures, point, draws=60, seed=1)
        assert ci == resampled_interval(real, fake, figures, point, draws=60, seed=1)  # seeded
        assert all(ci[k][0] < point[k] < ci[k][1] for k in point), (ci, point)
        widths.append(ci["fd"][1] - ci["fd"][0])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 10x the images, about a third of the width


def test_fd_infinity_removes_the_sample_size_bias():
    """Two Gaussians that differ by a mean shift of 1 in 4 of 64 dimensions: FD is 4 at infinite n; at n = 120 the
    covariance estimates add a bias that falls as 1/n, which the extrapolation takes out."""
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(64, dtype=torch.float64)
    shift[:4] = 1
    real = torch.randn(120, 64, generator=g, dtype=torch.float64)
    fake = torch.randn(120, 64, generator=g, dtype=torch.float64) + shift
    at_n, at_infinity = frechet_distance(real, fake), frechet_extrapolated(real, fake, seed=0)
    assert abs(at_infinity - 4) < abs(at_n - 4) / 3, (at_n, at_infinity)


def test_fidelity_says_what_it_rests_on():
    g = torch.Generator().manual_seed(1)
    test, synth, train = (torch.randn(n, 40, generator=g, dtype=torch.float64) for n in (30, 24, 60))
    out = fidelity_with_reference(test, synth, train, kid_subset_size=50, kid_subsets=10, prdc_k=3, seed=0,
                                  resamples=10)
    assert out["fd_n"] == 24 and out["fd_dims"] == 40 and out["fd_reliable"] == 0  # fewer images than dimensions
    assert out["kid_subset_size"] == 12 and out["n_real_reference"] == 24
    for key in ("fd_effnet", "kid_effnet", "precision", "recall", "fd_effnet_real_train_vs_test"):
        assert out[f"{key}_ci_low"] <= out[f"{key}_ci_high"]
    assert set_figures(test, synth, 50, 10, 3, 0)["kid_effnet"] == out["kid_effnet"]


@pytest.mark.parametrize("figure, shift", [("mean_gap", 0.5), ("squared_gap", 0.5), ("squared_gap", 0.0)])
def test_resampled_intervals_cover_the_truth_at_their_level(figure, shift):
    """300 replicate pairs of sets from known Gaussians: the share of 95 % intervals holding the true value. A mean
    difference and a squared mean distance between shifted sets vary as 1/n (first order): their intervals cover
    about 95 %; the squared distance of two sets from one distribution varies as 1/n^2 (as FD and KID of real vs
    real), and half-samples overstate that spread: conservative. The sqrt(b/n) scaling covered about 84 %."""
    dims, n = 4, 60
    truth = {"mean_gap": -shift, "squared_gap": dims * shift**2 + 2 * dims / n}  # E|m_r - m_f|^2 at n per set

    def figures(r, f):
        gap = r.mean(0) - f.mean(0)
        return {"mean_gap": float(gap[0]), "squared_gap": float(gap.pow(2).sum())}

    g = torch.Generator().manual_seed(0)
    inside = []
    for rep in range(300):
        real = torch.randn(n, dims, generator=g, dtype=torch.float64)
        fake = torch.randn(n, dims, generator=g, dtype=torch.float64) + shift
        low, high = resampled_interval(real, fake, figures, figures(real, fake), draws=60, seed=rep)[figure]
        inside.append(low <= truth[figure] <= high)
    assert 0.90 <= sum(inside) / len(inside) <= (1.0 if shift == 0 else 0.99), sum(inside) / len(inside)


def test_resampling_by_group_keeps_correlated_images_together():
    """Images in groups of 5 that share most of their value: resampled image by image the interval is too narrow
    (the images are not independent); by group it is about sqrt(5) times wider."""
    g = torch.Generator().manual_seed(1)
    groups = torch.arange(100) // 5
    real = (torch.randn(20, 1, generator=g, dtype=torch.float64)[groups] + 0.1 * torch.randn(100, 1, generator=g,
                                                                                               dtype=torch.float64))
    fake = torch.randn(100, 1, generator=g, dtype=torch.float64)

    def figures(r, f):
        return {"gap": float(r.mean() - f.mean())}

    point = figures(real, fake)
    by_image = resampled_interval(real, fake, figures, point, draws=80, seed=0)["gap"]
    by_group = resampled_interval(real, fake, figures, point, draws=80, seed=0, groups=(groups.numpy(), None))["gap"]
    assert (by_group[1] - by_group[0]) > 1.5 * (by_image[1] - by_image[0])
    one = resampled_interval(real, fake, figures, point, draws=5, seed=0, groups=(["a"] * 100, None))["gap"]
    assert all(map(math.isnan, one))  # a set of one group has no spread to resample
