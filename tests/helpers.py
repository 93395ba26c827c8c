"""Builders shared by tests: tiny image folders, models, training configs and pipelines, and a stage run in
this process."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def write_imagefolder(root: Path, rows: list[tuple[str, str]], size: int = 24, **extra_columns) -> Path:
    """Images with a distinct pattern each plus metadata.csv; extra_columns: name -> list of values."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, _ in rows:
        path = root / name
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    df = pd.DataFrame({"file_name": [r[0] for r in rows], "text": [r[1] for r in rows], **extra_columns})
    df.to_csv(root / "metadata.csv", index=False)
    return root


@dataclass
class StageRun:
    returncode: int
    stdout: str
    stderr: str


def run_stage_here(workdir: Path, stage: str, *argv: str, env: dict[str, str | None] | None = None) -> StageRun:
    """`python -m stages.<stage> [argv]` run in this process from ``workdir`` (the stage's cli, run_stage with
    argv): its exit code and what it printed, without paying a fresh interpreter's imports. ``env``: variables
    set (None: unset) for the run only."""
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    saved = {k: os.environ.get(k) for k in env or {}}

    def put(values):
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    put(env or {})
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module.cli(list(argv))
    finally:
        os.chdir(cwd)
        put(saved)
    return StageRun(code, out.getvalue(), err.getvalue())


def byte_level_clip_tokenizer(folder: Path, model_max_length: int = 77):
    """A real `CLIPTokenizer` offline: CLIP's 256 byte tokens, their end-of-word variants and the two
    specials (514 tokens), with no BPE merges, so captions tokenize character by character. Pretrained
    pipelines ship their own tokenizer; tiny test pipelines need one that loads without the hub."""
    import json

    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def tiny_stable_diffusion(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline saved to ``folder`` (the shapes of diffusers' own fast tests:
    a 2-level UNet on 32x32x4 latents, a 2-level VAE, so 64 px images, a 2-layer CLIP text encoder)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_clip_tokenizer(folder.parent / f"{folder.name}_tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=8,
                                                intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                                vocab_size=len(tokenizer), max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, image_encoder=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def tiny_kandinsky(folder: Path) -> tuple[Path, Path]:
    """Tiny random Kandinsky 2.2 prior and decoder pipelines saved under ``folder`` (diffusers' fast-test
    shapes, the CLIP vision tower at 32 px): returns (prior folder, decoder folder)."""
    import torch
    from diffusers import (DDPMScheduler, KandinskyV22Pipeline, KandinskyV22PriorPipeline, PriorTransformer,
                           UnCLIPScheduler, UNet2DConditionModel, VQModel)
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    d = 32
    tokenizer = byte_level_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=d, num_layers=1)
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))  # the tests' choice: zeros give zero output
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=d, image_size=32, projection_dim=d, intermediate_size=37, num_attention_heads=4, num_channels=3,
        num_hidden_layers=2, patch_size=8))
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=d, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=d))
    processor = CLIPImageProcessor(crop_size=32, do_center_crop=True, do_normalize=True, do_resize=True, size=32,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073], resample=3,
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    prior_scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                      num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0)
    KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=prior_scheduler, image_processor=processor).save_pretrained(folder / "prior")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", sample_size=16,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        encoder_hid_dim=d, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None)
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, prediction_type="epsilon")
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(folder / "decoder")
    return folder / "prior", folder / "decoder"


# Training-loop options that switch every extra off (accumulation, AMP, warm-up, EMA, min-SNR, checkpoints).
PLAIN = dict(grad_accum_steps=1, mixed_precision="no", warmup_steps=0, ema_decay=0.0, min_snr_gamma=0.0,
             checkpoint_every=0, keep_checkpoints=0)


def tiny_unet(cross_dim: int = 384):
    """A 2-level conditional UNet on 8x8x4 latents (the text encoder's 384-d states by default)."""
    import torch

    from synthmed.models.unet import build_unet

    torch.manual_seed(0)
    return build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                      cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=8, dropout=0.0)


def toy_latent_pairs(n: int = 6, g=None):
    """``n`` random 8x8x4 latents, each paired with its own 5-token caption state (index 0: the null caption)."""
    import torch

    from synthmed.diffusion.latents import LatentPairs

    g = g or torch.Generator().manual_seed(0)
    return LatentPairs(latent_mean=torch.randn(n, 4, 8, 8, generator=g), latent_std=torch.zeros(n, 4, 8, 8),
                       scaling_factor=1.0, image_index=torch.arange(n), caption_index=torch.arange(1, n + 1),
                       text_emb=torch.randn(n + 1, 5, 384, generator=g),
                       text_mask=torch.ones(n + 1, 5, dtype=torch.long), uncond_index=0)


def vae_train_config(**kw):
    """A short L1 VAE training run; keywords override."""
    from synthmed.models.autoencoder import VAETrainConfig

    base = dict(steps=40, batch_size=8, lr=3e-3, kl_weight=1e-6, recon_loss="l1", ssim_weight=0.0,
                perceptual_weight=0.0, warmup_steps=0, mixed_precision="no", checkpoint_every=0, keep_checkpoints=2)
    return VAETrainConfig(**{**base, **kw})


def tiny_vae():
    """A 2-level greyscale AutoencoderKL: 16 px images, 8x8x4 latents."""
    import torch

    from synthmed.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    return build_autoencoder(in_channels=1, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=16)


def tiny_volume_vae():
    """A 2-level volume autoencoder: 16^3 volumes, 8^3x2 latents."""
    import torch

    from synthmed.models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    return build_autoencoder(in_channels=1, block_out_channels=[8, 8], layers_per_block=1, latent_channels=2,
                             norm_num_groups=4, sample_size=16, mid_attention=False, dims=3)
