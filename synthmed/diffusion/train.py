"""Text-conditioned latent diffusion training (MSDM recipe: context dropout, self-conditioning, EMA).

The training set is a table of (image index, caption index) pairs over latents
encoded once from the real training images: each step draws pairs, samples a
latent from the VAE posterior of *that image*, noises it and asks the UNet to
predict the noise given the caption's token embeddings. With probability
``context_dropout`` the caption is replaced by the empty caption, which teaches
the unconditional model that classifier-free guidance needs.

Self-conditioning (Chen et al. 2023, used by MSDM) is on when the UNet takes twice the
latent channels: on half the samples of a batch the model first predicts x0 without
gradient, and that estimate is concatenated to its input for the real prediction.

The loop runs through `accelerate`: one process on a CPU or GPU, data-parallel under
`accelerate launch`, with bf16/fp16 autocast on CUDA and gradient accumulation.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import pandas as pd
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from synthmed.diffusion.config import LDMTrainConfig  # noqa: F401 (the loop's knobs; re-exported)
from synthmed.data.dataset import to_model_range
from synthmed.data.disk_array import open_disk_array, write_in_shares
from synthmed.errors import PipelineError
from synthmed.diffusion.checkpoint import TrainedState, capture, load_latest, restore, save_checkpoint
from synthmed.diffusion.loss import diffusion_loss
from synthmed.diffusion.sample import is_self_conditioned, pack_latents
from synthmed.models.autoencoder import encode_batch_size, encode_posterior
from synthmed.models.image_encoder import ImageEncoder
from synthmed.progress import progress
from synthmed.runtime import make_accelerator
from synthmed.text.encoder import TextEncoder


TAIL = 100  # the training loss reported is the mean of this many last steps (one step's loss is noise)


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
    extra_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # more per-caption inputs of the denoiser
    captions: list[str] = field(default_factory=list)  # the caption of each text_emb row

    def cond(self, rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning keyword arguments for these caption rows."""
        return {"encoder_hidden_states": self.text_emb[rows].to(device),
                "encoder_attention_mask": self.text_mask[rows].to(device),
                **{k: v[rows].to(device) for k, v in self.extra_cond.items()}}


