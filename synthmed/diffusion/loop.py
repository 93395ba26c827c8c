"""The latent diffusion training loop (MSDM recipe: context dropout, self-conditioning, EMA), shared by train_ldm
and train_lora, with its validation and EMA helpers.

Each step draws (image, caption) pairs from the encoded training set (synthmed.diffusion.latents), samples a
latent from the VAE posterior of that image, noises it and asks the denoiser to predict the target given the
caption's token states (synthmed.diffusion.loss). With probability ``context_dropout`` the caption is
replaced by the empty one, which teaches the unconditional model that classifier-free guidance needs.
Self-conditioning (Chen et al. 2023, used by MSDM) is on when the UNet takes twice the latent channels: on
half the samples of a batch the model first predicts x0 without gradient, and that estimate is concatenated
to its input for the real prediction.

The loop runs through `accelerate`: one process on a CPU or GPU, data-parallel under several processes
(synthmed.core.runtime.launch_ranks), with bf16/fp16 autocast on CUDA and gradient accumulation.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from synthmed.diffusion.checkpoint import TrainedState, capture, resume, save_checkpoint
from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.latents import LatentPairs
from synthmed.diffusion.loss import diffusion_loss
from synthmed.diffusion.sample import is_self_conditioned
from synthmed.diffusion.schedulers import training_timesteps
from synthmed.core.progress import progress
from synthmed.core.runtime import make_accelerator


TAIL = 100  # the training loss reported is the mean of this many last steps (one step's loss is noise)


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
        t = training_timesteps(scheduler, len(z0), g)
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
    stateful = {"unet": TrainedState(unet), "optimizer": opt, "lr_scheduler": lr_sched, "ema": ema, "scaler": acc.scaler}
    start, log = resume(checkpoint_dir, fingerprint, generator, "train_ldm", **stateful)
    model.train()
    bar = progress(range(start, cfg.steps), desc="train_ldm", initial=start, total=cfg.steps, unit="step",
                   disable=not acc.is_main_process)
    for step in bar:
        total = 0.0
        for k in range(cfg.grad_accum_steps):
            z0, cap = draw_batch(data, cfg, generator, micro)
            noise = torch.randn(z0.shape, generator=generator)
            t = training_timesteps(scheduler, micro, generator)
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
