"""Load the images of one split of an ImageFolder as tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synthmed.data.disk_array import DiskArray, Rows
from synthmed.data.imagefolder import load_images, read_metadata
from synthmed.data.pixels import pixel_stack
from synthmed.core.errors import PipelineError


def to_model_range(images_uint8) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float in [-1, 1]."""
    return torch.as_tensor(images_uint8).float() / 127.5 - 1.0


def split_frame(folder: str | Path, splits: list[str]) -> pd.DataFrame:
    """One row per image (first caption) of the given splits, in file order."""
    df = read_metadata(folder)
    rows = df[df["split"].isin(splits)].drop_duplicates("file_name")
    if rows.empty:
        raise PipelineError(f"{folder}/metadata.csv: no images in split(s) {', '.join(splits)}; "
                            "check ingest.split_fractions")
    return rows.reset_index(drop=True)


def images_of(folder: str | Path, rows: pd.DataFrame) -> torch.Tensor:
    """uint8 images [N, C, H, W] of the rows' file_name column, in row order."""
    return torch.as_tensor(load_images(folder, rows["file_name"].tolist()))


def image_rows(folder: str | Path, rows: pd.DataFrame) -> Rows:
    """uint8 images [N, C, H, W] of the rows' file_name column, in row order, on disk (decoded once into the
    local store) and read only where indexed."""
    return Rows(pixel_stack(folder, rows["file_name"].tolist()))


def split_images(folder: str | Path, splits: list[str]) -> tuple[pd.DataFrame, torch.Tensor]:
    """(rows, uint8 images [N, C, H, W]) for the given splits."""
    rows = split_frame(folder, splits)
    return rows, images_of(folder, rows)


def split_stack(folder: str | Path, splits: list[str]) -> tuple[pd.DataFrame, DiskArray]:
    """(rows, uint8 images [N, C, H, W] on disk, read a batch at a time) for the given splits."""
    rows = split_frame(folder, splits)
    return rows, pixel_stack(folder, rows["file_name"].tolist())


def split_mask(rows: pd.DataFrame, splits: list[str], unsplit: bool = False) -> np.ndarray:
    """Rows in ``splits``; with ``unsplit``, also rows with no split. Synthetic images from a prompt
    file without a split column, or from templates, may come from test captions: they serve
    fidelity (unsplit=True) but never train a downstream model (the default)."""
    split = rows["split"] if "split" in rows.columns else pd.Series("", index=rows.index)
    return (split.isin(splits) | (unsplit & (split == ""))).to_numpy(copy=True)


def modes_of(synth: pd.DataFrame) -> dict[str, str]:
    """Generation mode of a synthetic metadata table -> the suffix of its figures: "" for the first (a text
    model's only mode, an image model's reconstructions), "_<mode>" for the others."""
    modes = list(dict.fromkeys(synth["mode"])) if "mode" in synth else ["text"]
    return {m: "" if i == 0 else f"_{m}" for i, m in enumerate(modes)}


def mode_mask(synth: pd.DataFrame, mode: str) -> np.ndarray:
    return (synth["mode"] == mode).to_numpy(copy=True) if "mode" in synth else np.ones(len(synth), dtype=bool)


def first_mode(synth: pd.DataFrame) -> pd.DataFrame:
    """The rows of the first generation mode: what a single-mode figure (VLP, the report's samples) uses."""
    return synth[mode_mask(synth, next(iter(modes_of(synth))))]
