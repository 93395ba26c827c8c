"""VAE recipes side by side on the ingested dataset: seconds, val PSNR/SSIM, val sharpness and train PSNR; prints
JSON lines. Sharpness: the reconstructions' Laplacian energy over the originals' (1 = as sharp, below 1 = blurred),
a figure no recipe's loss optimises.

Each recipe trains the train_vae stage's model with the stage's own loop (synthmed.models.autoencoder)
on the train split and is scored on the val split, one after the other in this process (never run
two torch jobs at once on a small CPU). A recipe is the params.yaml `train_vae` section with
overrides; the ones below are the search of issue 13 (benchmarks/recipe_search.md).

    dvc repro ingest && .venv/bin/python benchmarks/vae_recipes.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synthmed.core.config import apply_cpu_params  # noqa: E402

DATASET = REPO / "data/ingest/dataset"
BASE = {"steps": 400, "lr": 2e-3, "warmup_steps": 25, "mixed_precision": "bf16", "mid_attention": False,
        "latent_channels": 4, "ssim_weight": 0.0, "perceptual_weight": 0.0, "norm_num_groups": 16, "batch_size": 16}
RECIPES = {  # overrides of BASE; "attn": self-attention in the middle blocks (the old default)
    "f4_16_32_64_attn_constant_lr_fp32": {"block_out_channels": [16, 32, 64], "mid_attention": True, "lr": 5e-4,
                                          "warmup_steps": 0, "mixed_precision": "no"},  # the old default recipe
    "f4_16_32_64_attn": {"block_out_channels": [16, 32, 64], "mid_attention": True},
    "f4_16_32_64_attn_lr1e-3_ssim": {"block_out_channels": [16, 32, 64], "mid_attention": True, "lr": 1e-3,
                                     "ssim_weight": 0.2},
    "f4_16_32_64_attn_lr1e-3_c8": {"block_out_channels": [16, 32, 64], "mid_attention": True, "lr": 1e-3,
                                   "latent_channels": 8},
    "f4_16_32_64_c8": {"block_out_channels": [16, 32, 64], "latent_channels": 8},
    "f4_16_32_64_c16": {"block_out_channels": [16, 32, 64], "latent_channels": 16},
    "f4_32_64_64": {"block_out_channels": [32, 64, 64]},
    "f4_32_64_64_c8": {"block_out_channels": [32, 64, 64], "latent_channels": 8},
    "f4_32_64_64_c16": {"block_out_channels": [32, 64, 64], "latent_channels": 16},  # unpacked: the UNet's grid
    "f4_32_64_64_c16_perc0.1": {"block_out_channels": [32, 64, 64], "latent_channels": 16, "perceptual_weight": 0.1},
    "f4_32_64_64_c16_perc1": {"block_out_channels": [32, 64, 64], "latent_channels": 16, "perceptual_weight": 1.0},
    "f2_16_32": {"block_out_channels": [16, 32]},
    "f2_32_32": {"block_out_channels": [32, 32]},
    "f2_32_32_perc1": {"block_out_channels": [32, 32], "perceptual_weight": 1.0},
    "f2_32_64": {"block_out_channels": [32, 64]},
    "f2_32_64_attn": {"block_out_channels": [32, 64], "mid_attention": True},
}


def laplacian_energy(images: torch.Tensor) -> float:
    """Mean squared response of the 4-neighbour Laplacian: the images' edge and texture energy."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(images.shape[1], 1, 3, 3)
    return float(torch.nn.functional.conv2d(images.float(), kernel, groups=images.shape[1]).pow(2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", choices=list(RECIPES), help="recipes to run (default: all)")
    args = ap.parse_args()
    apply_cpu_params(REPO / "params.yaml")
    from synthmed.data.dataset import split_images, to_model_range
    from synthmed.models.unet import downsampling
    from synthmed.models.autoencoder import (VAETrainConfig, build_autoencoder, reconstruct,
                                             reconstruction_metrics, train_autoencoder)

    section = yaml.safe_load((REPO / "params.yaml").read_text())["train_vae"]
    defaults = {**section, **section.pop("model")}  # the recipes override model and loop keys alike
    train = to_model_range(split_images(DATASET, ["train"])[1])
    val = to_model_range(split_images(DATASET, ["val"])[1])
    model_keys = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "mid_attention")
    for name in args.only or RECIPES:
        p = {**defaults, **BASE, **RECIPES[name], "checkpoint_every": 0}
        torch.manual_seed(0)
        vae = build_autoencoder(in_channels=train.shape[1], sample_size=train.shape[-1],
                                **{k: p[k] for k in model_keys})
        cfg = VAETrainConfig(**{k: p[k] for k in VAETrainConfig.__dataclass_fields__})
        start = time.perf_counter()
        train_autoencoder(vae, train, cfg, torch.Generator().manual_seed(42))
        seconds = time.perf_counter() - start
        recon = reconstruct(vae, val)
        on_val = reconstruction_metrics(val, recon)
        on_train = reconstruction_metrics(train[:64], reconstruct(vae, train[:64]))
        factor = downsampling(p["block_out_channels"])
        print(json.dumps({"recipe": name, "latent": f"{train.shape[-1] // factor}x{train.shape[-1] // factor}"
                          f"x{p['latent_channels']}", "steps": p["steps"], "seconds": round(seconds),
                          "val_psnr": round(on_val["psnr"], 2), "val_ssim": round(on_val["ssim"], 3),
                          "val_sharpness": round(laplacian_energy(recon) / laplacian_energy(val), 3),
                          "train_psnr": round(on_train["psnr"], 2)}), flush=True)


if __name__ == "__main__":
    main()
