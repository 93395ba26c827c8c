"""Text-conditioned latent diffusion training (epsilon objective, context dropout).

The training set is a table of (image index, caption index) pairs over latents
encoded once from the real training images: each step draws pairs, samples a
latent from the VAE posterior of *that image*, noises it and asks the UNet to
predict the noise given the caption's token embeddings. With probability
``context_dropout`` the caption is replaced by the empty caption, which teaches
the unconditional model that classifier-free guidance needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from synthmed.data.dataset import to_model_range
from synthmed.models.autoencoder import encode_posterior
from synthmed.runtime import progress
from synthmed.text.encoder import TextEncoder


@dataclass
class LatentPairs:
    latent_mean: torch.Tensor  # [N_images, C, h, w], unscaled VAE posterior mean
    latent_std: torch.Tensor  # [N_images, C, h, w]
    scaling_factor: float
    image_index: torch.Tensor  # [N_pairs] long
    caption_index: torch.Tensor  # [N_pairs] long, into text_emb
    text_emb: torch.Tensor  # [N_captions, L, D]; row `uncond_index` is the empty caption
    text_mask: torch.Tensor  # [N_captions, L]
    uncond_index: int


@dataclass
class LDMTrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    context_dropout: float
    sample_posterior: bool
    grad_clip: float


def build_latent_pairs(vae: AutoencoderKL, encoder: TextEncoder, pairs: pd.DataFrame,
                       images: torch.Tensor, file_names: list[str]) -> LatentPairs:
    """Encode each training image once and each unique caption once (plus the empty one)."""
    mean, std = encode_posterior(vae, to_model_range(images))
    index_of = {name: i for i, name in enumerate(file_names)}
    captions = [""] + sorted(pairs["text"].unique())
    caption_of = {c: i for i, c in enumerate(captions)}
    emb, mask = encoder.encode(captions)
    return LatentPairs(
        latent_mean=mean, latent_std=std, scaling_factor=float(vae.config.scaling_factor),
        image_index=torch.tensor([index_of[f] for f in pairs["file_name"]]),
        caption_index=torch.tensor([caption_of[c] for c in pairs["text"]]),
        text_emb=emb, text_mask=mask, uncond_index=0,
    )


def make_noise_scheduler(num_train_timesteps: int, prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False)


def draw_batch(data: LatentPairs, cfg: LDMTrainConfig, generator: torch.Generator):
    """Clean scaled latents and caption rows for one step (CPU tensors)."""
    pick = torch.randint(len(data.image_index), (cfg.batch_size,), generator=generator)
    img = data.image_index[pick]
    cap = data.caption_index[pick].clone()
    drop = torch.rand(cfg.batch_size, generator=generator) < cfg.context_dropout
    cap[drop] = data.uncond_index
    z = data.latent_mean[img]
    if cfg.sample_posterior:
        z = z + data.latent_std[img] * torch.randn(z.shape, generator=generator)
    return z * data.scaling_factor, cap


def train_ldm(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: LatentPairs,
              cfg: LDMTrainConfig, generator: torch.Generator) -> list[dict]:
    device = next(unet.parameters()).device
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    unet.train()
    log = []
    for step in progress(range(cfg.steps), desc="train_ldm"):
        z0, cap = draw_batch(data, cfg, generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
        noisy = scheduler.add_noise(z0, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
        pred = unet(noisy.to(device), t.to(device), encoder_hidden_states=data.text_emb[cap].to(device),
                    encoder_attention_mask=data.text_mask[cap].to(device)).sample
        loss = F.mse_loss(pred.float(), target.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        log.append({"step": step, "loss": loss.item()})
    unet.eval()
    return log
