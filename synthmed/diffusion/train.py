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
from typing import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from synthmed.data.dataset import to_model_range
from synthmed.diffusion.checkpoint import capture, load_latest, restore, save_checkpoint
from synthmed.models.autoencoder import encode_posterior
from synthmed.runtime import progress
from synthmed.text.encoder import TextEncoder


@dataclass
class LatentPairs:
    latent_mean: torch.Tensor  # [N_images * variants, C, h, w], unscaled VAE posterior mean
    latent_std: torch.Tensor  # [N_images * variants, C, h, w]
    scaling_factor: float
    image_index: torch.Tensor  # [N_pairs] long
    caption_index: torch.Tensor  # [N_pairs] long, into text_emb
    text_emb: torch.Tensor  # [N_captions, L, D]; row `uncond_index` is the empty caption
    text_mask: torch.Tensor  # [N_captions, L]
    uncond_index: int
    variants: int = 1  # encodings per image: the original, then brightness/contrast-augmented copies


@dataclass
class LDMTrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    context_dropout: float
    sample_posterior: bool
    grad_clip: float
    warmup_steps: int  # linear warm-up, then cosine decay to 0
    ema_decay: float  # 0 = no EMA; sampling uses the EMA weights when on
    min_snr_gamma: float  # 0 = plain MSE; e.g. 5 = min-SNR-gamma loss weighting
    checkpoint_every: int  # 0 = no checkpoints
    keep_checkpoints: int


def brightness_contrast(images: torch.Tensor, brightness: float, contrast: float,
                        generator: torch.Generator) -> torch.Tensor:
    """Random brightness shift and contrast scaling of images in [-1, 1]; never flips (prompts encode
    position and side)."""
    n = len(images)
    b = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * brightness * 2  # [-1, 1] range is 2 wide
    c = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * contrast
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * c + mean + b).clamp(-1, 1)


def build_latent_pairs(vae: AutoencoderKL, encoder: TextEncoder, pairs: pd.DataFrame, images: torch.Tensor,
                       file_names: list[str], augment_copies: int = 0, brightness: float = 0.0,
                       contrast: float = 0.0, generator: torch.Generator | None = None) -> LatentPairs:
    """Encode each training image once and each unique caption once (plus the empty one).

    With ``augment_copies`` each image is also encoded that many times with random
    brightness/contrast, once, here: augmentation costs nothing per training step.
    """
    x = to_model_range(images)
    views = [x] + [brightness_contrast(x, brightness, contrast, generator) for _ in range(augment_copies)]
    # interleave so that the encodings of image i are rows i*V .. i*V + V-1
    mean, std = encode_posterior(vae, torch.stack(views, dim=1).flatten(0, 1))
    index_of = {name: i for i, name in enumerate(file_names)}
    captions = [""] + sorted(pairs["text"].unique())
    caption_of = {c: i for i, c in enumerate(captions)}
    emb, mask = encoder.encode(captions)
    return LatentPairs(
        latent_mean=mean, latent_std=std, scaling_factor=float(vae.config.scaling_factor),
        image_index=torch.tensor([index_of[f] for f in pairs["file_name"]]),
        caption_index=torch.tensor([caption_of[c] for c in pairs["text"]]),
        text_emb=emb, text_mask=mask, uncond_index=0, variants=len(views),
    )


def make_noise_scheduler(num_train_timesteps: int, prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="scaled_linear",
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False)


def draw_batch(data: LatentPairs, cfg: LDMTrainConfig, generator: torch.Generator):
    """Clean scaled latents and caption rows for one step (CPU tensors)."""
    pick = torch.randint(len(data.image_index), (cfg.batch_size,), generator=generator)
    img = data.image_index[pick] * data.variants
    if data.variants > 1:  # a random view of each image (the original or an augmented copy)
        img = img + torch.randint(data.variants, (cfg.batch_size,), generator=generator)
    cap = data.caption_index[pick].clone()
    drop = torch.rand(cfg.batch_size, generator=generator) < cfg.context_dropout
    cap[drop] = data.uncond_index
    z = data.latent_mean[img]
    if cfg.sample_posterior:
        z = z + data.latent_std[img] * torch.randn(z.shape, generator=generator)
    return z * data.scaling_factor, cap


