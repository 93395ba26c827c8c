"""The first stage of a 3-D LDM: a small KL autoencoder for volumes, called as diffusers' AutoencoderKL is.

diffusers has no volumetric autoencoder (its 3-D ones are causal video VAEs), and MONAI's networks are not
diffusers models (no config, no `save_pretrained`), so this one is ours: the same layout as AutoencoderKL
(residual blocks, strided-convolution downsampling, a diagonal Gaussian posterior) written for any number
of spatial dimensions, so the trainer, the pipeline folder and the checkpoints treat it as the 2-D one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from synthmed.models.invertible import conv_nd


class DiagonalGaussian:
    """The posterior N(mean, std^2) per latent voxel; KL to N(0, 1) summed over all but the batch axis."""

    def __init__(self, moments: torch.Tensor):
        self.parameters = moments  # diffusers' name: DiagonalGaussian(d.parameters) rebuilds d
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


@dataclass
class EncoderOutput(BaseOutput):
    latent_dist: DiagonalGaussian


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class ResBlock(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), conv_nd(dims, cin, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), conv_nd(dims, cout, cout)
        self.skip = conv_nd(dims, cin, cout, kernel=1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class VolumeAutoencoderKL(ModelMixin, ConfigMixin):
    """Downsampling factor 2 ** (len(block_out_channels) - 1) per axis; `dims` spatial axes (3: volumes)."""

    @register_to_config
    def __init__(self, *, dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 block_out_channels: tuple[int, ...] = (32, 32), layers_per_block: int = 1,
                 latent_channels: int = 4, norm_num_groups: int = 16, sample_size: int = 32,
                 scaling_factor: float = 1.0):
        super().__init__()
        chans, g = list(block_out_channels), norm_num_groups
        self.enc_in = conv_nd(dims, in_channels, chans[0])
        enc, c = [], chans[0]
        for i, width in enumerate(chans):
            for _ in range(layers_per_block):
                enc.append(ResBlock(dims, c, width, g))
                c = width
            if i < len(chans) - 1:
                enc.append(conv_nd(dims, c, c, stride=2))
        moments = conv_nd(dims, c, 2 * latent_channels)
        # The posterior starts nearly deterministic (std e^-3): at an LDM's tiny KL weight nothing pulls it wider,
        # while from the usual std 1 a short training leaves latents half noise, which the diffusion model then
        # has to learn too (measured on the 3-D demo: posterior std 0.59 against 0.74 for the means).
        nn.init.constant_(moments.bias[latent_channels:], -6.0)
        enc += [ResBlock(dims, c, c, g), nn.GroupNorm(g, c), nn.SiLU(), moments]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [conv_nd(dims, latent_channels, c), ResBlock(dims, c, c, g)]
        for i, width in enumerate(reversed(chans)):
            for _ in range(layers_per_block + 1):
                dec.append(ResBlock(dims, c, width, g))
                c = width
            if i < len(chans) - 1:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), conv_nd(dims, c, c)]
        dec += [nn.GroupNorm(g, c), nn.SiLU(), conv_nd(dims, c, out_channels)]
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: torch.Tensor, what: str, channels: int) -> None:
        if x.ndim != self.config.dims + 2 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [N, {channels}, {', '.join('S' * self.config.dims)}], got {list(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        self._check(x, "images", self.config.in_channels)
        dist = DiagonalGaussian(self.encoder(self.enc_in(x)))
        return EncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        self._check(z, "latents", self.config.latent_channels)
        out = self.decoder(z)
        return DecoderOutput(sample=out) if return_dict else (out,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> DecoderOutput:
        dist = self.encode(x).latent_dist
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode())
