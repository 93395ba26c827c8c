"""LoRA fine-tuning of a pretrained text-to-image pipeline by train_ldm's loop (the same loss, context dropout
for guidance, EMA of the adapter, checkpoints and resume): `synthmed` (a SynthMedPipeline folder) and
`stable-diffusion` on their UNet's attention; `kandinsky-2.2` on its prior and/or its decoder UNet, one
after the other.

The merged model is made by loading the saved adapters onto a fresh copy of the base, so a written adapter
is one that loads. The `train_lora` stage holds the params; everything here is what it runs when `base` is not `none`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from synthmed.diffusion.bases import DATA_FORMAT, TextTunedUNet, load_adapter, load_base, save_adapter
from synthmed.diffusion.generators import DiffusersGenerator
from synthmed.diffusion.fit import fit
from synthmed.diffusion.latents import build_latent_pairs, training_rows
from synthmed.diffusion.loop import trained_parameters
from synthmed.core.errors import PipelineError
from synthmed.core.io import atomic_path
from synthmed.models.lora import LoraParams, add_lora
from synthmed.core.provenance import input_hashes, seed_everything
from synthmed.core.runtime import make_accelerator
from synthmed.viz import to_array

STAGE = "train_lora"


@dataclass
class Part:
    """One adapted denoiser: the model that gets the adapter, what the loop calls, its schedule and data."""
    name: str
    model: torch.nn.Module
    denoiser: torch.nn.Module
    scheduler: object
    data: object
    val_data: object
    lora: LoraParams
    adapter_dir: str
    text_encoder: torch.nn.Module | None = None  # Stable Diffusion's, when it gets an adapter too


def model_card(p, seed: int, fingerprint: str, metrics: dict, data_sha: str, parts: list[str], adapter: str) -> str:
    if p.base == "stable-diffusion":
        load = f'pipe = StableDiffusionPipeline.from_pretrained(BASE)\npipe.load_lora_weights("{adapter}")'
    elif p.base == "synthmed":
        load = (f'pipe = SynthMedPipeline.from_pretrained(BASE)\npipe.unet.load_lora_adapter("{adapter}", '
                "use_safetensors=True, prefix=None)")
    else:
        load = "\n".join({"prior": "prior = KandinskyV22PriorPipeline.from_pretrained(PRIOR)\nprior.prior",
                          "decoder": "decoder = KandinskyV22Pipeline.from_pretrained(BASE)\ndecoder.unet"}[x]
                          + f'.load_lora_adapter("{adapter}/{x}", use_safetensors=True, prefix=None)'
                          for x in parts)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_loss"))
    return f"""# synthmed LoRA adapter

LoRA fine-tune of the {p.base} pipeline `{p.base_path}`{f" (prior `{p.kandinsky.prior_path}`)" if p.base == "kandinsky-2.2" else ""} by the `train_lora` stage of synthmed.

- Adapted: {', '.join(parts)}; rank {p.rank}, alpha {p.alpha:g}, dropout {p.lora_dropout:g}:
  {metrics['lora_parameters']:,} trained parameters beside {metrics['base_parameters']:,} frozen ones
- {p.steps} steps{' per part' if len(parts) > 1 else ''} at batch {p.batch_size}, lr {p.lr:g}; weights: \
{'the EMA (decay ' + str(p.ema_decay) + ')' if p.ema_decay > 0 else 'the final training weights'}
- Training data: {metrics['train_images']} images, {metrics['train_pairs']} (image, caption) pairs at
  {metrics['resolution']} px; dataset sha256 `{data_sha}`
- Run fingerprint (params, seed {seed}, input hashes, code, device, precision, processes, CPU mode, package versions): `{fingerprint}`
- Validation loss (these weights, then the raw training weights): {losses}

```python
{load}
```