def _loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weighting (Hang et al. 2023), normalised for the prediction type."""
    if gamma <= 0:
        return torch.ones(len(t))
    snr = compute_snr(scheduler, t)
    weight = torch.clamp(snr, max=gamma) / snr
    return weight * snr / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weight


class NonFiniteLoss(RuntimeError):
    pass


@torch.no_grad()
def validation_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: LatentPairs,
                    batch_size: int = 64) -> float:
    """Denoising loss on held-out latents with fixed noise and timesteps (its own generator,
    so the training RNG stream, and thus resumed runs, stay untouched)."""
    g = torch.Generator().manual_seed(1234)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total, count = 0.0, 0
    for i in range(0, len(data.image_index), batch_size):
        img = data.image_index[i : i + batch_size] * data.variants
        cap = data.caption_index[i : i + batch_size]
        z0 = data.latent_mean[img] * data.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(z0),), generator=g)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
        pred = unet(scheduler.add_noise(z0, noise, t).to(device), t.to(device),
                    encoder_hidden_states=data.text_emb[cap].to(device),
                    encoder_attention_mask=data.text_mask[cap].to(device)).sample
        total += F.mse_loss(pred.float(), target.to(device), reduction="sum").item() / z0[0].numel()
        count += len(z0)
    unet.train(was_training)
    return total / max(count, 1)


def train_ldm(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: LatentPairs, cfg: LDMTrainConfig,
              generator: torch.Generator, checkpoint_dir: str | Path | None = None, fingerprint: str = "",
              every: int = 0, on_every: Callable[[int, UNet2DConditionModel], dict] | None = None,
              ) -> tuple[list[dict], EMAModel | None]:
    """Train in place; return the loss log and the EMA weights (None without EMA).

    With ``checkpoint_dir`` the full state (weights, EMA, optimizer, LR schedule,
    RNG states, log) is saved every ``checkpoint_every`` steps, and a rerun with
    the same ``fingerprint`` continues from the newest checkpoint: on the CPU the
    result is byte-identical to an uninterrupted run. Every ``every`` steps
    ``on_every(step, unet)`` runs (validation, sample grids); what it returns is
    merged into that step's log entry, which is checkpointed with the rest.
    """
    device = next(unet.parameters()).device
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                   model_config=unet.config) if cfg.ema_decay > 0 else None
    log: list[dict] = []
    start = 0
    stateful = {"unet": unet, "optimizer": opt, "lr_scheduler": lr_sched, "ema": ema}
    state = load_latest(checkpoint_dir, fingerprint) if checkpoint_dir else None
    if state is not None:
        start, log = restore(state, generator, **stateful)
        print(f"train_ldm: resuming from step {start} ({checkpoint_dir})")
    unet.train()
    for step in progress(range(start, cfg.steps), desc="train_ldm", initial=start, total=cfg.steps):
        z0, cap = draw_batch(data, cfg, generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
        noisy = scheduler.add_noise(z0, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z0, noise, t)
        pred = unet(noisy.to(device), t.to(device), encoder_hidden_states=data.text_emb[cap].to(device),
                    encoder_attention_mask=data.text_mask[cap].to(device)).sample
        per_sample = F.mse_loss(pred.float(), target.to(device), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _loss_weights(scheduler, t, cfg.min_snr_gamma).to(device)).mean()
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir else ""
            raise NonFiniteLoss(f"loss became {loss.item()} at step {step}{where}; lower train_ldm.lr "
                                "or raise warmup_steps")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        log.append({"step": step, "loss": loss.item(), "lr": lr_sched.get_last_lr()[0]})
        done = step + 1
        if on_every and every and (done % every == 0 or done == cfg.steps):
            log[-1].update(on_every(done, unet))
        if checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(checkpoint_dir, done, capture(done, fingerprint, log, generator, **stateful),
                            cfg.keep_checkpoints)
            print(f"train_ldm: checkpoint at step {done}", flush=True)
    unet.eval()
    return log, ema
