"""The denoising loss, one definition for training and validation.

Per sample: MSE between the UNet's prediction and the target of the schedule's parameterisation
(the noise for epsilon, the velocity for v-prediction, noise - x0 for rectified flow), times the
min-SNR-gamma weight of its timestep (Hang et al. 2023; rectified flow trains unweighted, as SD 3).
A self-conditioned UNet (twice the latent channels in) first estimates the clean latent without
gradient for the samples in ``use_prev`` and gets that estimate as extra input; the others get
zeros, as at the first sampling step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from synthmed.diffusion.sample import is_self_conditioned, predicted_x0
from synthmed.diffusion.schedulers import flow_sigma, is_flow


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction (whose MSE is
    already SNR + 1 times the x0 error), min(SNR, gamma) for x0 ("sample") prediction; all ones when
    gamma is 0 (plain MSE) or the model is a rectified flow."""
    if gamma <= 0 or is_flow(scheduler):
        return torch.ones(len(t))
    snr = compute_snr(scheduler, t)
    floor = {"v_prediction": snr + 1, "sample": torch.ones_like(snr)}.get(scheduler.config.prediction_type, snr)
    return torch.clamp(snr, max=gamma) / floor


def diffusion_target(scheduler: DDPMScheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict for the schedule's prediction type."""
    if is_flow(scheduler):
        return noise - z0
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if kind == "sample":  # the clean input itself (Kandinsky's prior predicts the image embedding)
        return z0
    raise ValueError(f"prediction_type {kind!r} is not supported; use epsilon, v_prediction or sample")


def add_noise(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z0 noised to timesteps t: the DDPM marginal, or a flow model's straight line (1 - s) z0 + s noise."""
    if not is_flow(scheduler):
        return scheduler.add_noise(z0, noise, t)
    s = flow_sigma(scheduler, t).to(z0.dtype).view(-1, *[1] * (z0.ndim - 1))
    return (1 - s) * z0 + s * noise


def unet_input(unet: UNet2DConditionModel, noisy: torch.Tensor, x0_prev: torch.Tensor | None) -> torch.Tensor:
    """The noisy latents, plus the previous clean estimate (zeros when none) for a self-conditioned UNet."""
    if not is_self_conditioned(unet):
        return noisy
    return torch.cat([noisy, torch.zeros_like(noisy) if x0_prev is None else x0_prev], dim=1)


def self_condition_estimate(forward: Callable, unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                            noisy: torch.Tensor, t: torch.Tensor, cond: dict, use_prev: torch.Tensor | None
                            ) -> torch.Tensor | None:
    """x0 estimates from a gradient-free first pass for the rows in ``use_prev``, zeros elsewhere."""
    if use_prev is None or not use_prev.any():
        return None
    rows = use_prev.nonzero().flatten().to(noisy.device)
    x0_prev = torch.zeros_like(noisy)
    with torch.no_grad():
        first = forward(unet_input(unet, noisy[rows], None), t[rows.cpu()].to(noisy.device),
                        **{k: v[rows] for k, v in cond.items()}).sample
    x0_prev[rows] = predicted_x0(scheduler, noisy[rows], first.float(), t[rows.cpu()])
    return x0_prev


def diffusion_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, z0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor, cond: dict, *, min_snr_gamma: float = 0.0,
                   use_prev: torch.Tensor | None = None, forward: Callable | None = None) -> torch.Tensor:
    """Per-sample weighted loss [B] of clean scaled latents ``z0`` (CPU) noised with ``noise`` at ``t``.

    ``cond``: the UNet's conditioning kwargs on its device (encoder_hidden_states, encoder_attention_mask).
    ``use_prev``: bool [B], the samples that get a self-conditioning estimate (ignored unless the UNet
    is self-conditioned). ``forward``: what to call instead of ``unet`` (accelerate's wrapped model).
    """
    forward = forward or unet
    device = next(unet.parameters()).device
    noisy = add_noise(scheduler, z0, noise, t).to(device)
    target = diffusion_target(scheduler, z0, noise, t).to(device)
    x0_prev = (self_condition_estimate(forward, unet, scheduler, noisy, t, cond, use_prev)
               if is_self_conditioned(unet) else None)
    pred = forward(unet_input(unet, noisy, x0_prev), t.to(device), **cond).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return per_sample * min_snr_weights(scheduler, t, min_snr_gamma).to(device)
