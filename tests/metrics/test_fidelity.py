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
