"""The segment stage's steps on a trained SynthMedPipeline and a dataset split: which models have maps to
merge, the split's masks checked against their images and classes, and label maps a batch at a time."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch

from synthmed.core.errors import PipelineError
from synthmed.core.provenance import derive_seed
from synthmed.data.imagefolder import load_images
from synthmed.diffusion.generators import DiffusersGenerator
from synthmed.segment.attention import image_attention, missing, self_attention_layers
from synthmed.segment.merge import segment_attention


def no_maps_reason(pipe, volumes: bool) -> str:
    """Why this model has no self-attention maps at all ("" when it has): the stage then writes a note and the
    rest of the DAG runs on (volumes, the invertible backbone, a fine-tuned pretrained pipeline)."""
    if isinstance(pipe, DiffusersGenerator):
        return "a fine-tuned pretrained pipeline (train_lora.base): zero-shot segmentation runs on synthmed's own models"
    if not self_attention_layers(pipe.unet):
        return (f"this {'volume' if volumes else 'invertible-backbone'} UNet has cross-attention only: no "
                "self-attention maps to merge (zero-shot segmentation needs the 2-D standard backbone)")
    return ""


def check_model(pipe, p) -> None:
    """One line, before anything is written, for blocks without self-attention or a timestep the model lacks."""
    if not self_attention_layers(pipe.unet, p.blocks):
        raise PipelineError(f"params.yaml: segment.blocks: {missing(pipe.unet, p.blocks)}")
    limit = pipe.scheduler.config.num_train_timesteps
    if p.timestep >= limit:
        raise PipelineError(f"params.yaml: segment.timestep {p.timestep}: this model has {limit} training "
                            f"timesteps; use 0..{limit - 1}")


def has_masks(folder: str, rows: pd.DataFrame) -> bool:
    if "masks" not in rows.columns or not (rows["masks"] != "").any():
        return False
    missing = rows.loc[rows["masks"] == "", "file_name"].tolist()
    if missing:
        raise PipelineError(f"{folder}/metadata.csv: {len(missing)} image(s) without a mask, e.g. {missing[0]}; "
                            "give every image of the split a mask, or none")
    return True


def read_masks(folder: str, rows: pd.DataFrame, classes: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """The rows' masks [N, *shape]; one line for a mask whose size is not its image's or whose classes are
    not all named."""
    masks = load_images(folder, rows["masks"].tolist())[:, 0]
    for name, mask in zip(rows["masks"], masks):
        if mask.shape != shape:
            raise PipelineError(f"{folder}/{name}: mask {'x'.join(map(str, mask.shape[::-1]))}, its image "
                                f"{'x'.join(map(str, shape[::-1]))}; masks must have their image's size")
        if mask.max() >= len(classes):
            raise PipelineError(f"{folder}/{name}: class index {mask.max()} but segment.classes names "
                                f"{len(classes)} ({', '.join(classes)}); add the missing class names")
    return masks


def label_maps(pipe, images, rows: pd.DataFrame, p, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 image [C, H, W], its label map [H, W]) of every row (``images``: a Rows, read a batch at a time),
    ``p.batch_size`` UNet calls at a time; each image's noise from a seed of its own, so a map does not depend
    on its batch."""
    for i in range(0, len(rows), p.batch_size):
        batch = rows.iloc[i : i + p.batch_size]
        x = torch.as_tensor(images[i : i + len(batch)])
        if p.condition == "unconditional":
            cond = None
        else:
            cond = pipe.embed_images(x) if pipe.image_conditioned else batch["text"].tolist()
        gens = [torch.Generator().manual_seed(derive_seed(seed, "segment", f)) for f in batch["file_name"]]
        attn, side = image_attention(pipe, x, cond, p.timestep, p.blocks, gens)
        for image, a in zip(x.numpy(), attn):
            yield image, segment_attention(a, (side, side), tuple(x.shape[2:]), p.merge_threshold,
                                           p.merge_iterations, p.anchors_per_side).numpy()
