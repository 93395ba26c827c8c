"""One training run of a denoiser as a stage runs it: the loop (synthmed.diffusion.loop) with its checkpoints,
the validation losses and a grid of fixed conditions with fixed seeds every ``every`` steps, the errors a user
can fix turned into one line, and the figures the stage reports. train_ldm and train_lora both fit this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.latents import LatentPairs
from synthmed.diffusion.loop import NonFiniteLoss, ema_weights, train_ldm, train_loss_metrics, validation_losses
from synthmed.core.errors import PipelineError
from synthmed.viz import image_grid, save_png


@dataclass
class Fit:
    log: list[dict]  # one entry per step; validation steps carry val_loss_ema / val_loss_raw
    ema: EMAModel | None
    metrics: dict[str, float]  # the reported training loss and the last validation losses


def fit(denoiser: torch.nn.Module, scheduler: DDPMScheduler, data: LatentPairs, val_data: LatentPairs,
        cfg: LDMTrainConfig, generator: torch.Generator, *, section: str, checkpoint_dir: Path, fingerprint: str,
        every: int, grid: Callable[[], tuple[list[np.ndarray], list[str]]], grid_path: Callable[[int], str],
        accelerator, memory_hint: str = "") -> Fit:
    """Train ``denoiser`` in place on ``data``; every ``every`` steps (and at the end) the validation losses go
    to the log and ``grid()`` (called with the EMA weights in place: the weights that ship) is saved at
    ``grid_path(step)``. ``section`` names the params section in errors; ``memory_hint``, another way to save
    memory that it offers."""
    def on_every(step: int, model, ema) -> dict:
        with ema_weights(model.eval(), ema):
            images, captions = grid()
        model.train()
        save_png(image_grid(images, captions, ncol=8), grid_path(step))
        return validation_losses(model, ema, scheduler, val_data, cfg.min_snr_gamma)

    try:
        log, ema = train_ldm(denoiser, scheduler, data, cfg, generator, checkpoint_dir, fingerprint, every=every,
                             on_every=on_every, accelerator=accelerator)
    except ValueError as exc:  # batch_size not divisible into micro-batches / processes
        raise PipelineError(f"params.yaml: {section}: {exc}") from None
    except NonFiniteLoss as exc:
        raise PipelineError(str(exc)) from None
    except torch.OutOfMemoryError:
        raise PipelineError(f"out of memory at batch_size={cfg.batch_size}; raise {section}.grad_accum_steps (same "
                            f"effective batch, smaller micro-batches), lower batch_size{memory_hint} (training resumes "
                            "from the last checkpoint)") from None
    last = next((r for r in reversed(log) if "val_loss_ema" in r), {})
    metrics = {**train_loss_metrics(log), **{k: last[k] for k in ("val_loss_ema", "val_loss_raw") if k in last}}
    return Fit(log, ema, metrics)
