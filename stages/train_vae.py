"""DVC stage `train_vae`: train (or fine-tune, or only validate) the AutoencoderKL; validate on val."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from diffusers import AutoencoderKL

from synthmed.core.config import as_dict
from synthmed.data.dataset import split_stack
from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path, write_csv
from synthmed.models.autoencoder import (VAEModelParams, VAETrainConfig, build_autoencoder, encode_posterior, latent_scaling_factor,
                                         posterior_noise_fraction, posterior_sample_rows, train_autoencoder, validate)
from synthmed.models.pixel_space import PIXELS, PixelSpace
from synthmed.core.provenance import seed_everything
from synthmed.core.runtime import make_accelerator
from synthmed.core.stage import Stage, run_stage
from synthmed.viz import image_grid, save_png, to_array

POSTERIOR_SAMPLE = 1000  # training images the scaling factor and the noise fraction are measured on


@dataclass(kw_only=True)
class TrainVAEParams(VAETrainConfig):  # the training-loop knobs, plus the model's
    pretrained: str  # "" = build from the params below; pixels = none (pixel-space diffusion); else a local folder or hub id of an AutoencoderKL
    pretrained_mode: Literal["finetune", "validate"]  # validate: no training, metrics + scaling factor only
    model: VAEModelParams

    MOVED = {f.name: f"model.{f.name}" for f in fields(VAEModelParams)}  # the flat keys before they were grouped


def load_vae(p: TrainVAEParams, channels: int, size: int, dims: int = 2) -> AutoencoderKL:
    if p.pretrained == PIXELS:
        return PixelSpace(dims=dims, in_channels=channels, sample_size=size)
    if not p.pretrained:
        try:
            return build_autoencoder(in_channels=channels, sample_size=size, dims=dims, **as_dict(p.model))
        except ValueError as exc:
            raise PipelineError(f"params.yaml: train_vae.model: {exc}") from None
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


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    dataset = stage.dep("ingest/dataset")
    g = seed_everything(seed)
    accelerator = make_accelerator("no")  # one process, or one of several (SYNTHMED_PROCESSES, several GPUs)
    _, train = split_stack(dataset, ["train"])  # uint8 on disk: batches are read and scaled as training goes
    _, val = split_stack(dataset, ["val"])
    vae = load_vae(p, train.shape[1], train.shape[-1], dims=train.ndim - 2).to(accelerator.device)
    log = []
    fingerprint = stage.fingerprint()
    if not (p.pretrained == PIXELS or p.pretrained and p.pretrained_mode == "validate"):
        checkpoints = stage.run_dir(fingerprint) / "checkpoints"  # a killed run resumes from here
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

    with atomic_path(stage.out_path("vae"), is_dir=True) as tmp:
        vae.to("cpu").save_pretrained(tmp)
    write_csv(stage.out_path("loss.csv"), pd.DataFrame(log, columns=["step", "loss", "recon", "kl"]))
    recon_u8 = ((recon + 1) * 127.5).round().to(torch.uint8)
    save_png(image_grid([to_array(x) for x in [*val[pick], *recon_u8]], ncol=len(pick)), stage.out_path("recon.png"))
    stage.write_provenance()
    tail = log[-50:]
    stage.write_metrics({
        **{f"val_{k}": v for k, v in metrics.items()},
        "scaling_factor": float(vae.config.scaling_factor),
        "posterior_noise_fraction": posterior_noise_fraction(mean, std),
        "posterior_sample": len(sample),  # the training images both figures above are measured on
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else 0.0,
        "parameters": sum(x.numel() for x in vae.parameters()),
    }, headline=["val_psnr", "val_ssim"])
    stage.finish_run(fingerprint)
    print(f"train_vae: val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, TrainVAEParams, argv, data_parallel=True)


if __name__ == "__main__":
    sys.exit(cli())