`../model/` holds the same pipeline with the adapter merged into its weights.
"""


def prepare(p, device, sets, adapter: str, encoded: Path) -> tuple[object, list[Part], object]:
    """The base (frozen), the parts to adapt with their data (latents and caption states encoded into
    ``encoded``), and a sampler for the progress grids."""
    pairs, rows, images, val_rows, val_images = sets
    if p.base == "kandinsky-2.2":  # its prior and decoder pairs are built in memory
        images, val_images = images[:], val_images[:]
        from synthmed.diffusion.kandinsky import (DecoderDenoiser, PriorDenoiser, decoder_pairs, load_kandinsky,
                                                  prior_noise_scheduler, prior_pairs)

        base = load_kandinsky(p.base_path, p.kandinsky.prior_path, device, p.resolution)
        parts = []
        if "prior" in p.kandinsky.parts:
            parts.append(Part("prior", base.prior.prior, PriorDenoiser(base.prior.prior), prior_noise_scheduler(base.prior),
                              prior_pairs(base.prior, pairs, images, rows["file_name"].tolist()),
                              prior_pairs(base.prior, val_rows, val_images, val_rows["file_name"].tolist()),
                              p.kandinsky_lora("prior"), f"{adapter}/prior"))
        if "decoder" in p.kandinsky.parts:
            unet, c = base.decoder.unet, base.decoder.movq.config.latent_channels
            parts.append(Part("decoder", unet, DecoderDenoiser(unet, c),
                              DDPMScheduler.from_config(base.decoder.scheduler.config),
                              decoder_pairs(base.decoder, base.prior, images, base.to_vae_input),
                              decoder_pairs(base.decoder, base.prior, val_images, base.to_vae_input),
                              p.kandinsky_lora("decoder"), f"{adapter}/decoder"))
        sampler = DiffusersGenerator(base.combined(), images.shape[1], images.shape[-1], base.resolution)
        return base, parts, sampler
    base = load_base(p.base, p.base_path, device, p.resolution)
    patch = round((base.unet.config.out_channels // base.vae.config.latent_channels) ** 0.5)
    data, val_data = (build_latent_pairs(base.vae, base.encoder, pr, im, r["file_name"].tolist(), latent_patch=patch,
                                         to_vae_input=base.to_vae_input, cache=encoded / split)
                      for pr, im, r, split in ((pairs, images, rows, "train"), (val_rows, val_images, val_rows, "val")))
    sampler = base.pipe if p.base == "synthmed" else DiffusersGenerator(base.pipe, images.shape[1], images.shape[-1],
                                                                        base.resolution)
    part = Part("unet", base.unet, base.unet, base.noise_scheduler(), data, val_data, p.lora, adapter)
    if p.text_encoder_lora:  # the captions' states are then computed every step, through the adapted encoder
        for d in (data, val_data):
            d.extra_cond["input_ids"] = base.encoder.token_ids(d.captions)
        part.text_encoder = base.pipe.text_encoder
        part.denoiser = TextTunedUNet(base.unet, part.text_encoder)
    return base, [part], sampler


def reload_merged(p, adapter: str):
    """A fresh copy of the base with each saved adapter loaded and fused into its weights: the pipeline
    generate samples, and the proof that the written adapters load."""
    if p.base == "kandinsky-2.2":
        from synthmed.diffusion.kandinsky import load_kandinsky

        base = load_kandinsky(p.base_path, p.kandinsky.prior_path, "cpu", p.resolution)
        models = {name: (base.model(name), f"{adapter}/{name}") for name in p.kandinsky.parts}
        pipe = base.combined()
    else:
        base = load_base(p.base, p.base_path, "cpu", p.resolution)
        models, pipe = {"unet": (base.unet, adapter)}, base.pipe
        if p.base == "stable-diffusion":  # the UNet's adapter and, if trained, the text encoder's
            load_adapter(p.base, base.unet, Path(adapter), p.base_path, pipe=pipe)
            pipe.fuse_lora(components=["unet", "text_encoder"])
            pipe.unload_lora_weights()
            return pipe, base.resolution
    for model, folder in models.values():
        load_adapter(p.base, model, Path(folder), p.base_path)
        model.fuse_lora()
        model.unload_lora()
    return pipe, base.resolution


def add_adapters(p, parts: list[Part], half) -> int:
    """Freeze each part (in half precision when asked), add its adapter in fp32; the adapter's parameter count."""
    n_lora = 0
    for part in parts:
        if half is not None:  # the frozen base in half precision, the adapter in fp32
            part.model.to(dtype=half)
        try:
            what = {"unet": "UNet", "decoder": "decoder UNet", "prior": "prior transformer"}[part.name]
            n_lora += add_lora(part.model, part.lora, f"the {p.base} {what} ({p.base_path})")
        except ValueError as exc:
            raise PipelineError(f"params.yaml: {STAGE}: {exc}") from None
        if part.text_encoder is not None:
            n_lora += add_lora(part.text_encoder, LoraParams(p.rank, p.alpha, p.lora_dropout,
                                                             p.text_encoder_target_modules),
                               f"the {p.base} text encoder ({p.base_path})")
        for x in trained_parameters(part.denoiser):
            x.data = x.data.float()
    return n_lora


