"""DVC stage `train_lora`: LoRA fine-tuning of a pretrained text-to-image pipeline; `generate` samples its output.

`base: none` (the default) hands train_ldm's model to generate unchanged. `synthmed` (a SynthMedPipeline
folder, by default this run's own train_ldm model) and `stable-diffusion` (a folder or hub id) are
fine-tuned with peft LoRA on their UNet's attention, by train_ldm's loop: the same loss, context
dropout for guidance, EMA (of the adapter), checkpoints and resume.

Outputs: `data/train_lora/adapter/` (`pytorch_lora_weights.safetensors` + model card) and
`data/train_lora/model/` (the base with the adapter merged, what generate samples). The merged model is
made by loading the saved adapter onto a fresh copy of the base, so a written adapter is one that loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from synthmed import store
from synthmed.config import as_dict, load_params, require_inputs, run_stage
from synthmed.data.dataset import split_images
from synthmed.diffusion.bases import ADAPTER_FILE, DATA_FORMAT, load_adapter, load_base, save_adapter
from synthmed.diffusion.generators import DiffusersGenerator
from synthmed.diffusion.train import (TAIL, LDMTrainConfig, NonFiniteLoss, build_latent_pairs, ema_weights,
                                     select_caption_sources, train_ldm, train_loss_metrics, trained_parameters,
                                     validation_losses)
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, write_metrics
from synthmed.models.lora import LoraParams, add_lora
from synthmed.provenance import input_hashes, run_fingerprint, seed_everything, write_provenance
from synthmed.runtime import make_accelerator
from synthmed.viz import image_grid, save_png, to_array

DATASET = "data/ingest/dataset"
PAIRS = "data/paraphrase/pairs.csv"
SCRATCH = "data/train_ldm/model"
OUT = "data/train_lora"
MODEL = f"{OUT}/model"
ADAPTER = f"{OUT}/adapter"


@dataclass
class TrainLoraParams(LDMTrainConfig):  # the training-loop knobs, plus the base's and the adapter's
    base: Literal["none", "synthmed", "stable-diffusion"]
    path: str  # the base: a local pipeline folder or a hub id; "" = data/train_ldm/model (synthmed)
    rank: int
    alpha: float
    lora_dropout: float
    target_modules: list[str]
    resolution: int  # training image side for a pretrained base; 0 = its native size
    caption_sources: list[Literal["original", "paraphrase", "rule", "llm"]]
    validate_every: int  # steps between validation losses + sample grids (0 = only at the end)

    def __post_init__(self):
        super().__post_init__()
        self.lora = LoraParams(self.rank, self.alpha, self.lora_dropout, self.target_modules)  # checks them

    @property
    def base_path(self) -> str:
        return self.path or SCRATCH


def model_card(p: TrainLoraParams, seed: int, fingerprint: str, metrics: dict, data_sha: str) -> str:
    load = ("pipe = StableDiffusionPipeline.from_pretrained(BASE)\npipe.load_lora_weights(\"data/train_lora/adapter\")"
            if p.base == "stable-diffusion" else
            "pipe = SynthMedPipeline.from_pretrained(BASE)\npipe.unet.load_lora_adapter(\"data/train_lora/adapter\", "
            "use_safetensors=True, prefix=None)")
    return f"""# synthmed LoRA adapter

LoRA fine-tune of the {p.base} pipeline `{p.base_path}` by the `train_lora` stage of synthmed.

- Rank {p.rank}, alpha {p.alpha:g}, dropout {p.lora_dropout:g}, on the UNet's `{', '.join(p.target_modules)}`:
  {metrics['lora_parameters']:,} trained parameters beside {metrics['base_unet_parameters']:,} frozen ones
- {p.steps} steps at batch {p.batch_size}, lr {p.lr:g}; weights: {'the EMA (decay ' + str(p.ema_decay) + ')'
  if p.ema_decay > 0 else 'the final training weights'}
- Training data: {metrics['train_images']} images, {metrics['train_pairs']} (image, caption) pairs at
  {metrics['resolution']} px; dataset sha256 `{data_sha}`
- Run fingerprint (params, seed {seed}, input hashes, code): `{fingerprint}`
- Validation loss: these weights {metrics['val_loss_ema']:.4f}, the raw training weights {metrics['val_loss_raw']:.4f}

```python
{load}
```

`../model/` holds the same pipeline with the adapter merged into its weights.
"""


def pass_through(p: TrainLoraParams, seed: int) -> None:
    """base: none: generate samples train_ldm's model; the adapter folder says there is none."""
    require_inputs("train_lora", f"{SCRATCH}/model_index.json")
    with atomic_path(MODEL, is_dir=True) as tmp:
        shutil.copytree(SCRATCH, tmp, dirs_exist_ok=True)
    with atomic_path(ADAPTER, is_dir=True) as tmp:
        (tmp / "README.md").write_text("# No LoRA adapter\n\n`train_lora.base: none`: `data/train_lora/model` is "
                                       "train_ldm's model, unchanged. Set `train_lora.base` to fine-tune one.\n")
    write_provenance(f"{OUT}/provenance.json", stage="train_lora", params=as_dict(p), seed=seed, inputs=[SCRATCH])
    write_metrics("train_lora", {"lora_parameters": 0}, headline=["lora_parameters"])
    print(f"train_lora: base none: {MODEL} is {SCRATCH}")


