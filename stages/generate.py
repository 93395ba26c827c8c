"""DVC stage `generate`: synthetic ImageFolder from the captions of held-out images."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from PIL import Image

from synthmed.config import as_dict, load_params, require_inputs, run_stage
from synthmed.data.imagefolder import METADATA
from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, sha256_bytes, sha256_file, write_json
from synthmed.provenance import derive_seed, seed_everything, write_provenance
from synthmed.runtime import pick_device
from synthmed.viz import image_grid, save_png, to_array

PAIRS = "data/paraphrase/pairs.csv"
MODEL = "data/train_ldm/model"
OUT = "data/generate"


@dataclass
class GenerateParams:
    splits: list[str]
    images_per_caption: int
    num_inference_steps: int
    guidance_scale: float
    batch_size: int
    grid_images: int


def prompts_for(pairs: pd.DataFrame, splits: list[str], n: int, seed: int) -> pd.DataFrame:
    """One row per image to generate: the original captions of held-out images, n times each."""
    src = pairs[pairs["split"].isin(splits) & (pairs["caption_source"] == "original")]
    if src.empty:
        raise PipelineError(f"{PAIRS}: no original captions in split(s) {splits}; check generate.splits")
    rows = [
        {"text": r.text, "label": r.label, "split": r.split, "source_file_name": r.file_name,
         "prompt_source": r.caption_source, "seed": derive_seed(seed, "generate", r.file_name, r.text, k)}
        for r in src.itertuples(index=False) for k in range(n)
    ]
    out = pd.DataFrame(rows)
    out.insert(0, "file_name", [f"synth_{i:05d}.png" for i in range(len(out))])
    return out


def main() -> None:
    p, seed = load_params("generate", GenerateParams)
    require_inputs("generate", PAIRS, f"{MODEL}/model_index.json")
    seed_everything(seed)
    device = pick_device()
    pairs = pd.read_csv(PAIRS, dtype=str, keep_default_na=False)
    plan = prompts_for(pairs, p.splits, p.images_per_caption, seed)

    pipe = SynthMedPipeline.from_pretrained(MODEL).to(device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise PipelineError(f"{MODEL}: the UNet expects {pipe.unet.config.in_channels} latent channels but the VAE "
                            f"gives {pipe.vae.config.latent_channels}; rerun train_ldm (dvc repro train_ldm)")
    model_sha = sha256_file(f"{MODEL}/unet/diffusion_pytorch_model.safetensors")

    # The grid shows images spread over the whole plan (all planes/labels), not just the first few.
    grid_at = set(torch.linspace(0, len(plan) - 1, min(p.grid_images, len(plan))).round().long().tolist())
    digests, grid = [], {}
    with atomic_path(f"{OUT}/dataset", is_dir=True) as tmp:
        for start, images in pipe(plan["text"].tolist(), plan["seed"].tolist(), num_inference_steps=p.num_inference_steps,
                                  guidance_scale=p.guidance_scale, batch_size=p.batch_size):
            for k, img in enumerate(images):
                path = tmp / plan["file_name"].iloc[start + k]
                Image.fromarray(to_array(img)).save(path, format="PNG")
                digests.append(sha256_bytes(path.read_bytes()))
                if start + k in grid_at:
                    grid[start + k] = to_array(img)
        plan["model_sha256"] = model_sha
        plan["sha256"] = digests
        plan["seed"] = plan["seed"].astype(str)  # 63-bit seeds stay exact in any CSV reader
        plan.to_csv(tmp / METADATA, index=False)
    save_png(image_grid(list(grid.values()), plan["text"].iloc[list(grid)].tolist(), ncol=8), f"{OUT}/grid.png")
    write_provenance(f"{OUT}/provenance.json", stage="generate", params=as_dict(p), seed=seed,
                     inputs=[PAIRS, MODEL])
    write_json("metrics/generate.json", {"images": len(plan), "prompts": int(plan["text"].nunique())})
    print(f"generate: {len(plan)} images from {plan['text'].nunique()} captions -> {OUT}/dataset")


if __name__ == "__main__":
    run_stage(main)
