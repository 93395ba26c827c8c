"""Sampling with classifier-free guidance; every image from its own generator (seed)."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from synthmed.diffusion.schedulers import flow_sigma, is_flow


def pack_latents(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] VAE latents -> [N, C * patch**2, H / patch, W / patch]: each patch x patch block of
    latent pixels becomes one position of the diffusion model's grid (as DiT's patch size and Flux's
    latent packing do). The VAE keeps its fine latent grid (sharp reconstructions) while the UNet runs
    on a coarser one (quadratically cheaper convolutions and attention). Volumes [N, C, D, H, W] pack
    patch**3 blocks the same way."""
    if patch == 1:
        return latents
    if latents.ndim == 4:
        return F.pixel_unshuffle(latents, patch)
    n, c, d, h, w = latents.shape
    x = latents.reshape(n, c, d // patch, patch, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, c * patch**3, d // patch, h // patch, w // patch)


def latent_patch(vae: AutoencoderKL, packed: int, dims: int) -> int:
    """The patch size that packs the VAE's latent channels into ``packed`` UNet channels (pack_latents)."""
    c = vae.config.latent_channels
    patch = round((packed // c) ** (1 / dims))
    if patch**dims * c != packed:
        raise ValueError(f"{packed} latent channels cannot be unpacked for a VAE with {c}: the UNet and the VAE "
                         "do not belong together")
    return patch


def unpack_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_latents; the patch size follows from the VAE's latent channels."""
    c, dims = vae.config.latent_channels, latents.ndim - 2
    patch = latent_patch(vae, latents.shape[1], dims)
    if patch == 1:
        return latents
    if dims == 2:
        return F.pixel_shuffle(latents, patch)
    n, _, d, h, w = latents.shape
    x = latents.reshape(n, c, patch, patch, patch, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(n, c, d * patch, h * patch, w * patch)


def spatial_dims(unet: UNet2DConditionModel) -> int:
    """2 for images, 3 for a volume model (its config says dims=3; diffusers' UNets have no such key)."""
    return getattr(unet.config, "dims", 2)


def is_self_conditioned(unet: UNet2DConditionModel) -> bool:
    return unet.config.in_channels == 2 * unet.config.out_channels


def predicted_x0(scheduler, x_t: torch.Tensor, pred: torch.Tensor, t) -> torch.Tensor:
    """The clean-latent estimate implied by an epsilon, v or flow prediction at timestep(s) t.

    Clamped because at high noise an epsilon model's x0 estimate amplifies its error
    ~1/sqrt(alpha_bar) times; the latents are scaled to unit variance, so +-4 loses nothing.
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
    if is_flow(scheduler):  # x_t = (1 - s) x0 + s noise, pred = noise - x0
        s = flow_sigma(scheduler, t).to(x_t.device, x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        return (x_t - s * pred).clamp(-4, 4)
    lo = t.floor().long().clamp(0, len(scheduler.alphas_cumprod) - 1)
    hi = (lo + 1).clamp(max=len(scheduler.alphas_cumprod) - 1)
    frac = t - lo  # Euler's timesteps are fractional: interpolate between the integer ones
    ab = scheduler.alphas_cumprod.double()
    ab = ((1 - frac) * ab[lo] + frac * ab[hi]).to(x_t.device, x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
    if scheduler.config.prediction_type == "v_prediction":
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * pred
    else:
        x0 = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
    return x0.clamp(-4, 4)


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: its noise depends on its seed alone, not on the batch it is in
    or on the device."""
    return [torch.Generator().manual_seed(int(sd)) for sd in seeds]


@torch.no_grad()
def sample_latents(unet: UNet2DConditionModel, scheduler, cond_emb: torch.Tensor, cond_mask: torch.Tensor,
                   uncond_emb: torch.Tensor, uncond_mask: torch.Tensor, generators: list[torch.Generator],
                   num_inference_steps: int, guidance_scale: float,
                   progress: Callable[[Iterable], Iterable] | None = None) -> torch.Tensor:
    """Denoise one latent per generator with classifier-free guidance.

    cond_*: [N, L, D] / [N, L]; uncond_* (the empty or negative prompt): [1 or N, L, D] / [1 or N, L].
    ``generators``: one per image; image i's initial noise (and a stochastic sampler's noise) comes
    from generators[i] alone. One generator listed N times serves the N images in turn instead.
    """
    device = next(unet.parameters()).device
    c, s = unet.config.out_channels, unet.config.sample_size
    shape = (c,) + (s,) * spatial_dims(unet)
    self_cond = is_self_conditioned(unet)
    n = len(generators)
    latents = torch.stack([torch.randn(shape, generator=g, device=g.device).to(device) for g in generators])
    scheduler.set_timesteps(num_inference_steps)  # first: init_noise_sigma depends on it (Euler)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow samplers start at unit noise
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    emb = torch.cat([uncond_emb.expand(n, -1, -1), cond_emb]).to(device)
    mask = torch.cat([uncond_mask.expand(n, -1), cond_mask]).to(device)
    x0_prev = torch.zeros_like(latents)  # self-conditioning: the previous step's clean estimate
    for t in (progress or iter)(scheduler.timesteps):
        model_in = scale(torch.cat([latents, latents]), t)
        if self_cond:
            model_in = torch.cat([model_in, torch.cat([x0_prev, x0_prev])], dim=1)
        pred_u, pred_c = unet(model_in, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample.chunk(2)
        pred = pred_u + guidance_scale * (pred_c - pred_u)
        if self_cond:
            x0_prev = predicted_x0(scheduler, model_in[:n, :c], pred, t)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled (and possibly packed) latents -> images in [-1, 1], [N, C, H, W] float on the CPU."""
    device = next(vae.parameters()).device
    latents = unpack_latents(vae, latents)
    return vae.decode(latents.to(device) / vae.config.scaling_factor).sample.float().cpu().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 [N, C, H, W]."""
    return ((images + 1) * 127.5).round().to(torch.uint8)


def decode_to_uint8(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> uint8 images [N, C, H, W]."""
    return to_uint8(decode(vae, latents))