def main() -> None:
    p, seed = load_params("train_lora", TrainLoraParams)
    if p.base == "none":
        return pass_through(p, seed)
    g = seed_everything(seed)
    accelerator = make_accelerator(p.mixed_precision)
    require_inputs("train_lora", PAIRS, DATASET)
    base = load_base(p.base, p.base_path, accelerator.device, p.resolution)
    if accelerator.mixed_precision in ("fp16", "bf16"):  # the frozen base in half precision, the adapter in fp32
        base.pipe.to(dtype=torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16)
    n_base = sum(x.numel() for x in base.unet.parameters())
    try:
        n_lora = add_lora(base.unet, p.lora, f"the {p.base} UNet ({p.base_path})")
    except ValueError as exc:
        raise PipelineError(f"params.yaml: train_lora: {exc}") from None
    for x in trained_parameters(base.unet):
        x.data = x.data.float()
    pairs = pd.read_csv(PAIRS, dtype=str, keep_default_na=False)
    pairs = select_caption_sources(pairs[pairs["split"] == "train"], p.caption_sources, PAIRS)
    rows, images = split_images(DATASET, ["train"])
    patch = round((base.unet.config.out_channels // base.vae.config.latent_channels) ** 0.5)
    data = build_latent_pairs(base.vae, base.encoder, pairs, images, rows["file_name"].tolist(),
                              latent_patch=patch, to_vae_input=base.to_vae_input)
    val_rows, val_images = split_images(DATASET, ["val"])
    val_data = build_latent_pairs(base.vae, base.encoder, val_rows, val_images, val_rows["file_name"].tolist(),
                                  latent_patch=patch, to_vae_input=base.to_vae_input)
    inputs = [PAIRS, DATASET] + ([p.base_path] if Path(p.base_path).exists() else [])
    fingerprint = run_fingerprint("train_lora", params=as_dict(p), seed=seed, inputs=inputs)
    scheduler = base.noise_scheduler()
    sampler = base.pipe if p.base == "synthmed" else DiffusersGenerator(base.pipe, images.shape[1], images.shape[-1])
    grid_prompts = val_rows["text"].iloc[torch.linspace(0, len(val_rows) - 1, 8).long().unique()].tolist()
    if accelerator.is_main_process:
        shutil.rmtree(f"{OUT}/progress", ignore_errors=True)

    def on_every(step: int, model, ema) -> dict:
        with ema_weights(model.eval(), ema):
            grid = [to_array(x) for _, batch in sampler.generate_batches(grid_prompts, list(range(len(grid_prompts))),
                                                                         num_inference_steps=25, guidance_scale=3.0)
                    for x in batch]
        model.train()
        save_png(image_grid(grid, grid_prompts, ncol=8), f"{OUT}/progress/step{step:07d}.png")
        return validation_losses(model, ema, scheduler, val_data, p.min_snr_gamma)

    try:
        log, ema = train_ldm(base.unet, scheduler, data, p, g, store.run_dir("train_lora", fingerprint) / "checkpoints",
                             fingerprint, every=p.validate_every or p.steps, on_every=on_every, accelerator=accelerator)
    except ValueError as exc:
        raise PipelineError(f"params.yaml: train_lora: {exc}") from None
    except NonFiniteLoss as exc:
        raise PipelineError(str(exc)) from None
    if not accelerator.is_main_process:
        return
    if ema is not None:
        ema.copy_to(trained_parameters(base.unet))
    last_val = next(r for r in reversed(log) if "val_loss_ema" in r)
    metrics = {**train_loss_metrics(log), "val_loss_ema": last_val["val_loss_ema"], "val_loss_raw": last_val["val_loss_raw"],
               "lora_parameters": n_lora, "base_unet_parameters": n_base, "train_images": len(rows),
               "train_pairs": len(pairs), "resolution": base.resolution}
    data_sha = input_hashes([DATASET])[DATASET]
    with atomic_path(ADAPTER, is_dir=True) as tmp:
        save_adapter(base, tmp, p.base_path)
        (tmp / "README.md").write_text(model_card(p, seed, fingerprint, metrics, data_sha))
    # the merged pipeline: a fresh base with the saved adapter loaded and fused into its weights
    merged = load_base(p.base, p.base_path, "cpu", p.resolution)
    load_adapter(merged, Path(ADAPTER), p.base_path)
    merged.unet.fuse_lora()
    merged.unet.unload_lora()
    with atomic_path(MODEL, is_dir=True) as tmp:
        merged.pipe.save_pretrained(tmp)
        (tmp / DATA_FORMAT).write_text(json.dumps({"channels": int(images.shape[1]),
                                                   "resolution": int(images.shape[-1])}) + "\n")
    write_provenance(f"{OUT}/provenance.json", stage="train_lora", params=as_dict(p), seed=seed, inputs=inputs)
    write_metrics("train_lora", metrics, headline=["lora_parameters", "val_loss_ema"])
    store.finish_run("train_lora", fingerprint)
    print(f"train_lora: {p.base} + rank-{p.rank} LoRA ({n_lora:,} parameters), {len(pairs)} pairs; mean loss of "
          f"the last {min(TAIL, len(log))} steps {metrics[f'train_loss_last{TAIL}_mean']:.4f}, "
          f"val_loss_ema {metrics['val_loss_ema']:.4f} -> {ADAPTER}/{ADAPTER_FILE}, {MODEL}")


if __name__ == "__main__":
    run_stage(main)
