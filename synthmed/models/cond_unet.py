"""A dims-agnostic (2-D / 3-D) text-conditioned UNet with a `standard` or an `invertible` backbone.

`standard`: residual blocks x + F(x), strided-conv down, nearest-upsample + conv up, skip concatenation.
`invertible`: additive coupling blocks and learnable invertible (space-to-depth + orthogonal) resampling run
through `ReversibleFunction`, so training keeps activations of no block (IDM / iUNet-style); channels must
double per level because the resampling preserves the element count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn
from torch.nn import functional as F

from synthmed.models.unet import downsampling, pooling_heads
from synthmed.models.invertible import (AdditiveCoupling, CheckerboardAttentionCoupling, InvertibleDown,
                                        InvertibleUp, ResidualFunction, ReversibleLayer, conv_nd, group_norm,
                                        reversible_sequence)

BACKBONES = ("standard", "invertible")


@dataclass
class ConditionalUNetOutput(BaseOutput):
    sample: Tensor


def nearest_valid_sizes(size: int, stride: int) -> tuple[int, ...]:
    """The multiples of ``stride`` nearest ``size`` from below (if any) and above."""
    below = (size // stride) * stride
    return (below, below + stride) if below > 0 else (stride,)


def _size_error(size: int, stride: int, what: str) -> ValueError:
    valid = " or ".join(map(str, nearest_valid_sizes(size, stride)))
    return ValueError(f"{what} {size} is not divisible by the UNet's total stride {stride} "
                      f"(2 ** (len(block_out_channels) - 1)); nearest valid sizes: {valid}")


class ResBlock(nn.Module):
    """x + F(x) (1x1 conv on the shortcut where the channel count changes); checkpointable per block."""

    def __init__(self, dims: int, cin: int, cout: int, temb_dim: int, groups: int, dropout: float,
                 ctx_dim: int | None, heads: int):
        super().__init__()
        self.fn = ResidualFunction(dims, cin, cout, temb_dim, groups, dropout, ctx_dim, heads)
        self.shortcut = conv_nd(dims, cin, cout, kernel=1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor, ctx: Tensor, mask: Tensor | None) -> Tensor:
        return self.shortcut(x) + self.fn(x, temb, ctx, mask)


class Upsample(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int):
        super().__init__()
        self.conv = conv_nd(dims, cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConditionalUNet(ModelMixin, ConfigMixin):
    """Denoiser eps(x_t, t, text tokens) over `dims` spatial axes; see the module docstring for the backbones.

    `attention_head_dim` is the number of heads (diffusers' naming, as elsewhere in this repo).
    `encoder_hid_dim`: conditioning tokens of that width are mapped to `cross_attention_dim` by a learned Linear.
    `addition_embed_type="text"`: the conditioning tokens, attention-pooled, are added to the timestep embedding
    (as in diffusers' UNet2DConditionModel).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, *, dims: int = 2, sample_size: int = 32, in_channels: int = 4,
                 out_channels: int | None = None, block_out_channels: tuple[int, ...] = (32, 64),
                 layers_per_block: int = 1, cross_attention_dim: int = 384, encoder_hid_dim: int | None = None,
                 attention_levels: tuple[int, ...] = (1,), attention_head_dim: int = 2, norm_num_groups: int = 8,
                 dropout: float = 0.0, backbone: str = "standard", invertible_attention: bool = False,
                 addition_embed_type: str | None = None):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        chans = [int(c) for c in block_out_channels]
        n = len(chans)
        if n < 1 or layers_per_block < 1:
            raise ValueError("block_out_channels needs at least one level and layers_per_block >= 1")
        levels = set(int(i) for i in attention_levels)
        if not levels <= set(range(n)):
            raise ValueError(f"attention_levels must be among 0..{n - 1}, got {sorted(levels)}")
        if backbone == "invertible" and any(b != 2 * a for a, b in zip(chans, chans[1:])):
            raise ValueError(f"backbone: invertible needs block_out_channels that double per level (invertible "
                             f"down-sampling keeps the element count), got {chans}; use e.g. [32, 64, 128]")
        if invertible_attention and backbone != "invertible":
            raise ValueError("invertible_attention needs backbone: invertible")
        if addition_embed_type not in (None, "text"):
            raise ValueError(f"addition_embed_type must be None or 'text', got {addition_embed_type!r}")
        self.gradient_checkpointing = False
        if sample_size % self.total_stride:
            raise _size_error(sample_size, self.total_stride, "sample_size")
        self.out_ch = out_channels if out_channels is not None else in_channels
        self.register_to_config(out_channels=self.out_ch)  # the pipeline reads a concrete value
        temb_dim = 4 * chans[0]
        self.time_proj = Timesteps(chans[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        self.encoder_hid_proj = (nn.Linear(encoder_hid_dim, cross_attention_dim)
                                 if encoder_hid_dim is not None else None)
        token_width = encoder_hid_dim or cross_attention_dim
        self.add_embedding = (TextTimeEmbedding(token_width, temb_dim, num_heads=pooling_heads(token_width))
                              if addition_embed_type == "text" else None)
        self.conv_in = conv_nd(dims, in_channels, chans[0])
        self.norm_out = group_norm(chans[0], norm_num_groups)
        self.conv_out = conv_nd(dims, chans[0], self.out_ch)
        ctx_at = {i: (cross_attention_dim if i in levels else None) for i in range(n)}
        heads, groups = attention_head_dim, norm_num_groups
        if backbone == "standard":
            def block(i: int, cin: int, cout: int, ctx_dim: int | None) -> ResBlock:
                return ResBlock(dims, cin, cout, temb_dim, groups, dropout, ctx_dim, heads)

            self.down_blocks = nn.ModuleList(
                nn.ModuleList(block(i, chans[i], chans[i], ctx_at[i]) for _ in range(layers_per_block))
                for i in range(n))
            self.downsamplers = nn.ModuleList(
                conv_nd(dims, chans[i], chans[i + 1], stride=2) for i in range(n - 1))
            self.mid_blocks = nn.ModuleList(block(n - 1, chans[-1], chans[-1], cross_attention_dim)
                                            for _ in range(2))
            self.upsamplers = nn.ModuleList(Upsample(dims, chans[i + 1], chans[i]) for i in range(n - 1))
            # The first block after the skip concatenation maps 2C back to C.
            self.up_blocks = nn.ModuleList(
                nn.ModuleList(block(i, 2 * chans[i] if j == 0 else chans[i], chans[i], ctx_at[i])
                              for j in range(layers_per_block))
                for i in range(n - 1))
        else:
            def coupling(i: int, ctx_dim: int | None) -> AdditiveCoupling:
                return AdditiveCoupling(dims, chans[i], temb_dim, groups, dropout, ctx_dim, heads)

            body: list[ReversibleLayer] = []
            for i in range(n):
                body += [coupling(i, ctx_at[i]) for _ in range(layers_per_block)]
                if i < n - 1:
                    body.append(InvertibleDown(dims, chans[i]))
            body.append(coupling(n - 1, cross_attention_dim))
            if invertible_attention:
                body.append(CheckerboardAttentionCoupling(chans[-1], cross_attention_dim, heads))
            body.append(coupling(n - 1, cross_attention_dim))
            for i in reversed(range(n - 1)):
                body.append(InvertibleUp(dims, chans[i]))
                body += [coupling(i, ctx_at[i]) for _ in range(layers_per_block)]
            self.body = nn.ModuleList(body)

    @property
    def total_stride(self) -> int:
        return downsampling(self.config.block_out_channels)

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        if self.config.backbone == "invertible":
            raise ValueError("backbone: invertible recomputes activations from its outputs already; "
                             "turn gradient_checkpointing off")
        super().enable_gradient_checkpointing(gradient_checkpointing_func)

    def _validate(self, sample: Tensor, ctx: Tensor) -> None:
        dims = self.config.dims
        if sample.ndim != dims + 2:
            raise ValueError(f"sample: expected [B, C, *spatial] with {dims} spatial axes "
                             f"({dims + 2} dims), got shape {list(sample.shape)}")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample: expected {self.config.in_channels} channels, got {sample.shape[1]}")
        for s in sample.shape[2:]:
            if s % self.total_stride:
                raise _size_error(s, self.total_stride, "sample spatial size")
        if ctx.ndim != 3 or ctx.shape[0] != sample.shape[0]:
            raise ValueError(f"encoder_hidden_states: expected [B={sample.shape[0]}, T, D], got {list(ctx.shape)}")
        if not torch.isfinite(sample).all():
            raise ValueError("sample contains NaN or inf")
        if not torch.isfinite(ctx).all():
            raise ValueError("encoder_hidden_states contains NaN or inf")

    def _time(self, timestep: Tensor | float | int, batch: int, like: Tensor) -> Tensor:
        t = torch.as_tensor(timestep, device=like.device)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"timestep: expected a scalar or a [B={batch}] tensor, got shape {list(t.shape)}")
        t = t.expand(batch)
        # The sinusoid is computed in float32 (as diffusers) and cast to the model's dtype afterwards.
        return self.time_embedding(self.time_proj(t).to(like.dtype))

    def _checkpointed(self, module: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor | None = None, return_dict: bool = True):
        self._validate(sample, encoder_hidden_states)
        ctx = encoder_hidden_states.to(sample.dtype)
        temb = self._time(timestep, sample.shape[0], sample)
        if self.add_embedding is not None:  # pooled from the tokens as they come, as diffusers does
            temb = temb + self.add_embedding(ctx)
        if self.encoder_hid_proj is not None:
            ctx = self.encoder_hid_proj(ctx)
        mask = encoder_attention_mask
        if mask is not None and mask.shape != ctx.shape[:2]:
            raise ValueError(f"encoder_attention_mask: expected {list(ctx.shape[:2])}, got {list(mask.shape)}")
        h = self.conv_in(sample)
        if self.config.backbone == "standard":
            h = self._standard(h, temb, ctx, mask)
        else:
            # the coupled state in float32 under autocast too (the functions inside may run in bf16/fp16): it is
            # what the backward pass reconstructs by subtraction
            (h,) = reversible_sequence(self.body, [h.float()], temb, ctx, mask)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return ConditionalUNetOutput(sample=out) if return_dict else (out,)

    def _standard(self, h: Tensor, temb: Tensor, ctx: Tensor, mask: Tensor | None) -> Tensor:
        n = len(self.down_blocks)
        skips = []
        for i in range(n):
            for blk in self.down_blocks[i]:
                h = self._checkpointed(blk, h, temb, ctx, mask)
            if i < n - 1:
                skips.append(h)
                h = self.downsamplers[i](h)
        for blk in self.mid_blocks:
            h = self._checkpointed(blk, h, temb, ctx, mask)
        for i in reversed(range(n - 1)):
            h = torch.cat([skips.pop(), self.upsamplers[i](h)], dim=1)
            for blk in self.up_blocks[i]:
                h = self._checkpointed(blk, h, temb, ctx, mask)
        return h


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["BACKBONES", "ConditionalUNet", "ConditionalUNetOutput", "nearest_valid_sizes", "parameter_count"]
