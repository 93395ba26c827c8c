"""The denoiser: a diffusers UNet2DConditionModel with cross-attention over text tokens."""

from __future__ import annotations

from diffusers import UNet2DConditionModel


def build_unet(*, sample_size: int, in_channels: int, block_out_channels: list[int], layers_per_block: int,
               cross_attention_dim: int, attention_head_dim: int, norm_num_groups: int,
               dropout: float, self_condition: bool = False) -> UNet2DConditionModel:
    """Every resolution level gets cross-attention + feed-forward transformer blocks (MSDM).

    With ``self_condition`` the input has twice the latent channels: the noisy latent and
    the model's previous clean estimate (the sampler and trainer detect this from the config).
    """
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels * (2 if self_condition else 1),
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
    )
