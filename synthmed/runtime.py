"""Device choice: CUDA when present, CPU otherwise; the accelerate set-up of the trainers."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_accelerator(mixed_precision: str = "auto"):
    """An `accelerate.Accelerator`: one process here, several under `accelerate launch`.

    "auto" means bf16 on GPUs that support it, fp16 on older GPUs and fp32 on the CPU;
    the CPU always trains in fp32 (reduced precision there is slow and breaks determinism).
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if not cuda:
        mixed_precision = "no"
    elif mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)
