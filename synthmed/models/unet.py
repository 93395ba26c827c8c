"""The denoiser: a diffusers UNet2DConditionModel with cross-attention over text tokens; for volumes
(``dims=3``) or ``backbone="invertible"``, synthmed's ConditionalUNet (the same interface)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from diffusers import UNet2DConditionModel

from synthmed.core.errors import PipelineError


@dataclass
class UNetParams:
    """train_ldm.unet: the denoiser's shape."""
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
    pooled_condition: bool  # the condition's tokens, attention-pooled, added to the timestep embedding too

    def __post_init__(self):
        from synthmed.core.config import require_at_least_one

        require_at_least_one(self, "latent_patch")


UNET_KEYS = [f.name for f in fields(UNetParams)]


def build_unet(*, sample_size: int, in_channels: int, block_out_channels: list[int], layers_per_block: int,
               cross_attention_dim: int, attention_head_dim: int, norm_num_groups: int,
               dropout: float, self_condition: bool = False,
               attention_levels: list[int] | None = None,
               encoder_hid_dim: int | None = None, dims: int = 2, backbone: str = "standard",
               invertible_attention: bool = False, pooled_condition: bool = False) -> UNet2DConditionModel:
    """Transformer blocks (self-attention, cross-attention to the text, feed-forward) at the resolution
    levels in ``attention_levels`` (0 = the latent's full resolution) and in the middle block.
    None = every level but the lowest, whose resolution the middle block's attention already covers (MSDM).

    With ``encoder_hid_dim`` the conditioning tokens (an image encoder's) are that wide and a learned linear
    projection (diffusers' `text_proj`) maps them to ``cross_attention_dim``.

    With ``self_condition`` the input has twice the latent channels: the noisy latent and
    the model's previous clean estimate (the sampler and trainer detect this from the config).

    With ``pooled_condition`` the conditioning tokens are also attention-pooled into one vector added to the
    timestep embedding (diffusers' ``addition_embed_type="text"``, DeepFloyd IF's global text condition): every
    block, not only those with cross-attention, sees the caption.
    """
    n = len(block_out_channels)
    levels = set(range(n - 1) if attention_levels is None else attention_levels)
    addition_embed_type = "text" if pooled_condition else None
    if not levels <= set(range(n)):
        raise ValueError(f"attention_levels must be among 0..{n - 1} (one per block_out_channels entry), "
                         f"got {sorted(levels)}")
    if dims != 2 or backbone != "standard" or invertible_attention:
        from synthmed.models.cond_unet import ConditionalUNet

        if invertible_attention and backbone != "invertible":
            raise ValueError("invertible_attention needs backbone: invertible")
        return ConditionalUNet(
            dims=dims, sample_size=sample_size, in_channels=in_channels * (2 if self_condition else 1),
            out_channels=in_channels, block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, encoder_hid_dim=encoder_hid_dim,
            attention_levels=tuple(sorted(levels)), attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, dropout=dropout, backbone=backbone,
            invertible_attention=invertible_attention, addition_embed_type=addition_embed_type)
    down = tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels * (2 if self_condition else 1),
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        encoder_hid_dim=encoder_hid_dim,
        encoder_hid_dim_type="text_proj" if encoder_hid_dim else None,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
        addition_embed_type=addition_embed_type,
        addition_embed_type_num_heads=pooling_heads(encoder_hid_dim or cross_attention_dim),
    )


def pooling_heads(width: int) -> int:
    """Heads of the condition's attention pooling: diffusers' 64 where they divide the token width."""
    return math.gcd(width, 64)


def downsampling(block_out_channels) -> int:
    """Each side shrinks by this factor through a VAE or UNet with these levels: 2 ** (levels - 1)."""
    return 2 ** (len(block_out_channels) - 1)


def check_latent_grid(resolution: int, vae_levels, p: UNetParams, volumes: bool) -> None:
    """The UNet ``p`` (train_ldm.unet) must tile the latent grid that the VAE (``vae_levels``: its
    block_out_channels) and ``p.latent_patch`` make of ``resolution``-px images; one line naming the params to
    change otherwise. diffusers' 2-D UNet pads odd sizes itself; the volume and invertible UNets cannot."""
    side = resolution // downsampling(vae_levels)
    if side % p.latent_patch:
        raise PipelineError(f"params.yaml: train_ldm.unet.latent_patch={p.latent_patch} does not divide the {side}x{side} latent grid of "
                         f"the VAE; use a divisor of {side}")
    grid, stride = side // p.latent_patch, downsampling(p.block_out_channels)
    if (volumes or p.backbone == "invertible") and grid % stride:
        from synthmed.models.cond_unet import nearest_valid_sizes

        factor = resolution // grid
        valid = " or ".join(str(g * factor) for g in nearest_valid_sizes(grid, stride))
        raise PipelineError(f"params.yaml: ingest.resolution={resolution} gives a {grid}-wide grid for the UNet (÷{factor}: the VAE's "
                         f"downsampling x train_ldm.unet.latent_patch), which its total stride {stride} (2 ** (levels of "
                         f"train_ldm.unet.block_out_channels - 1)) does not divide; nearest valid ingest.resolution: "
                         f"{valid}, or fewer levels")


def unet_for_training(p: UNetParams, latents, unet_dims: dict[str, int], gradient_checkpointing: bool = False):
    """The denoiser ``p`` (train_ldm.unet) over latents shaped like ``latents`` [N, C, *grid]; a params error in
    one line when the backbone cannot honour an option."""
    try:
        unet = build_unet(sample_size=latents.shape[-1], in_channels=latents.shape[1], dims=latents.ndim - 2,
                          block_out_channels=p.block_out_channels, layers_per_block=p.layers_per_block,
                          attention_head_dim=p.attention_head_dim, norm_num_groups=p.norm_num_groups,
                          dropout=p.dropout, self_condition=p.self_condition, attention_levels=p.attention_levels,
                          backbone=p.backbone, invertible_attention=p.invertible_attention,
                          pooled_condition=p.pooled_condition, **unet_dims)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
    except ValueError as exc:  # an option the backbone cannot honour, a grid its strides do not divide
        raise PipelineError(f"params.yaml: train_ldm.unet: {exc}") from None
    return unet
