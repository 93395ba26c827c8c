"""Sampling with classifier-free guidance; every image from its own seed."""

from __future__ import annotations

import inspect

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from synthmed.runtime import progress


def is_self_conditioned(unet: UNet2DConditionModel) -> bool:
    return unet.config.in_channels == 2 * unet.config.out_channels


def predicted_x0(scheduler, x_t: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor:
    """The clean-latent estimate implied by an epsilon or v prediction at timestep(s) t.

    Clamped because at high noise an epsilon model's x0 estimate amplifies its error
    ~1/sqrt(alpha_bar) times; the latents are scaled to unit variance, so +-4 loses nothing.
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
    lo = t.floor().long().clamp(0, len(scheduler.alphas_cumprod) - 1)
    hi = (lo + 1).clamp(max=len(scheduler.alphas_cumprod) - 1)
    frac = t - lo  # Euler's timesteps are fractional: interpolate between the integer ones
    ab = scheduler.alphas_cumprod.double()
    ab = ((1 - frac) * ab[lo] + frac * ab[hi]).to(x_t.device, x_t.dtype).view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * pred
    else:
        x0 = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
    return x0.clamp(-4, 4)


@torch.no_grad()
def sample_latents(unet: UNet2DConditionModel, scheduler: DDIMScheduler, cond_emb: torch.Tensor,
                   cond_mask: torch.Tensor, uncond_emb: torch.Tensor, uncond_mask: torch.Tensor,
                   seeds: list[int], num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
    """Denoise one latent per seed. cond_*: [N, L, D] / [N, L]; uncond_*: [1, L, D] / [1, L]."""
    device = next(unet.parameters()).device
    c, s = unet.config.out_channels, unet.config.sample_size
    self_cond = is_self_conditioned(unet)
    # Each image has its own CPU generator: its initial noise (and a stochastic sampler's noise)
    # depends on its seed alone, not on the batch it is in or on the device.
    gens = [torch.Generator().manual_seed(sd) for sd in seeds]
    latents = torch.stack([torch.randn((c, s, s), generator=g) for g in gens])
    scheduler.set_timesteps(num_inference_steps)  # first: init_noise_sigma depends on it (Euler)
    latents = latents.to(device) * scheduler.init_noise_sigma
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    n = len(seeds)
    emb = torch.cat([uncond_emb.expand(n, -1, -1), cond_emb]).to(device)
    mask = torch.cat([uncond_mask.expand(n, -1), cond_mask]).to(device)
    x0_prev = torch.zeros_like(latents)  # self-conditioning: the previous step's clean estimate
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        if self_cond:
            model_in = torch.cat([model_in, torch.cat([x0_prev, x0_prev])], dim=1)
        pred_u, pred_c = unet(model_in, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample.chunk(2)
        pred = pred_u + guidance_scale * (pred_c - pred_u)
        if self_cond:
            x0_prev = predicted_x0(scheduler, model_in[:n, :c], pred, t)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


@torch.no_grad()
def decode_to_uint8(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> uint8 images [N, C, H, W]."""
    device = next(vae.parameters()).device
    x = vae.decode(latents.to(device) / vae.config.scaling_factor).sample.cpu()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def generate_batches(unet, vae, scheduler, cond_emb, cond_mask, uncond_emb, uncond_mask, seeds,
                     num_inference_steps: int, guidance_scale: float, batch_size: int):
    """Yield (start index, uint8 images) per batch."""
    for i in progress(range(0, len(seeds), batch_size), desc="generate"):
        j = slice(i, i + batch_size)
        lat = sample_latents(unet, scheduler, cond_emb[j], cond_mask[j], uncond_emb, uncond_mask, seeds[j],
                             num_inference_steps, guidance_scale)
        yield i, decode_to_uint8(vae, lat)
