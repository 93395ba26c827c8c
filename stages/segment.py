"""DVC stage `segment`: zero-shot segmentation of real images from the trained UNet's self-attention
(DiNO-Diffusion's third protocol, by DiffSeg's merging), scored against real masks.

Each image of `segment.split` is noised to `timestep` and seen once by the model that `generate` samples
(`train_lora/model`) under its own caption (or image embedding) or the null condition; the self-attention
maps of the chosen `blocks` are aggregated over resolutions and merged by symmetric KL distance
(synthmed/segment). Where the dataset has masks (the demo's tissue maps; a `masks` column in your
metadata.csv) each image's segments are matched to the mask classes (Hungarian) and scored by Dice, beside
two baselines that need no model: multi-level Otsu and k-means on the intensities. Without masks the stage
writes the label maps and the figure only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from synthmed.core.config import require_at_least_one, require_non_negative
from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path, write_csv
from synthmed.core.provenance import derive_seed, seed_everything
from synthmed.core.progress import progress
from synthmed.core.runtime import pick_device
from synthmed.core.stage import Stage, run_stage
from synthmed.data.dataset import image_rows, split_frame
from synthmed.data.imagefolder import load_images
from synthmed.diffusion.generators import load_generator
from synthmed.segment.attention import BLOCKS, SelfAttentionMissing, image_attention, self_attention_layers
from synthmed.segment.figure import overlay_figure
from synthmed.segment.merge import segment_attention
from synthmed.segment.score import (bootstrap_ci, dice, foreground_dice, kmeans_segments, match_segments,
                                    otsu_segments)
from synthmed.viz import save_pixels



@dataclass
class SegmentParams:
    split: str
    timestep: int  # the noise level each image is seen at, 0 .. num_train_timesteps - 1
    merge_threshold: float  # symmetric KL below which two attention maps merge
    merge_iterations: int
    anchors_per_side: int
    blocks: list[str]  # which parts of the UNet give self-attention maps: down, mid, up
    condition: Literal["caption", "null"]  # the image's own caption (image embedding) or the null condition
    classes: list[str]  # mask class names by index; index 0 is the background
    batch_size: int
    resamples: int  # bootstrap draws over images behind each Dice interval
    figure_images: int

    def __post_init__(self):
        require_at_least_one(self, "merge_iterations", "anchors_per_side", "batch_size")
        require_non_negative(self, "timestep", "resamples", "figure_images")
        if self.merge_threshold <= 0:
            raise ValueError(f"segment.merge_threshold must be > 0, got {self.merge_threshold}")
        if sorted(set(self.blocks) - set(BLOCKS)) or not self.blocks:
            raise ValueError(f"segment.blocks: use some of {', '.join(BLOCKS)}, got {self.blocks}")
        if len(self.classes) < 2:
            raise ValueError("segment.classes: name at least two classes (index 0 is the background)")


def read_masks(folder: str, rows: pd.DataFrame, classes: list[str], images: np.ndarray) -> np.ndarray | None:
    """The split's masks [N, H, W] (None when the dataset has none); one line for a mask the classes cannot
    name or whose size is not its image's."""
    if "masks" not in rows.columns or not (rows["masks"] != "").any():
        return None
    missing = rows.loc[rows["masks"] == "", "file_name"].tolist()
    if missing:
        raise PipelineError(f"{folder}/metadata.csv: {len(missing)} image(s) without a mask, e.g. {missing[0]}; "
                            "give every image of the split a mask, or none")
    masks = load_images(folder, rows["masks"].tolist())[:, 0]
    for name, mask, image in zip(rows["masks"], masks, images):
        if mask.shape != image.shape[1:]:
            raise PipelineError(f"{folder}/{name}: mask {mask.shape[1]}x{mask.shape[0]}, its image "
                                f"{image.shape[2]}x{image.shape[1]}; masks must have their image's size")
        if mask.max() >= len(classes):
            raise PipelineError(f"{folder}/{name}: class index {mask.max()} but segment.classes names "
                                f"{len(classes)} ({', '.join(classes)}); add the missing class names")
    return masks


def attention_maps(pipe, folder: str, rows: pd.DataFrame, p: SegmentParams, seed: int):
    """Yield (row index, label map [H, W]) of every image, a batch of UNet calls at a time."""
    images = image_rows(folder, rows)
    limit = pipe.scheduler.config.num_train_timesteps
    if p.timestep >= limit:
        raise PipelineError(f"params.yaml: segment.timestep {p.timestep}: this model has {limit} training "
                            f"timesteps; use 0..{limit - 1}")
    for i in progress(range(0, len(rows), p.batch_size), desc="segment", unit="batch"):
        batch = rows.iloc[i : i + p.batch_size]
        x = images[i : i + len(batch)]
        if p.condition == "null":
            cond = None
        else:
            cond = pipe.embed_images(x) if pipe.image_conditioned else batch["text"].tolist()
        gens = [torch.Generator().manual_seed(derive_seed(seed, "segment", f)) for f in batch["file_name"]]
        attn, side = image_attention(pipe, x, cond, p.timestep, p.blocks, gens)
        for j in range(len(batch)):
            yield i + j, segment_attention(attn[j], (side, side), tuple(x.shape[2:]), p.merge_threshold,
                                           p.merge_iterations, p.anchors_per_side).numpy()


