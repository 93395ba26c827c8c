"""The denoiser: a diffusers UNet2DConditionModel with cross-attention over text tokens; for volumes
(``dims=3``) or ``backbone="invertible"``, synthmed's ConditionalUNet (the same interface)."""

from __future__ import annotations

from diffusers import UNet2DConditionModel


def build_unet(*, sample_size: int, in_channels: int, block_out_channels: list[int], layers_per_block: int,
               cross_attention_dim: int, attention_head_dim: int, norm_num_groups: int,
               dropout: float, self_condition: bool = False,
               attention_levels: list[int] | None = None,
               encoder_hid_dim: int | None = None, dims: int = 2, backbone: str = "standard",
               invertible_attention: bool = False) -> UNet2DConditionModel:
    """Transformer blocks (self-attention, cross-attention to the text, feed-forward) at the resolution
    levels in ``attention_levels`` (0 = the latent's full resolution) and in the middle block.
    None = every level but the lowest, whose resolution the middle block's attention already covers (MSDM).

    With ``encoder_hid_dim`` the conditioning tokens (an image encoder's) are that wide and a learned linear
    projection (diffusers' `text_proj`) maps them to ``cross_attention_dim``.

    With ``self_condition`` the input has twice the latent channels: the noisy latent and
    the model's previous clean estimate (the sampler and trainer detect this from the config).
    """
    n = len(block_out_channels)
    levels = set(range(n - 1) if attention_levels is None else attention_levels)
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
            invertible_attention=invertible_attention)
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
    )
