"""Small fixtures-as-functions shared by tests: tiny image folders and models."""

from __future__ import annotations

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