def draw_brightness_contrast(shape: tuple[int, ...], brightness: float, contrast: float,
                             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random brightness shift and contrast scale per image (``shape`` broadcasts over an image)."""
    b = (torch.rand(shape, generator=generator) * 2 - 1) * brightness * 2  # [-1, 1] range is 2 wide
    c = 1 + (torch.rand(shape, generator=generator) * 2 - 1) * contrast
    return b, c


def apply_brightness_contrast(images: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] shifted by ``b`` and scaled by ``c`` about their mean; never flipped (prompts encode
    position and side)."""
    mean = images.mean(dim=tuple(range(1, images.ndim)), keepdim=True)
    return ((images - mean) * c + mean + b).clamp(-1, 1)


def encode_latents(vae: AutoencoderKL, images, augment_copies: int = 0, brightness: float = 0.0,
                   contrast: float = 0.0, generator: torch.Generator | None = None, latent_patch: int = 1,
                   to_vae_input: Callable[[torch.Tensor], torch.Tensor] | None = None, cache: Path | None = None):
    """The VAE posterior (mean, std) of each image and of ``augment_copies`` brightness/contrast-augmented
    copies of it, encoded once, here (augmentation costs nothing per training step); the encodings of
    image i are rows i*V .. i*V + V-1, packed in ``latent_patch`` x ``latent_patch`` blocks
    (sample.pack_latents). ``images`` are uint8 (a tensor or a DiskArray), read a batch at a time;
    ``to_vae_input`` maps a batch, in [-1, 1], to what the VAE takes (a pretrained base's channels and size).
    With ``cache`` (a folder) the posteriors go there as DiskArrays, memory holds one batch, and a run that
    finds them there (a resumed one) reads them instead; the augmentations are drawn either way, so the
    generator ends where it would."""
    n, variants = len(images), 1 + augment_copies
    draws = [draw_brightness_contrast((n,) + (1,) * (images.ndim - 1), brightness, contrast, generator)
             for _ in range(augment_copies)]
    if cache is not None:
        found = [open_disk_array(cache / f"{k}.f32") for k in ("mean", "std")]
        if all(a is not None and len(a) == n * variants for a in found):
            return *found, variants

    def vae_input(rows: slice) -> torch.Tensor:
        x = to_model_range(images[rows])
        return x if to_vae_input is None else to_vae_input(x)

    def posteriors(start: int, stop: int):
        size = encode_batch_size(vae_input(slice(start, start + 1)).shape) if stop > start else 1
        for i in progress(range(start, stop, size), desc="encode latents", unit="batch"):
            rows = slice(i, min(i + size, stop))
            x = vae_input(rows)
            views = [x] + [apply_brightness_contrast(x, b[rows], c[rows]) for b, c in draws]
            yield tuple(pack_latents(t, latent_patch)
                        for t in encode_posterior(vae, torch.stack(views, dim=1).flatten(0, 1), size))

    if cache is None:
        means, stds = zip(*posteriors(0, n))
        return torch.cat(means), torch.cat(stds), variants
    mean, std = write_in_shares({cache / "mean.f32": "float32", cache / "std.f32": "float32"}, n, posteriors)
    return mean, std, variants


def build_latent_pairs(vae: AutoencoderKL, encoder: TextEncoder, pairs: pd.DataFrame, images,
                       file_names: list[str], augment_copies: int = 0, brightness: float = 0.0,
                       contrast: float = 0.0, generator: torch.Generator | None = None,
                       latent_patch: int = 1,
                       to_vae_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       cache: Path | None = None) -> LatentPairs:
    """Encode each training image once (encode_latents) and each unique caption once (plus the empty one);
    with ``cache`` (a folder), both on disk there."""
    mean, std, variants = encode_latents(vae, images, augment_copies, brightness, contrast, generator, latent_patch,
                                         to_vae_input, cache)
    index_of = {name: i for i, name in enumerate(file_names)}
    captions = [""] + sorted(pairs["text"].unique())
    caption_of = {c: i for i, c in enumerate(captions)}
    emb, mask = encode_captions(encoder, captions, cache)
    return LatentPairs(
        latent_mean=mean, latent_std=std, scaling_factor=float(vae.config.scaling_factor),
        image_index=torch.tensor([index_of[f] for f in pairs["file_name"]]),
        caption_index=torch.tensor([caption_of[c] for c in pairs["text"]]),
        text_emb=emb, text_mask=mask, uncond_index=0, variants=variants, captions=captions,
    )


def encode_captions(encoder: TextEncoder, captions: list[str], cache: Path | None = None):
    """(token states [N, L, D], attention masks [N, L]) of ``captions``; with ``cache``, the states on disk
    (and read from there by a run that finds them)."""
    if cache is None:
        return encoder.encode(captions)
    states, masks = open_disk_array(cache / "text.f32"), open_disk_array(cache / "text_mask.i64")
    if states is None or masks is None or len(states) != len(captions):
        states, masks = write_in_shares({cache / "text.f32": "float32", cache / "text_mask.i64": "int64"},
                                        len(captions), lambda i, j: encoder.encode_batches(captions[i:j]))
    return states, masks[:]


def build_image_pairs(vae: AutoencoderKL, encoder: ImageEncoder, images, augment_copies: int = 0,
                      brightness: float = 0.0, contrast: float = 0.0, generator: torch.Generator | None = None,
                      latent_patch: int = 1, cache: Path | None = None) -> LatentPairs:
    """DiNO-Diffusion's training set: each image conditioned on its own global token(s) from the frozen image
    encoder, embedded once (as the latents are). Row 0 is the null condition, all zeros, that condition
    dropout trains in place of an embedding (the UNet's projection turns it into its bias alone), so
    classifier-free guidance works. Augmented copies keep the embedding of the original image. The global
    tokens (one or two per image) are held in memory; with ``cache`` they and the latents are encoded there, as in
    `build_latent_pairs`."""
    mean, std, variants = encode_latents(vae, images, augment_copies, brightness, contrast, generator, latent_patch,
                                         cache=cache)
    n = len(images)
    if cache is None:
        emb = encoder.encode(images)
    else:
        emb = open_disk_array(cache / "image.f32")
        if emb is None or len(emb) != n:
            emb, = write_in_shares({cache / "image.f32": "float32"}, n, lambda i, j: (
                (encoder.encode(images[k:min(k + 64, j)]),) for k in range(i, j, 64)))
        emb = emb[:]
    emb = torch.cat([torch.zeros_like(emb[:1]), emb])
    return LatentPairs(
        latent_mean=mean, latent_std=std, scaling_factor=float(vae.config.scaling_factor),
        image_index=torch.arange(n), caption_index=torch.arange(n) + 1,
        text_emb=emb, text_mask=torch.ones(emb.shape[:2], dtype=torch.long), uncond_index=0, variants=variants,
    )


def make_noise_scheduler(num_train_timesteps: int, prediction_type: str = "epsilon",
                         beta_schedule: str = "scaled_linear") -> DDPMScheduler:
    """The training noise schedule (Stable Diffusion's scaled-linear betas by default)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False)


def draw_batch(data: LatentPairs, cfg: LDMTrainConfig, generator: torch.Generator, size: int | None = None):
    """Clean scaled latents and caption rows for one (micro-)batch (CPU tensors)."""
    size = size or cfg.batch_size
    pick = torch.randint(len(data.image_index), (size,), generator=generator)
    img = data.image_index[pick] * data.variants
    if data.variants > 1:  # a random view of each image (the original or an augmented copy)
        img = img + torch.randint(data.variants, (size,), generator=generator)
    cap = data.caption_index[pick].clone()
    drop = torch.rand(size, generator=generator) < cfg.context_dropout
    cap[drop] = data.uncond_index
    z = data.latent_mean[img]
    if cfg.sample_posterior:
        z = z + data.latent_std[img] * torch.randn(z.shape, generator=generator)
    return z * data.scaling_factor, cap


def select_caption_sources(pairs: pd.DataFrame, sources: list[str], where: str) -> pd.DataFrame:
    """The rows whose caption_source is listed; `paraphrase` stands for every non-original row, so the
    default trains on whatever the paraphrase stage produced. A named backend with no rows is an error:
    silently training on fewer captions than asked is how a comparison goes wrong."""
    produced = set(pairs["caption_source"])
    for name in set(sources) - {"paraphrase"} - produced:
        raise PipelineError(f"{where}: train_ldm.caption_sources lists '{name}' but the paraphrase stage produced "
                            f"no '{name}' rows (found: {', '.join(sorted(produced))}); list `paraphrase` to "
                            "take whatever it produced, or change paraphrase.backend")
    wanted = set(sources) | ((produced - {"original"}) if "paraphrase" in sources else set())
    return pairs[pairs["caption_source"].isin(wanted)]


def require_captions(pairs: pd.DataFrame, images: pd.DataFrame) -> None:
    """Text conditioning needs a caption for every training image; an image collection without them
    (label-free data) trains with `condition: image`."""
    captioned = set(pairs.loc[pairs["text"].str.strip() != "", "file_name"])
    bare = images[~images["file_name"].isin(captioned)]
    if len(bare):
        raise PipelineError(f"data/ingest/dataset/metadata.csv: {len(bare)} of {len(images)} train images have no "
                            f"caption (first: {bare['file_name'].iloc[0]}); train_ldm.condition: text needs one per "
                            "image: add captions, or set train_ldm.condition: image to train on the images alone")


def train_loss_metrics(log: list[dict]) -> dict[str, float]:
    """The training loss as reported: a mean over the last TAIL steps (one step's loss swings with its
    random timesteps), named for it."""
    tail = log[-TAIL:]
    return {f"train_loss_last{TAIL}_mean": sum(r["loss"] for r in tail) / len(tail)}


class NonFiniteLoss(RuntimeError):
    pass


@torch.no_grad()
def validation_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: LatentPairs,
                    min_snr_gamma: float = 0.0, batch_size: int = 64) -> float:
    """The training loss (same weighting) on held-out latents with fixed noise and timesteps, from
    its own generator so that the training RNG stream, and thus resumed runs, stay untouched. A
    self-conditioned model is scored on its first pass (no previous estimate)."""
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
        cond = data.cond(cap, device)
        total += diffusion_loss(unet, scheduler, z0, noise, t, cond, min_snr_gamma=min_snr_gamma).sum().item()
        count += len(z0)
    unet.train(was_training)
    return total / max(count, 1)


def trained_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What training updates, the EMA averages and a checkpoint keeps: every parameter of a model trained
    from scratch, only the adapter of a LoRA fine-tune (its frozen base never changes)."""
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def ema_weights(unet: UNet2DConditionModel, ema: EMAModel | None) -> Iterator[UNet2DConditionModel]:
    """The UNet with the EMA weights (those that ship) inside the block, its training weights back,
    bit for bit, after it; without EMA the training weights are the ones that ship."""
    if ema is None:
        yield unet
        return
    params = trained_parameters(unet)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield unet
    finally:
        ema.restore(params)


def validation_losses(unet: UNet2DConditionModel, ema: EMAModel | None, scheduler: DDPMScheduler,
                      data: LatentPairs, min_snr_gamma: float) -> dict[str, float]:
    """``val_loss_ema`` of the weights that ship and ``val_loss_raw`` of the training weights, both
    weighted like the training loss, so the three compare (equal without EMA)."""
    raw = validation_loss(unet, scheduler, data, min_snr_gamma)
    with ema_weights(unet, ema):
        shipped = validation_loss(unet, scheduler, data, min_snr_gamma) if ema is not None else raw
    return {"val_loss_ema": shipped, "val_loss_raw": raw}


def train_ldm(unet: UNet2DConditionModel, scheduler: DDPMScheduler, data: LatentPairs, cfg: LDMTrainConfig,
              generator: torch.Generator, checkpoint_dir: str | Path | None = None, fingerprint: str = "",
              every: int = 0, on_every: Callable[[int, UNet2DConditionModel, EMAModel | None], dict] | None = None,
              accelerator=None) -> tuple[list[dict], EMAModel | None]:
    """Train in place; return the loss log and the EMA weights (None without EMA).

    With ``checkpoint_dir`` the full state (weights, EMA, optimizer, LR schedule,
    RNG states, log) is saved every ``checkpoint_every`` steps, and a rerun with
    the same ``fingerprint`` continues from the newest checkpoint: on the CPU the
    result is byte-identical to an uninterrupted run. Every ``every`` steps
    ``on_every(step, unet, ema)`` runs on the main process (validation, sample grids);
    what it returns is merged into that step's log entry, which is checkpointed.

    Every process draws the same global batch from ``generator`` and trains on its
    own slice of it, so the RNG streams stay in step across processes.
    """
    acc = accelerator or make_accelerator(cfg.mixed_precision)
    micro = cfg.batch_size // cfg.grad_accum_steps
    if micro * cfg.grad_accum_steps != cfg.batch_size or micro % acc.num_processes:
        raise ValueError(f"batch_size {cfg.batch_size} must split into grad_accum_steps={cfg.grad_accum_steps} "
                         f"micro-batches divisible by {acc.num_processes} processes")
    rank, world = acc.process_index, acc.num_processes
    # fused AdamW and the foreach EMA update: one kernel over all parameters instead of a loop over ~300 of
    # them (benchmarks/train.py --levers)
    params = trained_parameters(unet)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=acc.device.type in ("cpu", "cuda") or None)
    # stepped by us once per optimizer step (accelerate's wrapper would step it once per process)
    lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    model, opt = acc.prepare(unet, opt)
    device = acc.device
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None
    self_cond = is_self_conditioned(unet)
    log: list[dict] = []
    start = 0
    stateful = {"unet": TrainedState(unet), "optimizer": opt, "lr_scheduler": lr_sched, "ema": ema, "scaler": acc.scaler}
    state = load_latest(checkpoint_dir, fingerprint) if checkpoint_dir else None
    if state is not None:
        start, log = restore(state, generator, **stateful)
        print(f"train_ldm: resuming from step {start} ({checkpoint_dir})")
    model.train()
    bar = progress(range(start, cfg.steps), desc="train_ldm", initial=start, total=cfg.steps, unit="step",
                   disable=not acc.is_main_process)
    for step in bar:
        total = 0.0
        for k in range(cfg.grad_accum_steps):
            z0, cap = draw_batch(data, cfg, generator, micro)
            noise = torch.randn(z0.shape, generator=generator)
            t = torch.randint(scheduler.config.num_train_timesteps, (micro,), generator=generator)
            use_prev = torch.rand(micro, generator=generator) < 0.5 if self_cond else None
            mine = slice(rank * micro // world, (rank + 1) * micro // world)  # this process's share
            z0, cap, noise, t = z0[mine], cap[mine], noise[mine], t[mine]
            cond = data.cond(cap, device)
            # only the last micro-batch synchronises gradients across processes
            with acc.no_sync(model) if k < cfg.grad_accum_steps - 1 else nullcontext():
                loss = diffusion_loss(unet, scheduler, z0, noise, t, cond, min_snr_gamma=cfg.min_snr_gamma,
                                      use_prev=None if use_prev is None else use_prev[mine], forward=model).mean()
                logged = loss.detach()
                if acc.num_processes > 1:  # the whole micro-batch's loss (equal shares: the processes' mean)
                    logged = acc.reduce(logged, "mean")
                finite = torch.isfinite(logged)  # the same on every process: they stop together
                if not finite:
                    where = f"; the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir else ""
                    raise NonFiniteLoss(f"loss became {loss.item()} at step {step}{where}; lower train_ldm.lr "
                                        "or raise warmup_steps")
                acc.backward(loss / cfg.grad_accum_steps)
            total += logged.item() / cfg.grad_accum_steps
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        log.append({"step": step, "loss": total, "lr": lr_sched.get_last_lr()[0]})
        bar.set_postfix(loss=total, refresh=False)
        done = step + 1
        if on_every and every and (done % every == 0 or done == cfg.steps):
            if acc.is_main_process:
                log[-1].update(on_every(done, unet, ema))
            acc.wait_for_everyone()
        if checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            if acc.is_main_process:
                save_checkpoint(checkpoint_dir, done, capture(done, fingerprint, log, generator, **stateful),
                                cfg.keep_checkpoints)
                print(f"train_ldm: checkpoint at step {done}", flush=True)
            acc.wait_for_everyone()
    unet.eval()
    return log, ema
