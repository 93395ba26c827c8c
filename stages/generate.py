"""DVC stage `generate`: a synthetic ImageFolder, written in resumable shards.

Every image records its prompt, label, seed, sampler and the model's hash in
metadata.csv; `python -m synthmed.diffusion.regenerate <file_name>` remakes any one of them.
An image-conditioned model (train_ldm.condition: image) generates from the plan's source images
instead of their captions, in the modes of `generate.image`; each image records its `mode`, source,
partner and `r`.

Scale-out: `python -m stages.generate --shard i/N` renders every N-th shard (the i-th first) into the
same resume store and stops; N such workers (processes, machines sharing the checkout's `.synthmed/`,
or Dask tasks: `flows/generate_shards.py`) split the sampling, and a plain run afterwards (`dvc repro
generate`) finds every shard finished and publishes the dataset, byte for byte the one a single run writes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from synthmed.core.config import require_at_least_one
from synthmed.diffusion.generators import load_generator
from synthmed.diffusion.image_sources import SourceEmbeddings, image_grid_rows
from synthmed.diffusion.prompts import ImageModesParams, finish_plan, image_plan, read_plan
from synthmed.diffusion.schedulers import make_sampler
from synthmed.diffusion.shards import parse_shard, publish_shards, write_shards
from synthmed.core.errors import PipelineError
from synthmed.core.io import sha256_tree, write_json
from synthmed.core.provenance import seed_everything
from synthmed.core.runtime import pick_device
from synthmed.core.stage import Stage, run_stage
from synthmed.viz import image_grid, load_png, save_png, to_array



@dataclass
class GenerateParams:
    scheduler: Literal["ddim", "dpmpp", "euler", "ddpm"]
    num_inference_steps: int
    guidance_scale: float
    batch_size: int
    shard_size: int
    grid_images: int
    image: ImageModesParams

    def __post_init__(self):
        require_at_least_one(self, "num_inference_steps", "batch_size", "shard_size",
                             "grid_images")


def main(stage: Stage, shard: tuple[int, int] = (1, 1)) -> None:
    p, seed = stage.params, stage.seed
    plan_file = stage.dep("prompts/plan.csv")
    plan = read_plan(plan_file)
    model = stage.dep("train_lora/model")  # train_ldm's model, or a LoRA fine-tune (train_lora.base)
    dataset = stage.out_path("dataset")
    seed_everything(seed)

    pipe = load_generator(model, pick_device())
    try:
        pipe.scheduler = make_sampler(p.scheduler, pipe.scheduler.config)
    except ValueError as exc:  # e.g. ddim for a rectified-flow model
        raise PipelineError(f"params.yaml: generate.scheduler: {exc} ({model} was trained with "
                            f"{type(pipe.scheduler).__name__})") from None
    image_conditioned = getattr(pipe, "image_conditioned", False)
    if image_conditioned:
        plan = image_plan(plan, p.image.modes, p.image.fractions, seed, plan_file).assign(
            interpolation=p.image.interpolation)  # the source images are the real dataset's
        sources = SourceEmbeddings(pipe, plan, stage.dep("ingest/dataset"), p.image.interpolation, plan_file)
    plan = finish_plan(plan, p)
    plan["model_sha256"] = sha256_tree(model)
    # finished shards are reused only by the same run: params, seed, plan, model, real images and code
    fingerprint = stage.fingerprint()

    def render(rows: pd.DataFrame):
        conditions = sources(rows) if image_conditioned else rows["text"].tolist()
        for _, images in pipe.generate_batches(conditions, rows["seed"].tolist(),
                                               num_inference_steps=p.num_inference_steps,
                                               guidance_scale=p.guidance_scale, batch_size=p.batch_size):
            yield from (to_array(img) for img in images)

    # a killed run resumes after its finished shards; shard workers share the folder (a shared lock, per-shard claims)
    shards = stage.run_dir(fingerprint, shared=shard != (1, 1)) / "shards"
    meta, stats = write_shards(plan, shards, p.shard_size, fingerprint, render, shard)
    if shard != (1, 1):  # one of N workers: the merge (a plain run) publishes
        print(f"generate: shard {shard[0]}/{shard[1]}: {stats['rendered']} images rendered into {shards}; "
              "`dvc repro generate` merges once every worker has finished")
        return
    meta = meta[["file_name", "text", *[c for c in meta.columns if c not in ("file_name", "text")]]]
    publish_shards(shards, meta, dataset)
    if image_conditioned:
        tiles, captions, ncol = image_grid_rows(pipe, plan, sources, p, seed)
    else:  # images spread over the whole plan (all planes/labels), not just the first few
        at = torch.linspace(0, len(meta) - 1, min(p.grid_images, len(meta))).round().long().unique().tolist()
        tiles = [load_png(f"{dataset}/{meta['file_name'].iloc[i]}") for i in at]
        captions, ncol = meta["text"].iloc[at].tolist(), 8
    save_png(image_grid(tiles, captions, ncol=ncol), stage.out_path("grid.png"))
    stage.write_provenance()
    stage.write_metrics({"images": len(meta), "prompts": int(meta["prompt_index"].nunique())}, headline=["images"])
    write_json("logs/generate.json", {**stats, "scheduler": p.scheduler, "steps": p.num_inference_steps,
                                      "device": str(pipe.device)})  # throughput: uncached, outside DVC outputs
    stage.finish_run(fingerprint)
    print(f"generate: {len(meta)} images from {meta['prompt_index'].nunique()} prompts -> {dataset} "
          f"({stats['rendered']} rendered, {stats['resumed']} from finished shards, "
          f"{stats['images_per_s'] or 0:.2f} images/s)")


def pop_shard(argv: list[str]) -> tuple[int, int]:
    """Take `--shard i/N` out of the command line (the rest is run_stage's)."""
    if "--shard" not in argv:
        return 1, 1
    at = argv.index("--shard")
    spec = argv[at + 1] if at + 1 < len(argv) else ""
    del argv[at : at + 2]
    return parse_shard(spec)


def cli(argv: list[str] | None = None) -> int:
    """`python -m stages.generate [--shard i/N]`; ``argv`` given: in this process (see run_stage)."""
    try:
        shard = pop_shard(sys.argv if argv is None else argv)  # the rest is run_stage's
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_stage(lambda stage: main(stage, shard), GenerateParams, argv, name="generate")


if __name__ == "__main__":
    sys.exit(cli())
