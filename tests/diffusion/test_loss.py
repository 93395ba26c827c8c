"""The denoising loss shared by training and validation: min-SNR weights, v-prediction target,
self-conditioning, against closed forms and direct UNet calls (real tiny diffusers models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synthmed.diffusion.loss import diffusion_loss, min_snr_weights
from synthmed.diffusion.sample import predicted_x0
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.models.unet import build_unet
from tests.helpers import tiny_unet

T = torch.tensor([0, 1, 10, 100, 250, 500, 750, 999])


def closed_form_snr(scheduler, t: torch.Tensor) -> torch.Tensor:
    ab = scheduler.alphas_cumprod.double()[t]
    return ab / (1 - ab)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_the_closed_form(gamma):
    eps, v = make_noise_scheduler(1000, "epsilon"), make_noise_scheduler(1000, "v_prediction")
    snr = closed_form_snr(eps, T)
    assert (snr > gamma).any() and (snr < gamma).any()  # both branches of the min are exercised
    expected_eps = torch.clamp(snr, max=gamma) / snr
    expected_v = torch.clamp(snr, max=gamma) / (snr + 1)
    assert torch.allclose(min_snr_weights(eps, T, gamma).double(), expected_eps, rtol=1e-5)
    assert torch.allclose(min_snr_weights(v, T, gamma).double(), expected_v, rtol=1e-5)
    assert torch.equal(min_snr_weights(eps, T, 0.0), torch.ones(len(T)))  # gamma 0: plain MSE


def _batch(n=len(T), seed=0):
    g = torch.Generator().manual_seed(seed)
    z0, noise = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(n, 5, 384, generator=g),
            "encoder_attention_mask": torch.ones(n, 5, dtype=torch.long)}
    return z0, noise, cond


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_is_the_weighted_mse_to_the_parameterisation_target(kind):
    unet, sched = tiny_unet().eval(), make_noise_scheduler(1000, kind)
    z0, noise, cond = _batch()
    with torch.no_grad():
        got = diffusion_loss(unet, sched, z0, noise, T, cond, min_snr_gamma=5.0)
        pred = unet(sched.add_noise(z0, noise, T), T, **cond).sample
    target = noise if kind == "epsilon" else sched.get_velocity(z0, noise, T)
    if kind == "v_prediction":  # v = sqrt(ab) noise - sqrt(1 - ab) x0, written out
        ab = sched.alphas_cumprod[T].view(-1, 1, 1, 1)
        assert torch.allclose(target, ab.sqrt() * noise - (1 - ab).sqrt() * z0, atol=1e-6)
    snr = closed_form_snr(sched, T)
    weight = torch.clamp(snr, max=5.0) / (snr + 1 if kind == "v_prediction" else snr)
    expected = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weight.float()
    assert got.shape == (len(T),)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_self_conditioning_feeds_the_first_pass_estimate_to_the_chosen_samples_only():
    torch.manual_seed(0)
    unet = build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                      cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8, dropout=0.0,
                      self_condition=True).eval()
    sched = make_noise_scheduler(1000, "v_prediction")
    z0, noise, cond = _batch()
    use_prev = torch.tensor([True, False, True, True, False, False, True, False])
    with torch.no_grad():
        got = diffusion_loss(unet, sched, z0, noise, T, cond, use_prev=use_prev)
        noisy = sched.add_noise(z0, noise, T)
        rows = use_prev.nonzero().flatten()
        first = unet(torch.cat([noisy[rows], torch.zeros_like(noisy[rows])], 1), T[rows],
                     **{k: v[rows] for k, v in cond.items()}).sample
        prev = torch.zeros_like(noisy)
        prev[rows] = predicted_x0(sched, noisy[rows], first, T[rows])
        pred = unet(torch.cat([noisy, prev], 1), T, **cond).sample
        none = diffusion_loss(unet, sched, z0, noise, T, cond, use_prev=None)
        zero_pred = unet(torch.cat([noisy, torch.zeros_like(noisy)], 1), T, **cond).sample
    expected = F.mse_loss(pred, sched.get_velocity(z0, noise, T), reduction="none").mean(dim=(1, 2, 3))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    # without estimates every sample sees zeros, as at the first sampling step
    expected_none = F.mse_loss(zero_pred, sched.get_velocity(z0, noise, T), reduction="none").mean(dim=(1, 2, 3))
    assert torch.allclose(none, expected_none, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got[~use_prev], none[~use_prev], rtol=1e-5)
    assert not torch.allclose(got[use_prev], none[use_prev], rtol=1e-3)
