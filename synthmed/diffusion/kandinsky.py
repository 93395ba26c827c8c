"""Kandinsky 2.2 as a LoRA base: a prior (text -> CLIP image embedding) and a decoder (image embedding ->
image), each trained by the one training loop behind a small wrapper that gives it the UNet calling
convention `denoiser(x, t, encoder_hidden_states=..., encoder_attention_mask=..., ...).sample`.

- Decoder: MoVQ latents of the training images, conditioned on each image's own CLIP image embedding
  (what the prior learns to produce); dropped to the zero-image embedding with `context_dropout`, the
  negative embedding the prior pipeline uses for guidance. Its UNet also predicts a variance: only the
  noise channels are trained, as in diffusers' decoder fine-tuning script.
- Prior: the CLIP image embeddings, normalised by the prior's clip_mean/clip_std, predicted as x0
  ("sample") from the noisy embedding, the caption's CLIP token states and its pooled embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler
from torch import nn

from synthmed.data.dataset import to_model_range
from synthmed.diffusion.bases import open_pipeline, to_rgb_at
from synthmed.diffusion.latents import LatentPairs
from synthmed.models.unet import downsampling

PARTS = ("prior", "decoder")


@dataclass
class Output:
    sample: torch.Tensor


class DecoderDenoiser(nn.Module):
    """The decoder UNet called with the image embedding in `encoder_hidden_states`; noise channels only."""

    def __init__(self, unet: nn.Module, latent_channels: int):
        super().__init__()
        self.unet, self.channels = unet, latent_channels
        self.config = SimpleNamespace(in_channels=latent_channels, out_channels=latent_channels)

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
        out = self.unet(x, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": encoder_hidden_states})
        return Output(out.sample[:, : self.channels])


class PriorDenoiser(nn.Module):
    """The PriorTransformer called the UNet way: token states, their mask and the pooled text embedding."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior
        dim = prior.config.embedding_dim
        self.config = SimpleNamespace(in_channels=dim, out_channels=dim)

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None, proj_embedding=None):
        out = self.prior(x, timestep=t, proj_embedding=proj_embedding, encoder_hidden_states=encoder_hidden_states,
                         attention_mask=encoder_attention_mask.bool())
        return Output(out.predicted_image_embedding)


def prior_noise_scheduler(prior_pipe) -> DDPMScheduler:
    """The prior's training schedule: its timesteps and betas, x0 ("sample") prediction, no clipping."""
    cfg = prior_pipe.scheduler.config
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.get("beta_schedule",
                         "squaredcos_cap_v2"), prediction_type="sample", clip_sample=False)