def finetune(stage) -> None:
    """Fine-tune, save the adapters with their model card and the merged model, write provenance and metrics."""
    p, g = stage.params, seed_everything(stage.seed)
    accelerator = make_accelerator(p.mixed_precision)
    dataset, adapter, merged = stage.dep("ingest/dataset"), stage.out_path("adapter"), stage.out_path("model")
    sets = training_rows(dataset, stage.dep("paraphrase/pairs.csv"), p.caption_sources)
    inputs = stage.inputs + [x for x in (p.base_path, p.kandinsky.prior_path)
                             if x and Path(x).exists() and x not in stage.inputs]
    fingerprint = stage.fingerprint(inputs)
    # data-parallel: each process encodes its share into the run's cache (Kandinsky's pairs: all, in memory)
    base, parts, sampler = prepare(p, accelerator.device, sets, adapter, stage.run_dir(fingerprint) / "encoded")
    images, val_rows = sets[2], sets[3]
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    n_base = sum(x.numel() for part in parts for x in part.model.parameters())
    n_lora = add_adapters(p, parts, half)
    prompts = val_rows["text"].iloc[torch.linspace(0, len(val_rows) - 1, 8).long().unique()].tolist()
    progress = stage.out_path("progress")
    if accelerator.is_main_process:
        shutil.rmtree(progress, ignore_errors=True)
    metrics = {"lora_parameters": n_lora, "base_parameters": n_base, "train_images": len(images),
               "train_pairs": len(sets[0]), "resolution": int(base.resolution)}

    def grid():
        return [to_array(x) for _, batch in sampler.generate_batches(prompts, list(range(len(prompts))),
                                                                     num_inference_steps=25, guidance_scale=3.0)
                for x in batch], prompts

    for part in parts:
        result = fit(part.denoiser, part.scheduler, part.data, part.val_data, p, g, section=STAGE,
                     checkpoint_dir=stage.run_dir(fingerprint) / "checkpoints" / part.name,
                     fingerprint=f"{fingerprint}-{part.name}", every=p.validate_every or p.steps, grid=grid,
                     grid_path=lambda step, name=part.name: f"{progress}/{name}_step{step:07d}.png",
                     accelerator=accelerator)
        if accelerator.is_main_process:  # every process trains every part; the main one reports
            if result.ema is not None:
                result.ema.copy_to(trained_parameters(part.denoiser))
            suffix = "" if part.name == "unet" else f"_{part.name}"
            metrics.update({f"{k}{suffix}": v for k, v in result.metrics.items()})
    if accelerator.is_main_process:
        save(stage, p, parts, metrics, fingerprint, inputs, adapter, merged, images)


def save(stage, p, parts: list[Part], metrics: dict, fingerprint: str, inputs: list[str], adapter: str, merged: str,
         images) -> None:
    """The adapters with their model card, the merged model (from the saved adapters), provenance, metrics."""
    dataset = stage.dep("ingest/dataset")
    data_sha = input_hashes([dataset])[dataset]
    with atomic_path(adapter, is_dir=True) as tmp:
        for part in parts:
            folder = tmp / Path(part.adapter_dir).relative_to(adapter)
            folder.mkdir(parents=True, exist_ok=True)
            save_adapter(p.base, part.model, folder, p.base_path, part.text_encoder)
        (tmp / "README.md").write_text(model_card(p, stage.seed, fingerprint, metrics, data_sha,
                                                  [x.name for x in parts], adapter))
    pipe, resolution = reload_merged(p, adapter)
    with atomic_path(merged, is_dir=True) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / DATA_FORMAT).write_text(json.dumps({"channels": int(images.shape[1]), "resolution": int(images.shape[-1]),
                                                   "sample_size": int(resolution)}) + "\n")
    stage.write_provenance(inputs)
    stage.write_metrics(metrics, headline=["lora_parameters"] + [k for k in metrics if k.startswith("val_loss_ema")])
    stage.finish_run(fingerprint)
    print(f"{STAGE}: {p.base} + rank-{p.rank} LoRA on {', '.join(x.name for x in parts)} "
          f"({metrics['lora_parameters']:,} parameters), {metrics['train_pairs']} pairs; "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_loss_ema")) + f" -> {adapter}, {merged}")
