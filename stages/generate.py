"""DVC stage `generate`: a synthetic ImageFolder, written in resumable shards.

Every image records its prompt, label, seed, sampler and the model's hash in
metadata.csv; `python -m synthmed.diffusion.regenerate <file_name>` remakes any one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from synthmed.config import as_dict, load_params, require_at_least_one, require_inputs, run_stage
from synthmed.diffusion.generators import load_generator
from synthmed.diffusion.prompts import PLAN_COLUMNS
from synthmed.diffusion.schedulers import make_sampler
from synthmed.diffusion.shards import publish_shards, write_shards
from synthmed.errors import PipelineError
from synthmed import store
from synthmed.io import sha256_tree, write_json, write_metrics
from synthmed.provenance import run_fingerprint, seed_everything, write_provenance
from synthmed.runtime import pick_device
from synthmed.viz import image_grid, load_png, save_png, to_array

PLAN = "data/prompts/plan.csv"
MODEL = "data/train_lora/model"  # train_ldm's model, or a LoRA fine-tune (train_lora.base)
OUT = "data/generate"
DATASET = f"{OUT}/dataset"


@dataclass
class GenerateParams:
    scheduler: Literal["ddim", "dpmpp", "euler", "ddpm"]
    num_inference_steps: int
    guidance_scale: float
    batch_size: int
    shard_size: int
    grid_images: int

    def __post_init__(self):
        require_at_least_one(self, "num_inference_steps", "batch_size", "shard_size",
                             "grid_images")


def plan_for(p: GenerateParams) -> pd.DataFrame:
    plan = pd.read_csv(PLAN, dtype=str, keep_default_na=False)
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing or plan.empty:
        raise PipelineError(f"{PLAN}: not a generation plan (missing {missing or 'rows'}); rerun `dvc repro prompts`")
    plan["seed"] = plan["seed"].astype("int64")  # 63-bit seeds, exact
    plan["image_index"] = plan.index
    return plan.assign(scheduler=p.scheduler, num_inference_steps=p.num_inference_steps,
                       guidance_scale=p.guidance_scale)


def main() -> None:
    p, seed = load_params("generate", GenerateParams)
    require_inputs("generate", PLAN)
    plan = plan_for(p)
    require_inputs("generate", f"{MODEL}/model_index.json")
    seed_everything(seed)

    pipe = load_generator(MODEL, pick_device())
    pipe.scheduler = make_sampler(p.scheduler, pipe.scheduler.config)
    plan["model_sha256"] = sha256_tree(MODEL)
    inputs = [PLAN, MODEL]
    # finished shards are reused only by the same run: params, seed, plan, model and code
    fingerprint = run_fingerprint("generate", params=as_dict(p), seed=seed, inputs=inputs)

    def render(rows: pd.DataFrame):
        for _, images in pipe.generate_batches(rows["text"].tolist(), rows["seed"].tolist(),
                                               num_inference_steps=p.num_inference_steps,
                                               guidance_scale=p.guidance_scale, batch_size=p.batch_size):
            yield from (to_array(img) for img in images)

    shards = store.run_dir("generate", fingerprint) / "shards"  # a killed run resumes after its finished shards
    meta, stats = write_shards(plan, shards, p.shard_size, fingerprint, render)
    meta = meta[["file_name", "text", *[c for c in meta.columns if c not in ("file_name", "text")]]]
    publish_shards(shards, meta, DATASET)
    # The grid shows images spread over the whole plan (all planes/labels), not just the first few.
    at = torch.linspace(0, len(meta) - 1, min(p.grid_images, len(meta))).round().long().unique().tolist()
    save_png(image_grid([load_png(f"{DATASET}/{meta['file_name'].iloc[i]}") for i in at],
                        meta["text"].iloc[at].tolist(), ncol=8), f"{OUT}/grid.png")
    write_provenance(f"{OUT}/provenance.json", stage="generate", params=as_dict(p), seed=seed, inputs=inputs)
    write_metrics("generate", {"images": len(meta), "prompts": int(meta["prompt_index"].nunique())}, headline=["images"])
    write_json("logs/generate.json", {**stats, "scheduler": p.scheduler, "steps": p.num_inference_steps,
                                      "device": str(pipe.device)})  # throughput: uncached, outside DVC outputs
    store.finish_run("generate", fingerprint)
    print(f"generate: {len(meta)} images from {meta['prompt_index'].nunique()} prompts -> {DATASET} "
          f"({stats['rendered']} rendered, {stats['resumed']} from finished shards, "
          f"{stats['images_per_s'] or 0:.2f} images/s)")


if __name__ == "__main__":
    run_stage(main)
