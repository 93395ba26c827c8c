"""DVC stage `train_ldm`: latent diffusion on VAE latents of the train split, conditioned on the captions
(`condition: text`) or on a frozen image encoder's embedding of each image (`condition: image`,
DiNO-Diffusion: no captions needed).

`dvc repro train_ldm` trains on one device; `accelerate launch -m stages.train_ldm` trains the
same recipe data-parallel on several GPUs (the main process writes the outputs).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel

from synthmed.config import as_dict, load_params, require_at_least_one, require_inputs, run_stage
from synthmed.data.dataset import split_stack
from synthmed.errors import PipelineError
from synthmed import store
from synthmed.io import atomic_path, write_metrics
from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.models.autoencoder import load_autoencoder
from synthmed.models.cond_unet import nearest_valid_sizes
from synthmed.models.image_encoder import ImageEncoder
from synthmed.models.unet import build_unet
from synthmed.diffusion.train import (TAIL, LDMTrainConfig, NonFiniteLoss, build_image_pairs, build_latent_pairs,
                                     ema_weights, make_noise_scheduler, require_captions, select_caption_sources,
                                     train_ldm, train_loss_metrics, trained_parameters, validation_losses)
from synthmed.provenance import run_fingerprint, seed_everything, write_provenance
from synthmed.runtime import make_accelerator
from synthmed.text.encoder import TextEncoder
from synthmed.viz import image_grid, save_png, to_array

DATASET = "data/ingest/dataset"
PAIRS = "data/paraphrase/pairs.csv"
VAE = "data/train_vae/vae"
OUT = "data/train_ldm"


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
    backbone: Literal["standard", "invertible"]  # invertible: coupling blocks recomputed from their outputs (IDM)
    invertible_attention: bool  # backbone: invertible; checkerboard-split self-attention couplings (iTrans)
    block_out_channels: list[int]
    layers_per_block: int
    attention_head_dim: int  # diffusers' name; it is the number of attention heads
    attention_levels: list[int]  # resolution levels with transformer blocks (0 = full latent resolution)
    latent_patch: int  # the UNet sees the VAE latents packed in patch x patch blocks (1 = as they are)
    norm_num_groups: int
    dropout: float
    self_condition: bool  # feed the previous x0 estimate back as input (MSDM); doubles the UNet's input channels
    num_train_timesteps: int
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
    prediction_type: Literal["epsilon", "v_prediction"]
    gradient_checkpointing: bool  # recompute activations in backward: ~3x less activation memory, slower
    validate_every: int  # steps between validation loss + fixed-prompt sample grids (0 = only at the end)
    augment_copies: int  # brightness/contrast-augmented encodings per image (0 = off); no flips
    brightness: float  # max shift, as a fraction of the intensity range
    contrast: float  # max relative contrast change

    def __post_init__(self):
        super().__post_init__()
        require_at_least_one(self, "latent_patch")


USAGE = {"text": """Text-to-image latent diffusion (MSDM-style) trained by the `train_ldm` stage of synthmed.
Conditioning: frozen `{p.text_encoder}` token embeddings (max {p.text_max_length} tokens).

```python
import torch
from synthmed.diffusion.pipeline import SynthMedPipeline
pipe = SynthMedPipeline.from_pretrained("data/train_ldm/model")
image = pipe("Superior axial T1-weighted brain MRI slice at z = +40 mm", num_inference_steps=50,
             guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images[0]  # a PIL image
```
""", "image": """Image-conditioned latent diffusion (DiNO-Diffusion) trained by the `train_ldm` stage of synthmed.
Conditioning: the `{p.image_tokens}` global token(s) of the frozen image encoder `{p.image_encoder}`, linearly
projected to the cross-attention width; the all-zero embedding is the null condition of guidance.

```python
import torch
from synthmed.diffusion.pipeline import SynthMedPipeline
pipe = SynthMedPipeline.from_pretrained("data/train_ldm/model")
# variants of real images (uint8 [N, C, H, W]); or pipe(image_embeds=...) from mixed embeddings
images = pipe(image=real_images, num_inference_steps=50, guidance_scale=3.0,
              generator=torch.Generator().manual_seed(0)).images
```
"""}


def model_card(p: TrainLDMParams, seed: int, fingerprint: str, metrics: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in as_dict(p).items())
    return f"""# synthmed latent diffusion model

{USAGE[p.condition].format(p=p)}
Weights: {'the EMA (decay ' + str(p.ema_decay) + ')' if p.ema_decay > 0 else 'the final training weights'}.

- Run fingerprint (params, seed {seed}, input hashes, code): `{fingerprint}`
- Training data: {metrics['train_images']} images, {metrics['train_pairs']} (image, condition) pairs, \
{metrics['unique_captions']} unique captions; hashes in `provenance.json` next to this folder
- Loss (min-SNR-weighted as trained): training, mean of the last {min(TAIL, p.steps)} steps \
{metrics[f'train_loss_last{TAIL}_mean']:.4f}; validation, these weights {metrics['val_loss_ema']:.4f} \
(the raw training weights {metrics['val_loss_raw']:.4f}); UNet parameters: {metrics['parameters']:,}

