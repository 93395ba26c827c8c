"""The trained generator as one diffusers pipeline folder.

`SynthMedPipeline.save_pretrained(folder)` writes the UNet, the VAE, the scheduler and
`model_index.json` (with the text encoder reference in its config), so that
`SynthMedPipeline.from_pretrained(folder)` loads everything offline.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

from synthmed.diffusion.sample import generate_batches
from synthmed.text.encoder import TextEncoder


class SynthMedPipeline(DiffusionPipeline):
    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: DDIMScheduler,
                 text_encoder_name: str = "all-MiniLM-L6-v2", text_max_length: int = 48):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(text_encoder_name=text_encoder_name, text_max_length=text_max_length)
        self._encoder: TextEncoder | None = None

    def use_text_encoder(self, encoder: TextEncoder) -> "SynthMedPipeline":
        """Share an encoder that is already loaded (e.g. by the trainer) instead of loading another."""
        self._encoder = encoder
        return self

    @property
    def text_encoder(self) -> TextEncoder:
        """Loaded on first use: the frozen encoder is referenced, not copied into the folder."""
        if self._encoder is None:
            self._encoder = TextEncoder(self.config.text_encoder_name, self.config.text_max_length, self.device)
        return self._encoder

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], num_inference_steps: int = 50,
                 guidance_scale: float = 3.0, batch_size: int = 32):
        """Yield (start index, uint8 images [B, C, H, W]); image i comes from seeds[i] alone."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        emb, mask = self.text_encoder.encode(prompts)
        uncond_emb, uncond_mask = self.text_encoder.encode([""])
        yield from generate_batches(self.unet, self.vae, self.scheduler, emb, mask, uncond_emb, uncond_mask,
                                    seeds, num_inference_steps, guidance_scale, batch_size)

    def generate(self, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
        """All images at once as uint8 [N, C, H, W]."""
        return np.concatenate([imgs.numpy() for _, imgs in self(prompts, seeds, **kwargs)])
