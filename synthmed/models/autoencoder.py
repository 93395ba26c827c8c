"""The first stage of the LDM: a diffusers AutoencoderKL, trained and validated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup

from synthmed.core.config import require_at_least_one, require_non_negative
from synthmed.data.dataset import to_model_range
from synthmed.data.disk_array import rows_per_batch
from synthmed.diffusion.checkpoint import capture, resume, save_checkpoint
from synthmed.metrics.similarity import PerceptualDistance, psnr, ssim
from synthmed.models.pixel_space import PixelSpace
from synthmed.models.volume_autoencoder import VolumeAutoencoderKL
from synthmed.core.progress import progress
from synthmed.core.runtime import make_accelerator


@dataclass
class VAEModelParams:
    """train_vae.model: the autoencoder's shape."""
    block_out_channels: list[int]  # downsampling factor = 2 ** (len - 1)
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    mid_attention: bool  # self-attention over the latent grid in the middle blocks


def build_autoencoder(*, in_channels: int, block_out_channels: list[int], layers_per_block: int,
                      latent_channels: int, norm_num_groups: int, sample_size: int,
                      mid_attention: bool = True, dims: int = 2) -> AutoencoderKL | VolumeAutoencoderKL:
    """Downsampling factor is 2 ** (len(block_out_channels) - 1). ``mid_attention``: self-attention over the
    latent grid in the middle blocks (quadratic in the number of latent pixels). ``dims=3``: volumes."""
    n = len(block_out_channels)
    if dims == 3:
        if mid_attention:
            raise ValueError("mid_attention is 2-D only (attention over a latent volume grows with the cube of its "
                             "side); set train_vae.model.mid_attention: false for volumes")
        return VolumeAutoencoderKL(dims=3, in_channels=in_channels, out_channels=in_channels,
                                   block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                   latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                                   sample_size=sample_size)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        mid_block_add_attention=mid_attention,
    )


def load_autoencoder(folder: str | Path, **kwargs) -> AutoencoderKL | VolumeAutoencoderKL:
    """A saved autoencoder of any kind (its config.json names its class)."""
    name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    cls = {c.__name__: c for c in (VolumeAutoencoderKL, PixelSpace)}.get(name, AutoencoderKL)
    return cls.from_pretrained(folder, **kwargs)


def use_bf16(device: torch.device, mixed_precision: str) -> bool:
    """bf16 autocast: asked for, or "auto" where the hardware runs bf16 natively.

    On the CPU that means oneDNN's AVX-512-BF16/AMX kernels (1.4x faster VAE steps on the
    EPYC, benchmarks/train.py --levers); strict CPU mode caps oneDNN at AVX2, so it reports none.
    """
    if mixed_precision == "bf16":
        return True
    if mixed_precision == "no":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class VAETrainConfig:
    steps: int
    batch_size: int
    lr: float
    kl_weight: float
    recon_loss: Literal["l1", "l2", "l1+l2"]
    ssim_weight: float  # 0 = off; else weight of (1 - SSIM)
    perceptual_weight: float  # 0 = off; else weight of the perceptual distance (synthmed.metrics.similarity)
    warmup_steps: int  # linear warm-up, then cosine decay to 0
    mixed_precision: Literal["auto", "no", "bf16"]  # auto: bf16 autocast where the device runs it natively
    checkpoint_every: int  # 0 = no checkpoints
    keep_checkpoints: int

    def __post_init__(self):  # checked when params.yaml is read, before anything is trained
        require_at_least_one(self, "steps", "batch_size")
        require_non_negative(self, "lr", "kl_weight", "ssim_weight", "perceptual_weight", "warmup_steps",
                             "checkpoint_every", "keep_checkpoints")