def score(segments: dict[str, list[np.ndarray]], masks: np.ndarray, rows: pd.DataFrame, classes: list[str],
          resamples: int, seed: int) -> tuple[pd.DataFrame, dict[str, float], dict[str, list[np.ndarray]]]:
    """Per image and method: segments, Dice per class and of the foreground; the metrics (mean over images
    with a bootstrap 95 % interval); the class maps after matching (for the figure)."""
    table, matched = [], {}
    for method, maps in segments.items():
        matched[method] = [match_segments(s, m, len(classes)) for s, m in zip(maps, masks)]
        for name, seg, cls, truth in zip(rows["file_name"], maps, matched[method], masks):
            per_class = dice(cls, truth, len(classes))
            table.append({"file_name": name, "method": method, "segments": int(seg.max()) + 1,
                          **{f"dice_{c}": d for c, d in zip(classes, per_class)},
                          "dice_mean": float(np.nanmean(per_class[1:])) if np.isfinite(per_class[1:]).any() else np.nan,
                          "dice_foreground": foreground_dice(cls, truth)})
    table = pd.DataFrame(table)
    metrics = {"n_images": int(len(rows))}
    for method in segments:
        sub = table[table["method"] == method]
        prefix = "seg" if method == "attention" else f"seg_{method}"
        metrics[f"{prefix}_segments_mean"] = float(sub["segments"].mean())
        for col in ["dice_mean", *[f"dice_{c}" for c in classes[1:]], "dice_foreground"]:
            mean, low, high = bootstrap_ci(sub[col], resamples, derive_seed(seed, "segment", method, col))
            metrics.update({f"{prefix}_{col}": mean, f"{prefix}_{col}_ci_low": low, f"{prefix}_{col}_ci_high": high})
    return table, metrics, matched


def no_maps_reason(pipe, images: np.ndarray) -> str:
    """Why this model gives no self-attention maps at all ("" when it does): the stage then writes a note, and
    the rest of the DAG runs on (volumes, the invertible backbone, a fine-tuned pretrained pipeline)."""
    if not hasattr(pipe, "_condition"):
        return "a fine-tuned pretrained pipeline (train_lora.base): zero-shot segmentation runs on synthmed's own models"
    if not self_attention_layers(pipe.unet):
        what = "volume" if images.ndim == 5 else "invertible-backbone"
        return (f"this {what} UNet has cross-attention only: no self-attention maps to merge (zero-shot "
                "segmentation needs the 2-D standard backbone)")
    return ""


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    folder, model = stage.dep("ingest/dataset"), stage.dep("train_lora/model")
    seed_everything(seed)
    rows = split_frame(folder, [p.split])
    images = load_images(folder, rows["file_name"].tolist())
    masks = read_masks(folder, rows, p.classes, images)
    pipe = load_generator(model, pick_device())
    note = no_maps_reason(pipe, images)
    maps: list[np.ndarray] = []
    if not note:
        try:
            maps = [m for _, m in attention_maps(pipe, folder, rows, p, seed)]
        except SelfAttentionMissing as exc:  # not in the blocks asked for
            raise PipelineError(f"params.yaml: segment.blocks: {exc}") from None
    with atomic_path(stage.out_path("maps"), is_dir=True) as tmp:  # segment ids, one PNG per image
        for name, m in zip(rows["file_name"], maps):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            save_pixels(m.astype(np.uint8), tmp / name)
    metrics, headline, matched = {"n_images": len(rows)}, ["n_images"], None
    table = pd.DataFrame({"file_name": rows["file_name"][: len(maps)], "method": "attention",
                          "segments": [int(m.max()) + 1 for m in maps]})
    if maps:
        metrics["seg_segments_mean"] = float(table["segments"].mean())
    if maps and masks is not None:
        n = len(p.classes)
        segments = {"attention": maps, "otsu": [otsu_segments(x[0], n) for x in images],
                    "kmeans": [kmeans_segments(x[0], n, derive_seed(seed, "kmeans", f))
                               for x, f in zip(images, rows["file_name"])]}
        table, metrics, matched = score(segments, masks, rows, p.classes, p.resamples, seed)
        headline = ["seg_dice_mean", "seg_otsu_dice_mean", "seg_kmeans_dice_mean"]  # intervals: metrics/all
    elif maps:
        print("segment: no masks in the dataset: label maps and the figure only")
    else:
        print(f"segment: {note}")
    write_csv(stage.out_path("per_image.csv"), table)
    at = np.linspace(0, len(maps) - 1, min(p.figure_images, len(maps))).round().astype(int)
    overlay_figure(stage.out_path("overlays.png"), images[at], [maps[i] for i in at],
                   None if masks is None else masks[at],
                   None if matched is None else {k: [v[i] for i in at] for k, v in matched.items()},
                   rows["file_name"].iloc[at].tolist(), p.classes, note)
    stage.write_provenance()
    stage.write_metrics(metrics, headline=headline)
    print("segment: " + ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if "_ci_" not in k))


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, SegmentParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
