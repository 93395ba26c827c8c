"""DVC stage `train_ldm`: latent diffusion on VAE latents of the train split, conditioned on the captions
(`condition: text`) or on a frozen image encoder's embedding of each image (`condition: image`,
DiNO-Diffusion: no captions needed). With several GPUs (or SYNTHMED_PROCESSES=N) it trains data-parallel.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from typing import Literal

import pandas as pd
from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.fit import fit
from synthmed.diffusion.latents import conditioning, training_rows
from synthmed.diffusion.model_card import model_card, save_model, summary_line
from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.schedulers import default_sampler, make_noise_scheduler
from synthmed.core.io import write_csv
from synthmed.models.autoencoder import load_autoencoder
from synthmed.models.unet import UNET_KEYS, UNetParams, check_latent_grid, unet_for_training
from synthmed.core.provenance import seed_everything
from synthmed.core.runtime import make_accelerator
from synthmed.core.stage import Stage, run_stage
from synthmed.viz import to_array


@dataclass
class TrainLDMParams(LDMTrainConfig):  # the training-loop knobs, plus the model's
    condition: Literal["text", "image"]
    image_encoder: str  # condition: image; efficientnet-lite0 (offline) or a transformers vision backbone id/folder
    image_tokens: Literal["cls", "mean", "cls+mean"]  # which global token(s) of it condition the UNet
    text_encoder: str
    text_max_length: int
    # which pair rows to train on: original, paraphrase (whatever the paraphrase stage produced), or only
    # the rows of one paraphrase backend (rule, llm)
    caption_sources: list[Literal["original", "paraphrase", "rule", "llm"]]
    unet: UNetParams
    num_train_timesteps: int
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
    prediction_type: Literal["epsilon", "v_prediction", "flow"]  # flow: rectified flow (flow matching)
    zero_terminal_snr: bool  # v_prediction: betas rescaled so that the last timestep is pure noise
    flow_shift: float  # flow: noise levels s -> shift s / (1 + (shift - 1) s); 1 = uniform
    gradient_checkpointing: bool  # recompute activations in backward: ~3x less activation memory, slower
    validate_every: int  # steps between validation loss + fixed-prompt sample grids (0 = only at the end)
    augment_copies: int  # brightness/contrast-augmented encodings per image (0 = off); no flips
    brightness: float  # max shift, as a fraction of the intensity range
    contrast: float  # max relative contrast change
    seed_offset: int  # added to `seed` for this stage's randomness (weights, batches, noise); the split stays

    MOVED = {k: f"unet.{k}" for k in UNET_KEYS}  # the flat keys before the model's were grouped

    def __post_init__(self):
        super().__post_init__()
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("train_ldm.zero_terminal_snr needs prediction_type: v_prediction (at zero SNR an epsilon "
                             "model has nothing to predict from)")
        if self.flow_shift <= 0:
            raise ValueError(f"train_ldm.flow_shift must be > 0, got {self.flow_shift}")


def main(stage: Stage) -> None:
    p = stage.params
    seed = stage.seed + p.seed_offset  # this training run's randomness; the upstream split keeps `seed`
    g = seed_everything(seed)
    accelerator = make_accelerator(p.mixed_precision)
    dataset, pairs_file, vae_dir = (stage.dep(k) for k in ("ingest/dataset", "paraphrase/pairs.csv", "train_vae/vae"))
    pairs, rows, images, val_rows, val_images = training_rows(dataset, pairs_file, p.caption_sources)
    vae = load_autoencoder(vae_dir).to(accelerator.device).eval().requires_grad_(False)
    check_latent_grid(images.shape[-1], vae.config.block_out_channels, p.unet, volumes=images.ndim == 5)
    # A checkpoint is resumed only by the run that wrote it (same params, seed, inputs and code); its encoded
    # latents and conditions live beside its checkpoints. Each process encodes its share.
    fingerprint = stage.fingerprint()
    run = stage.run_dir(fingerprint)
    cond = conditioning(p, vae, accelerator.device, pairs, rows, images, val_rows, val_images, g, run / "encoded",
                        f"{dataset}/metadata.csv")
    unet = unet_for_training(p.unet, cond.data.latent_mean, cond.unet_dims, p.gradient_checkpointing).to(
        accelerator.device)
    scheduler = make_noise_scheduler(p.num_train_timesteps, p.prediction_type, p.beta_schedule, p.zero_terminal_snr,
                                     p.flow_shift)
    # The pipeline wraps the UNet being trained: it samples the progress grids and is saved at the end.
    pipe = SynthMedPipeline(unet, vae, default_sampler(scheduler), text_encoder_name=p.text_encoder,
                            text_max_length=p.text_max_length, condition=p.condition,
                            image_encoder_name=p.image_encoder, image_tokens=p.image_tokens)
    (pipe.use_image_encoder if p.condition == "image" else pipe.use_text_encoder)(cond.encoder)
    pipe.set_progress_bar_config(disable=True)
    progress = stage.out_path("progress")
    if accelerator.is_main_process:
        shutil.rmtree(progress, ignore_errors=True)

    def grid():
        seeds = list(range(len(cond.grid_captions) - len(cond.grid_sources)))
        images = pipe.generate(cond.grid_conditions, seeds, num_inference_steps=25, guidance_scale=3.0)
        return cond.grid_sources + [to_array(x) for x in images], cond.grid_captions

    result = fit(unet, scheduler, cond.data, cond.val_data, p, g, section="train_ldm",
                 checkpoint_dir=run / "checkpoints", fingerprint=fingerprint, every=p.validate_every or p.steps,
                 grid=grid, grid_path=lambda step: f"{progress}/step{step:07d}.png", accelerator=accelerator,
                 memory_hint=", or set gradient_checkpointing: true")
    if not accelerator.is_main_process:
        return
    metrics = {**result.metrics, "train_images": int(len(rows)), "train_pairs": int(len(cond.pairs)),
               "unique_captions": len(set(cond.pairs["text"])), "parameters": sum(x.numel() for x in unet.parameters())}
    save_model(pipe, result.ema, model_card(p, seed, fingerprint, metrics), stage.out_path("model"))
    log = pd.DataFrame(result.log)
    write_csv(stage.out_path("loss.csv"), log[["step", "loss", "lr"]])
    write_csv(stage.out_path("val_loss.csv"), log.dropna(subset=["val_loss_ema"])[["step", "val_loss_ema", "val_loss_raw"]])
    stage.write_provenance()
    stage.write_metrics(metrics, headline=["val_loss_ema"])
    stage.finish_run(fingerprint)
    print(summary_line(len(cond.pairs), len(rows), result.log, metrics))


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, TrainLDMParams, argv, data_parallel=True)


if __name__ == "__main__":
    sys.exit(cli())
