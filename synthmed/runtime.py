"""Device choice and progress bars: CUDA when present, CPU otherwise."""

from __future__ import annotations

import os
import sys

import torch
from tqdm.auto import tqdm


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def progress(iterable=None, **kwargs):
    """tqdm that stays quiet in non-interactive runs unless SYNTHMED_PROGRESS=1."""
    kwargs.setdefault("disable", not (sys.stderr.isatty() or os.environ.get("SYNTHMED_PROGRESS") == "1"))
    kwargs.setdefault("mininterval", 2.0)
    return tqdm(iterable, **kwargs)
