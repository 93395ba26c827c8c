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
from synthmed.diffusion.image_sources import SourceEmbeddings
from synthmed.diffusion.prompts import IMAGE_MODES, PLAN_COLUMNS, image_plan
from synthmed.diffusion.schedulers import make_sampler
from synthmed.diffusion.shards import parse_shard, publish_shards, write_shards
from synthmed.core.errors import PipelineError
from synthmed.core.io import read_table, sha256_tree, write_json
from synthmed.core.provenance import derive_seed, seed_everything
from synthmed.core.runtime import pick_device
from synthmed.core.stage import Stage, run_stage
from synthmed.viz import image_grid, load_png, save_png, to_array



@dataclass
class ImageModesParams:  # image-conditioned models only
    modes: list[Literal["reconstruction", "interpolation"]]
    fractions: list[float]  # interpolation: r, the partner's share of the embedding, in turn
    interpolation: Literal["slerp", "lerp"]

    def __post_init__(self):
        if not self.modes or set(self.modes) - set(IMAGE_MODES):
            raise ValueError(f"generate.image.modes must list some of {', '.join(IMAGE_MODES)}, got {self.modes}")
        if not self.fractions or not all(0 <= r <= 1 for r in self.fractions):
            raise ValueError(f"generate.image.fractions must be in [0, 1], got {self.fractions}")


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


def plan_for(p: GenerateParams, path: str) -> pd.DataFrame:
    plan = read_table(path)
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing or plan.empty:
        raise PipelineError(f"{path}: not a generation plan (missing {missing or 'rows'}); rerun `dvc repro prompts`")
    plan["seed"] = plan["seed"].astype("int64")  # 63-bit seeds, exact
    return plan


def finish_plan(plan: pd.DataFrame, p: GenerateParams) -> pd.DataFrame:
    plan = plan.assign(image_index=range(len(plan)))
    return plan.assign(scheduler=p.scheduler, num_inference_steps=p.num_inference_steps,
                       guidance_scale=p.guidance_scale)


def image_grid_rows(pipe, plan: pd.DataFrame, sources: SourceEmbeddings, p: GenerateParams, seed: int):
    """What an image-conditioned model's grid shows: sources beside variants of them, and interpolation strips
    (source, the mixes at each r, partner); rendered for the figure, from seeds of their own."""
    width = len(p.image.fractions) + 2
    tiles, captions = [], []
    picks = plan.drop_duplicates("source_file_name")
    picks = picks.iloc[torch.linspace(0, len(picks) - 1, min(4, len(picks))).round().long().unique().tolist()]
    kw = dict(num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale, batch_size=p.batch_size)
    for k, row in enumerate(picks.itertuples()):
        if "reconstruction" in p.image.modes:
            rows = pd.DataFrame({"source_file_name": [row.source_file_name] * (width - 1)})
            seeds = [derive_seed(seed, "grid", k, j) for j in range(width - 1)]
            tiles += [sources.source(row.source_file_name), *map(to_array, pipe.generate(sources(rows), seeds, **kw))]
            captions += [f"source {row.label}"] + ["variant"] * (width - 1)
        if "interpolation" in p.image.modes:
            partner = plan[(plan["mode"] == "interpolation") & (plan["source_file_name"] == row.source_file_name)]
            if partner.empty:
                continue
            b = partner["partner_file_name"].iloc[0]
            rows = pd.DataFrame({"source_file_name": row.source_file_name, "partner_file_name": b,
                                 "mode": "interpolation", "r": p.image.fractions})
            images = pipe.generate(sources(rows), [derive_seed(seed, "grid-mix", k)] * len(rows), **kw)
            tiles += [sources.source(row.source_file_name), *map(to_array, images), sources.source(b)]
            captions += ["source"] + [f"r={r:g}" for r in p.image.fractions] + ["partner"]
    return tiles, captions, width


def main(stage: Stage, shard: tuple[int, int] = (1, 1)) -> None:
    p, seed = stage.params, stage.seed
    plan_file = stage.dep("prompts/plan.csv")
    plan = plan_for(p, plan_file)
    model = stage.dep("train_lora/model")  # train_ldm's model, or a LoRA fine-tune (train_lora.base)
    dataset = stage.out_path("dataset")
    seed_everything(seed)

    pipe = load_generator(model, pick_device())
    pipe.scheduler = make_sampler(p.scheduler, pipe.scheduler.config)
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

    shards = stage.run_dir(fingerprint) / "shards"  # a killed run resumes after its finished shards
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
