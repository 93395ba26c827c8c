import pytest
import torch

from synthmed.metrics.similarity import PerceptualDistance, gaussian_filter, psnr, ssim
from synthmed.models.autoencoder import reconstruction_metrics


@pytest.mark.parametrize("channels, dims", [(1, 2), (3, 2), (1, 3)])
def test_separable_ssim_and_psnr_are_torchmetrics(channels, dims):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, channels, *(14,) * dims, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    reference = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    torch.testing.assert_close(ssim(y, x), reference, rtol=1e-6, atol=1e-8)
    dims_all = tuple(range(1, x.ndim))
    torch.testing.assert_close(psnr(y, x), peak_signal_noise_ratio(y, x, data_range=1.0, dim=dims_all, reduction="none"))


def test_reconstruction_metrics_of_a_perfect_and_a_noisy_reconstruction():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    noisy = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    perfect = reconstruction_metrics(images, images)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["mae"] == 0 and perfect["psnr"] == pytest.approx(100)
    worse = reconstruction_metrics(images, noisy)
    assert worse["ssim"] < 0.9 and 0 < worse["mae"] < 0.2 and 10 < worse["psnr"] < 30


def test_ssim_is_a_loss_with_gradients():
    x = torch.rand(2, 1, 12, 12, requires_grad=True)
    (1 - ssim(x, torch.rand(2, 1, 12, 12)).mean()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_perceptual_distance_ranks_blur_above_a_brightness_shift_of_equal_mse():
    """What the VAE's perceptual term is for: pixel losses score a blurred reconstruction like any other error of
    the same size; the perceptual distance finds lost edges worse than a uniform shift of equal MSE."""
    from sklearn.datasets import load_sample_image

    photo = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float().mean(0) / 255
    x = torch.nn.functional.interpolate(photo[None, None], size=(64, 64), mode="area")
    blurred = gaussian_filter(x, sigma=1.5, size=7)
    mse = (blurred - x).pow(2).mean()
    shifted = x + mse.sqrt()  # the same MSE, every edge kept
    assert torch.allclose((shifted - x).pow(2).mean(), mse)
    distance = PerceptualDistance()
    d_same, d_blur, d_shift = (float(distance(y, x)) for y in (x, blurred, shifted))
    assert d_same == 0 and d_blur > 3 * d_shift > 0
    y = blurred.clone().requires_grad_(True)
    distance(y, x).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in distance.parameters())