def _recon_loss(recon: torch.Tensor, x: torch.Tensor, cfg: VAETrainConfig,
                perceptual: PerceptualDistance | None) -> torch.Tensor:
    loss = torch.zeros((), device=x.device)
    if "l1" in cfg.recon_loss:
        loss = loss + F.l1_loss(recon, x)
    if "l2" in cfg.recon_loss:
        loss = loss + F.mse_loss(recon, x)
    if cfg.ssim_weight > 0:
        loss = loss + cfg.ssim_weight * (1 - ssim((recon + 1) / 2, (x + 1) / 2).mean())
    if perceptual is not None:
        loss = loss + cfg.perceptual_weight * perceptual((recon + 1) / 2, (x + 1) / 2).mean()
    return loss


class _Reconstruction(torch.nn.Module):
    """One training forward of a VAE as a module's forward, which is what DistributedDataParallel wraps:
    (reconstruction, posterior parameters) of this process's ``share`` of a global batch of ``n`` images,
    whose posterior noise is drawn for the whole batch from ``generator`` (every process draws the same);
    ``posterior(parameters)`` gives the distribution back (the VAE's own class: 2-D or volume)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae, self.posterior = vae, None

    def forward(self, x: torch.Tensor, generator: torch.Generator, n: int, share: slice
                ) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        self.posterior = type(posterior)
        noise = torch.randn((n, *posterior.mean.shape[1:]), generator=generator)[share].to(x.device)
        return self.vae.decode(posterior.mean + posterior.std * noise).sample, posterior.parameters


def train_autoencoder(vae: AutoencoderKL, images: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator,
                      checkpoint_dir: str | Path | None = None, fingerprint: str = "", accelerator=None) -> list[dict]:
    """Train on images in [-1, 1] (or uint8: a tensor or a DiskArray, converted a batch at a time) with
    reconstruction (+ SSIM) + KL; return the loss log.

    Checkpoints and resume work as in the LDM trainer (synthmed.diffusion.checkpoint). Under several processes
    (``accelerator``, see synthmed.core.runtime.launch_ranks) every process draws the same global batch and noise
    from ``generator``, trains on its slice, and the averaged gradients are those of the whole batch; the main
    process alone writes checkpoints.
    """
    acc = accelerator or make_accelerator("no")  # autocast below: bf16 where the device runs it natively
    rank, world = acc.process_index, acc.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    device = next(vae.parameters()).device
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    step_module = _Reconstruction(vae)
    if cfg.perceptual_weight > 0 and images.ndim != 4:
        raise ValueError("perceptual_weight: the perceptual term is 2-D only (an ImageNet network); set it to 0 "
                         "for volumes")
    perceptual = PerceptualDistance().to(device) if cfg.perceptual_weight > 0 else None
    model, opt = acc.prepare(step_module, opt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, cfg.mixed_precision))
    stateful = {"vae": vae, "optimizer": opt, "lr_scheduler": lr_sched}
    start, log = resume(checkpoint_dir, fingerprint, generator, "train_vae", **stateful)
    vae.train()
    bar = progress(range(start, cfg.steps), desc="train_vae", initial=start, total=cfg.steps, unit="step",
                   disable=not acc.is_main_process)
    for step in bar:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)[mine]
        x = as_model_range(images[idx]).to(device)
        with autocast:
            recon, moments = model(x, generator, cfg.batch_size, mine)
        rec = _recon_loss(recon.float(), x, cfg, perceptual)
        kl = step_module.posterior(moments).kl().mean()
        loss = rec + cfg.kl_weight * kl
        parts = torch.stack([loss, rec, kl]).detach()
        if world > 1:  # the whole batch's figures (equal slices: the mean of the processes')
            parts = acc.reduce(parts, "mean")
        if not torch.isfinite(parts[0]):  # the same on every process, so all of them stop
            raise FloatingPointError(f"VAE loss became {parts[0].item()} at step {step}; lower train_vae.lr")
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        lr_sched.step()
        log.append({"step": step, **dict(zip(("loss", "recon", "kl"), parts.tolist()))})
        bar.set_postfix(loss=log[-1]["loss"], refresh=False)
        done = step + 1
        if checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            if acc.is_main_process:
                save_checkpoint(checkpoint_dir, done, capture(done, fingerprint, log, generator, **stateful),
                                cfg.keep_checkpoints)
            acc.wait_for_everyone()
    vae.eval()
    return log


def encode_batch_size(shape) -> int:
    """Images per no-grad encoding batch: activations, not the image count, bound the memory."""
    return rows_per_batch(shape, most=64)  # 64 images at 64 px, 10 at 256 px RGB


def model_batches(images, batch_size: int, rows=None):
    """Images in [-1, 1], ``batch_size`` at a time, of ``images`` (in [-1, 1] or uint8; a tensor or a DiskArray)
    or of its ``rows``."""
    n = len(images) if rows is None else len(rows)
    for i in range(0, n, batch_size):
        yield as_model_range(images[i : i + batch_size] if rows is None else images[list(rows[i : i + batch_size])])


def as_model_range(x: torch.Tensor) -> torch.Tensor:
    return to_model_range(x) if x.dtype == torch.uint8 else x


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, images, batch_size: int | None = None,
                     rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std, on the CPU, of images (see `model_batches`) or of their ``rows``."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for x in model_batches(images, batch_size or encode_batch_size(images.shape), rows):
        d = vae.encode(x.to(device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images, batch_size: int | None = None) -> torch.Tensor:
    """Decoded posterior means of images (see `model_batches`), in [-1, 1]."""
    return torch.cat([recon for _, recon in reconstructions(vae, images, batch_size)])


@torch.no_grad()
def reconstructions(vae: AutoencoderKL, images, batch_size: int | None = None):
    """(originals, reconstructions) in [-1, 1], a batch at a time."""
    device = next(vae.parameters()).device
    for x in model_batches(images, batch_size or encode_batch_size(images.shape)):
        mean = vae.encode(x.to(device)).latent_dist.mean
        yield x, vae.decode(mean).sample.cpu().clamp(-1, 1)


def posterior_noise_fraction(mean: torch.Tensor, std: torch.Tensor) -> float:
    """The share of a posterior sample's variance that is the posterior's own noise, not the image's:
    mean(std^2) / (var(mean) + mean(std^2)), from `encode_posterior`. Near 0, sampled latents are the
    images'; a large share (the KL term widens the posterior during a short training) makes them partly
    noise that a diffusion model trained on samples learns too (train_ldm.sample_posterior: false avoids it)."""
    noise = float(std.double().pow(2).mean())
    return noise / (float(mean.double().var()) + noise)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> float:
    """1 / std of posterior samples of training latents (from `encode_posterior`): unit variance for the diffusion."""
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return 1.0 / max(float(z.std()), 1e-8)


def posterior_sample_rows(n: int, size: int, seed: int) -> list[int]:
    """The training images the scaling factor and the noise fraction are measured on: all of them up to
    ``size``, else a seeded sample of ``size`` (in row order), so the cost does not grow with the dataset."""
    if n <= size:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size, replace=False).tolist())


def reconstruction_metrics(images: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """PSNR/SSIM/MAE of images in [-1, 1], computed on [0, 1]: means of the per-image figures."""
    return mean_metrics(per_image_metrics(images, recon))


def per_image_metrics(images: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    a, b = (images + 1) / 2, (recon + 1) / 2
    return {"psnr": psnr(b, a), "ssim": ssim(b, a), "mae": (a - b).abs().flatten(1).mean(1)}


def mean_metrics(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {k: float(v.mean()) for k, v in per_image.items()}
    if not all(map(math.isfinite, out.values())):
        raise FloatingPointError("non-finite reconstruction metric")
    return out


def validate(vae: AutoencoderKL, images, keep: list[int]) -> tuple[dict[str, float], torch.Tensor]:
    """Reconstruction metrics over images (see `model_batches`), streamed, and the reconstructions of the
    ``keep`` rows (for a figure)."""
    per_image, kept, seen = {}, [], 0
    for x, recon in reconstructions(vae, images):
        for k, v in per_image_metrics(x, recon).items():
            per_image.setdefault(k, []).append(v)
        kept += [recon[i - seen] for i in keep if seen <= i < seen + len(x)]
        seen += len(x)
    return mean_metrics({k: torch.cat(v) for k, v in per_image.items()}), torch.stack(kept)
