"""DVC stage `segment`: zero-shot segmentation of real images from the trained UNet's self-attention
(DiNO-Diffusion's third protocol, by DiffSeg's merging), scored against real masks.

Each image of `segment.split` is noised to `timestep` and seen once by the model that `generate` samples
(`train_lora/model`) under its own caption (or image embedding) or the null condition; the self-attention
maps of the chosen `blocks` are aggregated over resolutions and merged by symmetric KL distance
(synthmed/segment). Where the dataset has masks (the demo's tissue maps; a `masks` column in your
metadata.csv) each image's segments are matched to the mask classes (Hungarian) and scored by Dice, beside
two baselines that need no model: multi-level Otsu and k-means on the intensities. Without masks the stage
writes the label maps and the figure only; a model without self-attention (volumes, the invertible backbone)
gets a note.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from synthmed.core.config import require_at_least_one, require_non_negative
from synthmed.core.io import atomic_path, write_csv
from synthmed.core.progress import progress
from synthmed.core.provenance import derive_seed, seed_everything
from synthmed.core.runtime import pick_device
from synthmed.core.stage import Stage, run_stage
from synthmed.data.dataset import image_rows, split_frame
from synthmed.diffusion.generators import load_generator
from synthmed.segment.attention import BLOCKS
from synthmed.segment.figure import overlay_figure
from synthmed.segment.score import kmeans_segments, otsu_segments, score_image, summarise
from synthmed.segment.zero_shot import check_model, has_masks, label_maps, no_maps_reason, read_masks
from synthmed.viz import save_pixels


@dataclass
class SegmentParams:
    split: str
    timestep: int  # the noise level each image is seen at, 0 .. num_train_timesteps - 1
    merge_threshold: float  # symmetric KL below which two attention maps merge
    merge_iterations: int
    anchors_per_side: int
    blocks: list[str]  # which parts of the UNet give self-attention maps: down, mid, up
    condition: Literal["caption", "unconditional"]  # the image's own caption (image embedding), or the null condition
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


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    folder, model = stage.dep("ingest/dataset"), stage.dep("train_lora/model")
    seed_everything(seed)
    rows = split_frame(folder, [p.split])
    images = image_rows(folder, rows)  # read a batch at a time
    masked = has_masks(folder, rows)
    pipe = load_generator(model, pick_device())
    note = no_maps_reason(pipe, images.ndim == 5)
    if not note:
        check_model(pipe, p)
    for i in range(0, len(rows) if masked else 0, 256):  # every mask checked before anything is written
        read_masks(folder, rows.iloc[i : i + 256], p.classes, tuple(images.shape[2:]))
    shown = set(np.linspace(0, len(rows) - 1, min(p.figure_images, len(rows))).round().astype(int).tolist())
    table, figure = [], {"images": [], "segments": [], "masks": [], "matched": {}}
    with atomic_path(stage.out_path("maps"), is_dir=True) as tmp:  # segment ids, one PNG per image
        maps = label_maps(pipe, images, rows, p, seed) if not note else iter(())
        for i, (image, seg) in enumerate(progress(maps, total=len(rows) if not note else 0, desc="segment")):
            name = rows["file_name"].iloc[i]
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            save_pixels(seg.astype(np.uint8), tmp / name)
            methods = {"attention": seg}
            if masked:
                truth = read_masks(folder, rows.iloc[i : i + 1], p.classes, image.shape[1:])[0]
                methods.update(otsu=otsu_segments(image[0], len(p.classes)),
                               kmeans=kmeans_segments(image[0], len(p.classes), derive_seed(seed, "kmeans", name)))
            for method, s in methods.items():
                row, matched = score_image(s, truth, p.classes) if masked else ({"segments": int(s.max()) + 1}, None)
                table.append({"file_name": name, "method": method, **row})
                if i in shown and masked:
                    figure["matched"].setdefault(method, []).append(matched)
            if i in shown:
                figure["images"].append(image)
                figure["segments"].append(seg)
                figure["masks"].append(truth if masked else None)
    table = pd.DataFrame(table, columns=None if table else ["file_name", "method", "segments"])
    write_csv(stage.out_path("per_image.csv"), table)
    metrics = {"n_images": len(rows)}
    if masked and len(table):
        metrics.update(summarise(table, p.classes, p.resamples, derive_seed(seed, "segment", "bootstrap")))
    elif len(table):
        metrics["seg_segments_mean"] = float(table["segments"].mean())
    if note or not masked:
        print(f"segment: {note or 'no masks in the dataset: label maps and the figure only'}")
    overlay_figure(stage.out_path("overlays.png"), np.stack(figure["images"]) if figure["images"] else np.zeros((0,)),
                   figure["segments"], np.stack(figure["masks"]) if masked and figure["masks"] else None,
                   figure["matched"] or None, rows["file_name"].iloc[sorted(shown)].tolist(), p.classes, note)
    stage.write_provenance()
    per_class = [f"seg_dice_{c}" for c in p.classes[1:] if f"seg_dice_{c}" in metrics]
    stage.write_metrics(metrics, headline=["seg_dice_mean", *per_class, "seg_otsu_dice_mean", "seg_kmeans_dice_mean"]
                        if masked and len(table) else ["n_images"])
    print("segment: " + ", ".join(f"{k}={v:.3g}" for k, v in metrics.items() if "_ci_" not in k))


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, SegmentParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
