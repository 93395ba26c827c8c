import pytest
import torch

from synthmed.metrics.fidelity import frechet_distance, kernel_distance


def test_distances_are_zero_for_the_same_set_and_grow_with_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g, dtype=torch.float64)
    b = torch.randn(200, 16, generator=g, dtype=torch.float64)
    near, far = frechet_distance(a, b), frechet_distance(a, b + 1.0)
    assert frechet_distance(a, a) < 1e-6
    assert 0 < near < far and abs(far - near - 16.0) < 2.0  # mean shift of 1 in 16 dims adds 16
    k_near, _, size = kernel_distance(a, b, subset_size=500, subsets=20, seed=0)
    k_far, _, _ = kernel_distance(a, b + 1.0, subset_size=500, subsets=20, seed=0)
    assert size == 200 and k_near < k_far
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
