"""DVC stage `train_vae`: train (or fine-tune, or only validate) the AutoencoderKL; validate on val."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from diffusers import AutoencoderKL

from synthmed.config import as_dict, load_params, require_inputs, run_stage
from synthmed.data.dataset import split_stack
from synthmed.errors import PipelineError
from synthmed import store
from synthmed.io import atomic_path, write_metrics
from synthmed.models.autoencoder import (VAETrainConfig, build_autoencoder, encode_posterior, latent_scaling_factor,
                                         posterior_noise_fraction, posterior_sample_rows, train_autoencoder, validate)
from synthmed.provenance import run_fingerprint, seed_everything, write_provenance
from synthmed.runtime import make_accelerator
from synthmed.viz import image_grid, save_png, to_array

DATASET = "data/ingest/dataset"
OUT = "data/train_vae"
POSTERIOR_SAMPLE = 1000  # training images the scaling factor and the noise fraction are measured on


@dataclass(kw_only=True)
class TrainVAEParams(VAETrainConfig):  # the training-loop knobs, plus the model's
    pretrained: str  # "" = build from the params below; else a local folder or hub id of an AutoencoderKL
    pretrained_mode: Literal["finetune", "validate"]  # validate: no training, metrics + scaling factor only
    block_out_channels: list[int]  # downsampling factor = 2 ** (len - 1)
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    mid_attention: bool  # self-attention over the latent grid in the middle blocks


def load_vae(p: TrainVAEParams, channels: int, size: int, dims: int = 2) -> AutoencoderKL:
    if not p.pretrained:
        try:
            return build_autoencoder(in_channels=channels, block_out_channels=p.block_out_channels,
                                     layers_per_block=p.layers_per_block, latent_channels=p.latent_channels,
                                     norm_num_groups=p.norm_num_groups, sample_size=size,
                                     mid_attention=p.mid_attention, dims=dims)
        except ValueError as exc:
            raise PipelineError(f"params.yaml: train_vae: {exc}") from None
    if dims != 2:
        raise PipelineError("train_vae.pretrained is 2-D only (no pretrained volume autoencoder exists offline); "
                            "set train_vae.pretrained: \"\" for a 3-D dataset")
    path = Path(p.pretrained)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None  # a whole pipeline's folder
    try:
        vae = AutoencoderKL.from_pretrained(p.pretrained, subfolder=subfolder, local_files_only=path.is_dir())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"train_vae.pretrained={p.pretrained!r} cannot be loaded ({type(exc).__name__}); "
                            "give a local folder with an AutoencoderKL (config.json + weights)") from None
    if vae.config.in_channels != channels:
        raise PipelineError(f"the pretrained VAE expects {vae.config.in_channels} channel(s) but the images have "
                            f"{channels}; set ingest.channels to {vae.config.in_channels}")
    return vae


def main() -> None:
    p, seed = load_params("train_vae", TrainVAEParams)
    require_inputs("train_vae", DATASET)
    g = seed_everything(seed)
    accelerator = make_accelerator("no")  # one process, or one of several (SYNTHMED_PROCESSES, several GPUs)
    _, train = split_stack(DATASET, ["train"])  # uint8 on disk: batches are read and scaled as training goes
    _, val = split_stack(DATASET, ["val"])
    vae = load_vae(p, train.shape[1], train.shape[-1], dims=train.ndim - 2).to(accelerator.device)
    log = []
    fingerprint = run_fingerprint("train_vae", params=as_dict(p), seed=seed, inputs=[DATASET])
    if not (p.pretrained and p.pretrained_mode == "validate"):
        checkpoints = store.run_dir("train_vae", fingerprint) / "checkpoints"  # a killed run resumes from here
        try:
            log = train_autoencoder(vae, train, p, g, checkpoint_dir=checkpoints, fingerprint=fingerprint,
                                    accelerator=accelerator)
        except ValueError as exc:  # batch_size not divisible by the processes
            raise PipelineError(f"params.yaml: train_vae: {exc}") from None
        except FloatingPointError as exc:
            raise PipelineError(f"{exc}; the last good checkpoint is in {checkpoints}") from None
    if not accelerator.is_main_process:  # the main process alone measures and writes
        return
    sample = posterior_sample_rows(len(train), POSTERIOR_SAMPLE, seed)
    mean, std = encode_posterior(vae, train, rows=sample)
    vae.register_to_config(scaling_factor=latent_scaling_factor(mean, std, g))
    # Originals (top row) over their reconstructions, spread across the val split.
    pick = torch.linspace(0, len(val) - 1, min(8, len(val))).long()
    metrics, recon = validate(vae, val, pick.tolist())

    with atomic_path(f"{OUT}/vae", is_dir=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    with atomic_path(f"{OUT}/loss.csv") as tmp:
        pd.DataFrame(log, columns=["step", "loss", "recon", "kl"]).to_csv(tmp, index=False, float_format="%.6g")
    recon_u8 = ((recon + 1) * 127.5).round().to(torch.uint8)
    save_png(image_grid([to_array(x) for x in [*val[pick], *recon_u8]], ncol=len(pick)), f"{OUT}/recon.png")
    write_provenance(f"{OUT}/provenance.json", stage="train_vae", params=as_dict(p), seed=seed,
                     inputs=[DATASET])
    tail = log[-50:]
    write_metrics("train_vae", {
        **{f"val_{k}": v for k, v in metrics.items()},
        "scaling_factor": float(vae.config.scaling_factor),
        "posterior_noise_fraction": posterior_noise_fraction(mean, std),
        "posterior_sample": len(sample),  # the training images both figures above are measured on
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else 0.0,
        "parameters": sum(x.numel() for x in vae.parameters()),
    }, headline=["val_psnr", "val_ssim"])
    store.finish_run("train_vae", fingerprint)
    print(f"train_vae: val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")


if __name__ == "__main__":
    sys.exit(run_stage(main, data_parallel=True))