@torch.no_grad()
def image_embeddings(prior_pipe, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """CLIP image embeddings of uint8 [N, C, H, W] images (greyscale repeated to RGB), through the prior
    pipeline's own image processor and image encoder."""
    device = prior_pipe.image_encoder.device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        pixels = prior_pipe.image_processor(list(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())),
                                            return_tensors="pt").pixel_values
        out.append(prior_pipe.image_encoder(pixels.to(device, prior_pipe.image_encoder.dtype)).image_embeds.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def zero_image_embedding(prior_pipe) -> torch.Tensor:
    """The prior pipeline's negative (unconditional) image embedding: that of an all-zero image."""
    return prior_pipe.get_zero_embed(1, device=prior_pipe.image_encoder.device).float().cpu()


def decoder_pairs(decoder_pipe, prior_pipe, images: torch.Tensor, to_vae_input) -> LatentPairs:
    """MoVQ latents of each image, conditioned on its own CLIP image embedding (row 0: the zero image)."""
    movq = decoder_pipe.movq
    device = movq.device
    with torch.no_grad():
        x = to_vae_input(to_model_range(images))
        latents = torch.cat([movq.encode(x[i : i + 32].to(device, movq.dtype)).latents.float().cpu()
                             for i in range(0, len(x), 32)])
    table = torch.cat([zero_image_embedding(prior_pipe), image_embeddings(prior_pipe, images)])
    n = len(images)
    return LatentPairs(latent_mean=latents, latent_std=torch.zeros_like(latents), scaling_factor=1.0,
                       image_index=torch.arange(n), caption_index=torch.arange(1, n + 1), text_emb=table,
                       text_mask=torch.ones(n + 1, 1, dtype=torch.long), uncond_index=0)


@torch.no_grad()
def prior_pairs(prior_pipe, pairs: pd.DataFrame, images: torch.Tensor, file_names: list[str]) -> LatentPairs:
    """Normalised CLIP image embeddings of the images, conditioned on their captions' CLIP text (row 0: "")."""
    prior = prior_pipe.prior
    emb = image_embeddings(prior_pipe, images)
    emb = (emb - prior.clip_mean.detach().float().cpu()) / prior.clip_std.detach().float().cpu()
    captions = [""] + sorted(pairs["text"].unique())
    tok = prior_pipe.tokenizer(captions, padding="max_length", max_length=prior_pipe.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
    device = prior_pipe.text_encoder.device
    states, pooled = [], []
    for i in range(0, len(captions), 64):
        out = prior_pipe.text_encoder(tok.input_ids[i : i + 64].to(device))
        states.append(out.last_hidden_state.float().cpu())
        pooled.append(out.text_embeds.float().cpu())
    index_of = {name: i for i, name in enumerate(file_names)}
    caption_of = {c: i for i, c in enumerate(captions)}
    return LatentPairs(latent_mean=emb, latent_std=torch.zeros_like(emb), scaling_factor=1.0,
                       image_index=torch.tensor([index_of[f] for f in pairs["file_name"]]),
                       caption_index=torch.tensor([caption_of[c] for c in pairs["text"]]),
                       text_emb=torch.cat(states), text_mask=tok.attention_mask, uncond_index=0,
                       extra_cond={"proj_embedding": torch.cat(pooled)})


@dataclass
class KandinskyBase:
    prior: object  # KandinskyV22PriorPipeline
    decoder: object  # KandinskyV22Pipeline
    resolution: int  # the image side the decoder is trained and sampled at

    def to_vae_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_rgb_at(images, self.decoder.movq.config.in_channels, self.resolution)

    def combined(self):
        """Prior + decoder as one text-to-image pipeline (what diffusers' AutoPipelineForText2Image gives)."""
        from diffusers import KandinskyV22CombinedPipeline

        d, p = self.decoder, self.prior
        pipe = KandinskyV22CombinedPipeline(unet=d.unet, scheduler=d.scheduler, movq=d.movq, prior_prior=p.prior,
                                            prior_image_encoder=p.image_encoder, prior_text_encoder=p.text_encoder,
                                            prior_tokenizer=p.tokenizer, prior_scheduler=p.scheduler,
                                            prior_image_processor=p.image_processor)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def model(self, part: str) -> nn.Module:
        return self.prior.prior if part == "prior" else self.decoder.unet


def load_kandinsky(decoder_path: str, prior_path: str, device="cpu", resolution: int = 0) -> KandinskyBase:
    """The decoder (`train_lora.path`) and prior (`train_lora.kandinsky.prior_path`) pipelines; ``resolution``
    0 = the decoder's native size (its UNet's sample size x MoVQ's factor, 512 for Kandinsky 2.2)."""
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    decoder = open_pipeline(KandinskyV22Pipeline, decoder_path, "kandinsky-2.2 decoder").to(device)
    prior = open_pipeline(KandinskyV22PriorPipeline, prior_path, "kandinsky-2.2 prior",
                          param="train_lora.kandinsky.prior_path").to(device)
    factor = downsampling(decoder.movq.config.block_out_channels)
    native = (decoder.unet.config.sample_size or 64) * factor
    return KandinskyBase(prior, decoder, resolution or native)
