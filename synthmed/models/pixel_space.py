"""The identity "autoencoder" of a pixel-space diffusion model: the diffusion runs on the images themselves.

It stands where the VAE stands (`train_vae.pretrained: pixels`), so the trainer, the latent caches, the
packing (`train_ldm.unet.latent_patch`: 64x64x1 pixels -> 16x16x16 at 4) and the pipeline folder treat pixel
space as one more latent space: the reference arm a latent model has to beat at the same CPU-minutes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from synthmed.models.volume_autoencoder import DecoderOutput, DiagonalGaussian, EncoderOutput

PIXELS = "pixels"  # the train_vae.pretrained value that selects it


class PixelSpace(ModelMixin, ConfigMixin):
    """encode: the images as a posterior of (almost) zero width; decode: the latents as they are."""

    @register_to_config
    def __init__(self, *, dims: int = 2, in_channels: int = 1, sample_size: int = 64, scaling_factor: float = 1.0,
                 latent_channels: int = 0, out_channels: int = 0, block_out_channels: list[int] | None = None):
        super().__init__()
        # the AutoencoderKL config keys that callers read, derived: factor 1, latent channels = image channels
        self.register_to_config(latent_channels=in_channels, out_channels=in_channels, block_out_channels=[in_channels])
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # a device and dtype to follow, nothing to train

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        dist = DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], dim=1))  # std e^-15
        return EncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        return DecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator=None) -> DecoderOutput:
        return self.decode(x)