| param | value |
|---|---|
{rows}
"""


def save_model(pipe: SynthMedPipeline, ema: EMAModel | None, card: str, folder: str | Path) -> None:
    """The pipeline folder with the weights that ship: the EMA's when training kept one."""
    if ema is not None:
        ema.copy_to(trained_parameters(pipe.unet))
    with atomic_path(folder, is_dir=True) as tmp:
        pipe.to("cpu").save_pretrained(tmp)
        (tmp / "README.md").write_text(card)


def summary_line(n_pairs: int, n_images: int, log: list[dict], metrics: dict) -> str:
    """The stage's last line: the last step's loss and the reported mean, each called what it is."""
    return (f"train_ldm: {n_pairs} pairs over {n_images} images; last-step loss {log[-1]['loss']:.4f}, "
            f"mean of last {len(log[-TAIL:])} steps {metrics[f'train_loss_last{TAIL}_mean']:.4f}; "
            f"val_loss_ema {metrics['val_loss_ema']:.4f}, val_loss_raw {metrics['val_loss_raw']:.4f}")


def main() -> None:
    p, seed = load_params("train_ldm", TrainLDMParams)
    g = seed_everything(seed)
    accelerator = make_accelerator(p.mixed_precision)
    device = accelerator.device
    require_inputs("train_ldm", PAIRS, DATASET, f"{VAE}/config.json")
    pairs = pd.read_csv(PAIRS, dtype=str, keep_default_na=False)
    pairs = select_caption_sources(pairs[pairs["split"] == "train"], p.caption_sources, PAIRS)
    rows, images = split_stack(DATASET, ["train"])  # uint8 on disk, encoded a batch at a time
    vae = load_autoencoder(VAE).to(device).eval().requires_grad_(False)
    side = images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
    if side % p.latent_patch:
        raise PipelineError(f"params.yaml: train_ldm.latent_patch={p.latent_patch} does not divide the "
                            f"{side}x{side} latent grid of {VAE}; use a divisor of {side}")
    volumes = images.ndim == 5
    grid, stride = side // p.latent_patch, 2 ** (len(p.block_out_channels) - 1)
    if (volumes or p.backbone == "invertible") and grid % stride:  # diffusers' 2-D UNet pads odd sizes itself
        factor = images.shape[-1] // grid
        valid = " or ".join(str(g * factor) for g in nearest_valid_sizes(grid, stride))
        raise PipelineError(f"params.yaml: ingest.resolution={images.shape[-1]} gives a {grid}-wide grid for the UNet "
                            f"(÷{factor}: the VAE's downsampling x train_ldm.latent_patch), which its total stride "
                            f"{stride} (2 ** (levels of train_ldm.block_out_channels - 1)) does not divide; nearest "
                            f"valid ingest.resolution: {valid}, or fewer levels")
    if volumes and p.condition == "image":
        raise PipelineError("params.yaml: train_ldm.condition=image needs 2-D images (the image encoders are 2-D); "
                            "use condition: text for volumes")
    val_rows, val_images = split_stack(DATASET, ["val"])
    # A checkpoint is resumed only by the run that wrote it: same params, seed, inputs and code; its encoded
    # latents and caption states live beside its checkpoints.
    fingerprint = run_fingerprint("train_ldm", params=as_dict(p), seed=seed, inputs=[PAIRS, DATASET, VAE])
    run = store.run_dir("train_ldm", fingerprint)
    encoded = run / "encoded"
    augment = dict(augment_copies=p.augment_copies, brightness=p.brightness, contrast=p.contrast, generator=g,
                   latent_patch=p.latent_patch, cache=encoded / "train")
    # data-parallel: each process encodes its share of the images and captions into the run's cache
    if p.condition == "image":
        encoder = ImageEncoder(p.image_encoder, p.image_tokens, device)
        pairs = rows.assign(caption_source="image")  # one (image, its own embedding) pair per image
        data = build_image_pairs(vae, encoder, images, **augment)
        val_data = build_image_pairs(vae, encoder, val_images, latent_patch=p.latent_patch, cache=encoded / "val")
        dims = dict(cross_attention_dim=p.block_out_channels[-1], encoder_hid_dim=encoder.dim)
    else:
        require_captions(pairs, rows)
        encoder = TextEncoder(p.text_encoder, p.text_max_length, device)
        data = build_latent_pairs(vae, encoder, pairs, images, rows["file_name"].tolist(), **augment)
        val_data = build_latent_pairs(vae, encoder, val_rows, val_images, val_rows["file_name"].tolist(),
                                      latent_patch=p.latent_patch, cache=encoded / "val")
        dims = dict(cross_attention_dim=encoder.hidden_size)
    try:
        unet = build_unet(sample_size=data.latent_mean.shape[-1], in_channels=data.latent_mean.shape[1],
                          block_out_channels=p.block_out_channels, layers_per_block=p.layers_per_block,
                          attention_head_dim=p.attention_head_dim, norm_num_groups=p.norm_num_groups,
                          dropout=p.dropout, self_condition=p.self_condition, attention_levels=p.attention_levels,
                          dims=data.latent_mean.ndim - 2, backbone=p.backbone,
                          invertible_attention=p.invertible_attention, **dims).to(device)
        if p.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
    except ValueError as exc:  # an option the backbone cannot honour, a grid its strides do not divide
        raise PipelineError(f"params.yaml: train_ldm: {exc}") from None
    scheduler = make_noise_scheduler(p.num_train_timesteps, p.prediction_type, p.beta_schedule)
    # the grid: 8 val images or their captions, spread over the split (all planes/labels), the same at every check
    at = torch.linspace(0, len(val_rows) - 1, 8).long().unique()
    if accelerator.is_main_process:
        shutil.rmtree(f"{OUT}/progress", ignore_errors=True)
    # The pipeline wraps the UNet being trained: it samples the progress grids and is saved at the end.
    pipe = SynthMedPipeline(unet, vae, DDIMScheduler.from_config(scheduler.config),
                            text_encoder_name=p.text_encoder, text_max_length=p.text_max_length,
                            condition=p.condition, image_encoder_name=p.image_encoder, image_tokens=p.image_tokens)
    if p.condition == "image":
        pipe.use_image_encoder(encoder)
        grid_conditions, sources = val_data.text_emb[at + 1], [to_array(x) for x in val_images[at]]
        captions = [f"val image {i}" for i in at.tolist()] + ["its variant"] * len(at)
    else:
        pipe.use_text_encoder(encoder)
        grid_conditions, sources = val_rows["text"].iloc[at].tolist(), []
        captions = grid_conditions
    pipe.set_progress_bar_config(disable=True)

    def on_every(step: int, model, ema) -> dict:
        """Validation losses and a grid of fixed prompts with fixed seeds, as training goes; the grid
        comes from the weights that ship (the EMA's)."""
        with ema_weights(model.eval(), ema):
            images = pipe.generate(grid_conditions, list(range(len(at))), num_inference_steps=25, guidance_scale=3.0)
        model.train()
        save_png(image_grid(sources + [to_array(x) for x in images], captions, ncol=8),
                 f"{OUT}/progress/step{step:07d}.png")
        return validation_losses(model, ema, scheduler, val_data, p.min_snr_gamma)

    try:
        log, ema = train_ldm(unet, scheduler, data, p, g, checkpoint_dir=run / "checkpoints", fingerprint=fingerprint,
                             every=p.validate_every or p.steps, on_every=on_every, accelerator=accelerator)
    except ValueError as exc:  # batch_size not divisible into micro-batches / processes
        raise PipelineError(f"params.yaml: train_ldm: {exc}") from None
    except NonFiniteLoss as exc:
        raise PipelineError(str(exc)) from None
    except torch.OutOfMemoryError:
        raise PipelineError(f"out of memory at batch_size={p.batch_size}; raise train_ldm.grad_accum_steps (same "
                            "effective batch, smaller micro-batches), lower batch_size, or set "
                            "gradient_checkpointing: true (training resumes from the last checkpoint)") from None
    if not accelerator.is_main_process:
        return

    last_val = next(r for r in reversed(log) if "val_loss_ema" in r)
    metrics = {
        **train_loss_metrics(log),
        "val_loss_ema": last_val["val_loss_ema"],
        "val_loss_raw": last_val["val_loss_raw"],
        "train_images": int(len(rows)),
        "train_pairs": int(len(pairs)),
        "unique_captions": len(set(pairs["text"])),
        "parameters": sum(x.numel() for x in unet.parameters()),
    }
    save_model(pipe, ema, model_card(p, seed, fingerprint, metrics), f"{OUT}/model")
    frame = pd.DataFrame(log)
    with atomic_path(f"{OUT}/loss.csv") as tmp:
        frame[["step", "loss", "lr"]].to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(f"{OUT}/val_loss.csv") as tmp:
        frame.dropna(subset=["val_loss_ema"])[["step", "val_loss_ema", "val_loss_raw"]].to_csv(
            tmp, index=False, float_format="%.6g")
    write_provenance(f"{OUT}/provenance.json", stage="train_ldm", params=as_dict(p), seed=seed,
                     inputs=[PAIRS, DATASET, VAE])
    write_metrics("train_ldm", metrics, headline=["val_loss_ema"])
    store.finish_run("train_ldm", fingerprint)
    print(summary_line(len(pairs), len(rows), log, metrics))


if __name__ == "__main__":
    sys.exit(run_stage(main, data_parallel=True))
