"""The training loop's knobs, shared by train_ldm and train_lora: a light module (no torch), so that a
stage that only reads its params starts fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from synthmed.core.config import require_at_least_one, require_non_negative, require_probability


@dataclass
class LDMTrainConfig:
    steps: int  # optimizer steps
    batch_size: int  # per optimizer step, over all processes; split evenly between them
    grad_accum_steps: int  # micro-batches per optimizer step (each batch_size / grad_accum_steps)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"]  # CUDA only; "auto" = bf16 where supported
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

    def __post_init__(self):  # checked when params.yaml is read, before anything is deleted or trained
        require_at_least_one(self, "steps", "batch_size", "grad_accum_steps")
        require_non_negative(self, "lr", "weight_decay", "grad_clip", "warmup_steps", "min_snr_gamma", "checkpoint_every",
                             "keep_checkpoints")
        require_probability(self, "context_dropout", "ema_decay")
