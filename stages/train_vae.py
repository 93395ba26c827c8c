"""DVC stage `train_vae`: train the AutoencoderKL on the train split; validate on val."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from synthmed.config import as_dict, load_params, require_inputs, run_stage
from synthmed.data.dataset import split_images, to_model_range
from synthmed.io import atomic_path, write_json
from synthmed.models.autoencoder import (VAETrainConfig, build_autoencoder, latent_scaling_factor,
                                         reconstruct, reconstruction_metrics, train_autoencoder)
from synthmed.provenance import seed_everything, write_provenance
from synthmed.runtime import pick_device
from synthmed.viz import image_grid, save_png, to_array

DATASET = "data/ingest/dataset"
OUT = "data/train_vae"


@dataclass
class TrainVAEParams(VAETrainConfig):  # the training-loop knobs, plus the model's
    block_out_channels: list[int]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int


def main() -> None:
    p, seed = load_params("train_vae", TrainVAEParams)
    require_inputs("train_vae", DATASET)
    g = seed_everything(seed)
    _, train_u8 = split_images(DATASET, ["train"])
    _, val_u8 = split_images(DATASET, ["val"])
    train, val = to_model_range(train_u8), to_model_range(val_u8)
    device = pick_device()
    vae = build_autoencoder(in_channels=train.shape[1], block_out_channels=p.block_out_channels,
                            layers_per_block=p.layers_per_block, latent_channels=p.latent_channels,
                            norm_num_groups=p.norm_num_groups, sample_size=train.shape[-1]).to(device)
    log = train_autoencoder(vae, train, p, g)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, train, g))
    recon = reconstruct(vae, val)
    metrics = reconstruction_metrics(val, recon)

    with atomic_path(f"{OUT}/vae", is_dir=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    with atomic_path(f"{OUT}/loss.csv") as tmp:
        pd.DataFrame(log).to_csv(tmp, index=False, float_format="%.6g")
    # Originals (top row) over their reconstructions, spread across the val split.
    pick = torch.linspace(0, len(val) - 1, min(8, len(val))).long()
    recon_u8 = ((recon[pick] + 1) * 127.5).round().to(torch.uint8)
    save_png(image_grid([to_array(x) for x in [*val_u8[pick], *recon_u8]], ncol=len(pick)), f"{OUT}/recon.png")
    write_provenance(f"{OUT}/provenance.json", stage="train_vae", params=as_dict(p), seed=seed,
                     inputs=[DATASET])
    write_json("metrics/train_vae.json", {
        **{f"val_{k}": v for k, v in metrics.items()},
        "scaling_factor": float(vae.config.scaling_factor),
        "final_loss": sum(r["loss"] for r in log[-50:]) / len(log[-50:]),
        "parameters": sum(x.numel() for x in vae.parameters()),
    })
    print(f"train_vae: val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")


if __name__ == "__main__":
    run_stage(main)
