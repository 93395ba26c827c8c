"""The trained generator as one diffusers pipeline folder, called the diffusers way.

`SynthMedPipeline.save_pretrained(folder)` writes the UNet, the VAE, the scheduler and
`model_index.json` (with the text encoder reference in its config), so that
`SynthMedPipeline.from_pretrained(folder)` loads everything offline. Two ways to sample, one loop:

- `pipe(prompt, num_inference_steps=..., guidance_scale=..., generator=..., negative_prompt=...,
  output_type="pil" | "np" | "pt" | "latent").images`, as any diffusers pipeline;
- `pipe.generate_batches(prompts, seeds, ...)`: what the `generate` stage runs, batch by batch, each
  image from a generator seeded with its own seed, so that an image never depends on its batch.

An image-conditioned model (`condition="image"`, DiNO-Diffusion) takes images instead of prompts:
`pipe(image=uint8 [N, C, H, W])` makes variants of them, and `pipe(image_embeds=...)` or
`generate_batches(embeddings, seeds)` samples from given (e.g. interpolated) embeddings of its frozen
image encoder (`pipe.embed_images`).

`pipe(prompt, generator=torch.Generator().manual_seed(s))` gives the image that seed s gives in
`generate_batches`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel

from synthmed.data.disk_array import Rows
from synthmed.diffusion.sample import decode, decode_to_uint8, sample_latents, seeded_generators
from synthmed.core.errors import PipelineError
from synthmed.models.cond_unet import ConditionalUNet
from synthmed.models.image_encoder import ImageEncoder, n_tokens
from synthmed.models.pixel_space import PixelSpace  # imported: diffusers loads only classes already imported
from synthmed.models.volume_autoencoder import VolumeAutoencoderKL
from synthmed.text.encoder import TextEncoder

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _as_list(value: str | list[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return list(value)


class SynthMedPipeline(DiffusionPipeline):
    def __init__(self, unet: UNet2DConditionModel | ConditionalUNet, vae: AutoencoderKL | VolumeAutoencoderKL | PixelSpace,
                 scheduler: DDIMScheduler,
                 text_encoder_name: str = "all-MiniLM-L6-v2", text_max_length: int = 48,
                 condition: str = "text", image_encoder_name: str = "", image_tokens: str = "mean"):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(text_encoder_name=text_encoder_name, text_max_length=text_max_length,
                                condition=condition, image_encoder_name=image_encoder_name, image_tokens=image_tokens)
        self._encoder: TextEncoder | None = None
        self._image_encoder: ImageEncoder | None = None

    def use_text_encoder(self, encoder: TextEncoder) -> "SynthMedPipeline":
        """Share an encoder that is already loaded (e.g. by the trainer) instead of loading another."""
        self._encoder = encoder
        return self

    def use_image_encoder(self, encoder: ImageEncoder) -> "SynthMedPipeline":
        self._image_encoder = encoder
        return self

    @property
    def image_conditioned(self) -> bool:
        return self.config.condition == "image"

    @property
    def image_encoder(self) -> ImageEncoder:
        """Loaded on first use, like the text encoder; its width must be the one the UNet was trained on."""
        if self._image_encoder is None:
            enc = ImageEncoder(self.config.image_encoder_name, self.config.image_tokens, self.device)
            want = self.unet.config.encoder_hid_dim
            if enc.dim != want:
                raise PipelineError(f"image encoder {enc.name!r} gives {enc.dim}-wide embeddings but this model was "
                                    f"trained on {want}-wide ones (image_encoder_name in its model_index.json); "
                                    "use the encoder it was trained with")
            self._image_encoder = enc
        return self._image_encoder

    def embed_images(self, images, batch_size: int = 64) -> torch.Tensor:
        """uint8 images [N, C, H, W] (an array, tensor or Rows: read a batch at a time) -> the frozen encoder's
        global tokens [N, T, D]: the condition."""
        return self.image_encoder.encode(images if isinstance(images, Rows) else torch.as_tensor(images), batch_size)

    def encode_conditions(self, conditions, negatives: list[str] | None = None):
        """(emb, mask, uncond_emb, uncond_mask) of prompts, or of image embeddings [N, T, D] for an
        image-conditioned model, whose null condition is the all-zero embedding it was trained with."""
        if self.image_conditioned:
            if isinstance(conditions, (list, str)) and conditions and isinstance(conditions[0], str):
                raise ValueError("this model is conditioned on images: pass image= or image_embeds=, not a prompt")
            emb = torch.as_tensor(conditions).float()
            if emb.ndim != 3 or emb.shape[-1] != self.unet.config.encoder_hid_dim:
                raise ValueError(f"image embeddings must be [N, {n_tokens(self.config.image_tokens)}, "
                                 f"{self.unet.config.encoder_hid_dim}], got {list(emb.shape)}")
            mask = torch.ones(emb.shape[:2], dtype=torch.long)
            return emb, mask, torch.zeros_like(emb[:1]), mask[:1]
        emb, mask = self.text_encoder.encode(list(conditions))
        # no negative prompt: the empty caption, the null conditioning that context dropout trained
        uncond_emb, uncond_mask = self.text_encoder.encode(negatives or [""])
        return emb, mask, uncond_emb, uncond_mask

    @property
    def text_encoder(self) -> TextEncoder:
        """Loaded on first use: the frozen encoder is referenced, not copied into the folder."""
        if self._encoder is None:
            self._encoder = TextEncoder(self.config.text_encoder_name, self.config.text_max_length, self.device)
        return self._encoder

    def _sample(self, conditions, generators: list[torch.Generator], num_inference_steps: int,
                guidance_scale: float, negative_prompts: list[str] | None = None, progress=None) -> torch.Tensor:
        """The one sampling path of both interfaces: scaled latents, one per condition and generator."""
        emb, mask, uncond_emb, uncond_mask = self.encode_conditions(conditions, negative_prompts)
        return sample_latents(self.unet, self.scheduler, emb, mask, uncond_emb, uncond_mask, generators,
                              num_inference_steps, guidance_scale, progress)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, num_inference_steps: int = 50, guidance_scale: float = 3.0,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, image: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None) -> ImagePipelineOutput | tuple:
        """Text to image(s), as a diffusers pipeline is called; an image-conditioned model takes ``image``
        (uint8 [N, C, H, W]: variants of each) or ``image_embeds`` ([N, T, D]) instead of ``prompt``.

        ``generator``: one per image (the image then depends on it alone, whatever else is in the
        call), or one for all (the images draw from it in turn, so each depends on its place), or
        None (one seeded from torch's global generator). ``output_type``: "pil" (PIL images), "np"
        (float [N, H, W, C] in [0, 1]), "pt" (float [N, C, H, W] in [0, 1]) or "latent" (the scaled
        latents). Images come in prompt order, ``num_images_per_prompt`` consecutive ones per prompt.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        if self.image_conditioned:
            if (image is None) == (image_embeds is None):
                raise ValueError("an image-conditioned model takes image= or image_embeds= (one of them)")
            emb = self.embed_images(image) if image is not None else torch.as_tensor(image_embeds)
            emb = emb.repeat_interleave(num_images_per_prompt, dim=0)
            latents = self._sample(emb, self._generators(generator, len(emb)), num_inference_steps, guidance_scale,
                                   progress=self.progress_bar)
            images = self._postprocess(latents, output_type)
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        prompts = _as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
        if negatives is not None and len(negatives) > 1:
            negatives = [p for p in negatives for _ in range(num_images_per_prompt)]
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        latents = self._sample(prompts, self._generators(generator, len(prompts)), num_inference_steps,
                               guidance_scale, negatives, progress=self.progress_bar)
        images = self._postprocess(latents, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @staticmethod
    def _generators(generator: torch.Generator | list[torch.Generator] | None, n: int) -> list[torch.Generator]:
        if generator is None:  # reproducible under torch.manual_seed, as diffusers' pipelines are
            generator = torch.Generator().manual_seed(int(torch.randint(2**63 - 1, ())))
        if isinstance(generator, torch.Generator):
            return [generator] * n
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} images: give one per image, or a single one")
        return list(generator)

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = (decode(self.vae, latents) + 1) / 2
        if output_type == "pt":
            return images
        if images.ndim == 5:  # volumes: [N, D, H, W, C]; PIL has no volumes
            if output_type == "pil":
                raise ValueError("a volume model's output is not a picture: use output_type='np' or 'pt'")
            return images.permute(0, 2, 3, 4, 1).numpy()
        images = images.permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    @torch.no_grad()
    def generate_batches(self, prompts: list[str] | torch.Tensor, seeds: list[int], num_inference_steps: int = 50,
                         guidance_scale: float = 3.0, batch_size: int = 32) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start index, uint8 images [B, C, H, W]); image i's noise comes from seeds[i] alone, whatever
        the batch: the image of ``pipe(prompts[i], generator=torch.Generator().manual_seed(seeds[i]))``, up to the
        float rounding of batched kernels (seen for 3-D volumes at one thread), so byte-for-byte checks compare
        runs of the same batch size. An image-conditioned model takes
        image embeddings [N, T, D] in place of the prompts."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        for i in range(0, len(prompts), batch_size):
            j = slice(i, i + batch_size)
            batch = prompts[j] if isinstance(prompts, torch.Tensor) else list(prompts[j])
            latents = self._sample(batch, seeded_generators(seeds[j]), num_inference_steps, guidance_scale)
            yield i, decode_to_uint8(self.vae, latents)

    def generate(self, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
        """All images of ``generate_batches`` at once, as uint8 [N, C, H, W]."""
        return np.concatenate([imgs.numpy() for _, imgs in self.generate_batches(prompts, seeds, **kwargs)])
