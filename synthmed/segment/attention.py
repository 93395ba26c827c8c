"""The self-attention maps of a trained UNet at one noise level, aggregated over its resolutions.

`record_self_attention(unet, blocks)` swaps a recording processor into every self-attention layer of the
chosen parts of a diffusers UNet (``attn1`` of its transformer blocks: the down, mid and up blocks); each
call of the UNet then leaves one [B, N, N] map per layer (heads averaged), row q the distribution of query
position q over the N positions of that layer's grid. `aggregate` brings them onto one grid (keys
interpolated, queries repeated) and sums them weighted by resolution, as DiffSeg does.

synthmed's own ConditionalUNet (volumes, the invertible backbone) has cross-attention only: no maps to
record (`SelfAttentionMissing`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

BLOCKS = ("down", "mid", "up")


class SelfAttentionMissing(ValueError):
    pass


class RecordingProcessor:
    """Runs the layer's own processor unchanged, after recording its attention probabilities (computed
    again, as diffusers' classic processor does: softmax(q k^T / sqrt(d)), heads averaged)."""

    def __init__(self, inner, sink: list[torch.Tensor]):
        self.inner, self.sink = inner, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        x = hidden_states
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k = attn.head_to_batch_dim(attn.to_q(x)), attn.head_to_batch_dim(attn.to_k(x))
        probs = attn.get_attention_scores(q, k, None)  # [B * heads, N, N]
        self.sink.append(probs.float().view(x.shape[0], attn.heads, *probs.shape[1:]).mean(1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def self_attention_layers(unet, blocks=BLOCKS) -> dict[str, torch.nn.Module]:
    """The self-attention modules (diffusers ``Attention``, not cross-attention) in the UNet's ``blocks``."""
    from diffusers.models.attention_processor import Attention

    part = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, Attention) and not m.is_cross_attention and name.endswith("attn1")
            and any(name.startswith(part[b]) for b in blocks)}


def missing(unet, blocks) -> str:
    """Why ``unet`` has no self-attention in ``blocks``, in one line."""
    kind = type(unet).__name__
    where = (" (synthmed's volume and invertible UNet has cross-attention only)" if kind == "ConditionalUNet" else
             "; its attention levels are "
             f"{[i for i, b in enumerate(getattr(unet.config, 'down_block_types', ())) if 'Attn' in b]} and the middle")
    return (f"{kind} has no self-attention in its {'/'.join(blocks)} blocks{where}: zero-shot segmentation "
            "needs a 2-D standard backbone with attention there (train_ldm.unet.attention_levels)")


@contextlib.contextmanager
def record_self_attention(unet, blocks=BLOCKS) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every UNet call appends one [B, N, N] map per recorded layer to the yielded list."""
    bad = sorted(set(blocks) - set(BLOCKS))
    if bad:
        raise ValueError(f"blocks {bad}: use some of {', '.join(BLOCKS)}")
    layers = self_attention_layers(unet, blocks)
    if not layers:
        raise SelfAttentionMissing(missing(unet, blocks))
    sink: list[torch.Tensor] = []
    saved = {name: m.processor for name, m in layers.items()}
    for m in layers.values():
        m.set_processor(RecordingProcessor(m.processor, sink))
    try:
        yield sink
    finally:
        for name, m in layers.items():
            m.set_processor(saved[name])


def grid_side(n: int, dims: int) -> int:
    side = round(n ** (1 / dims))
    if side**dims != n:
        raise ValueError(f"an attention map over {n} positions is not a square/cubic grid")
    return side


def aggregate(maps: list[torch.Tensor], side: int, dims: int = 2) -> torch.Tensor:
    """[B, N_l, N_l] maps of grids of side r_l -> [B, side^dims, side^dims] on one grid of ``side``: each key map
    (bi/trilinearly) interpolated to the grid, each query's map given to the side/r_l positions it covers per
    axis, weighted by r_l / side (finer layers see finer structure, DiffSeg's weighting), rows renormalised
    to distributions."""
    if not maps:
        raise ValueError("no attention maps to aggregate")
    mode = "bilinear" if dims == 2 else "trilinear"
    b, n = maps[0].shape[0], side**dims
    out = torch.zeros(b, n, n)
    for m in maps:
        r = grid_side(m.shape[-1], dims)
        keys = m.float().reshape(b * r**dims, 1, *(r,) * dims)
        if r != side:
            keys = F.interpolate(keys, size=(side,) * dims, mode=mode, align_corners=False)
        keys = keys.reshape(b, r**dims, n).transpose(1, 2).reshape(b, n, *(r,) * dims)  # queries as a grid
        if r != side:
            keys = F.interpolate(keys, size=(side,) * dims, mode="nearest")
        out += (r / side) * keys.reshape(b, n, n).transpose(1, 2)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12)


def resolution_of(maps: list[torch.Tensor], dims: int) -> int:
    """The finest grid side among the recorded maps."""
    return max(grid_side(m.shape[-1], dims) for m in maps)


@torch.no_grad()
def image_attention(pipe, images: torch.Tensor, conditions, timestep: int, blocks, generators: list[torch.Generator]
                    ) -> tuple[torch.Tensor, int]:
    """uint8 images [B, C, H, W] seen by a SynthMedPipeline's UNet once, noised to ``timestep`` (each image's
    noise from its own generator), under ``conditions`` (captions, or image embeddings [B, T, D] for an
    image-conditioned model; None: the null condition) -> (aggregated self-attention [B, N, N], grid side)."""
    from synthmed.data.dataset import to_model_range
    from synthmed.diffusion.loss import add_noise, unet_input
    from synthmed.diffusion.sample import latent_patch, pack_latents
    from synthmed.diffusion.schedulers import training_scheduler
    from synthmed.models.autoencoder import encode_posterior
    from synthmed.models.image_encoder import n_tokens

    unet, vae, device = pipe.unet, pipe.vae, pipe.device
    dims = images.ndim - 2
    mean, _ = encode_posterior(vae, to_model_range(images))
    z0 = pack_latents(mean, latent_patch(vae, unet.config.out_channels, dims)) * vae.config.scaling_factor
    noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in generators])
    t = torch.full((len(z0),), int(timestep))
    noisy = add_noise(training_scheduler(pipe.scheduler), z0, noise, t)
    n = len(images)
    if conditions is None:  # the null condition: the empty caption, or the all-zero image embedding
        emb, mask, _, _ = pipe.encode_conditions(
            torch.zeros(n, n_tokens(pipe.config.image_tokens), unet.config.encoder_hid_dim)
            if pipe.image_conditioned else [""] * n)
    else:
        emb, mask, _, _ = pipe.encode_conditions(conditions)
    with record_self_attention(unet, blocks) as maps:
        unet(unet_input(unet, noisy.to(device), None), t.to(device), encoder_hidden_states=emb.to(device),
             encoder_attention_mask=mask.to(device))
    side = resolution_of(maps, dims)
    return aggregate([m.cpu() for m in maps], side, dims), side


__all__ = ["BLOCKS", "RecordingProcessor", "SelfAttentionMissing", "aggregate", "grid_side", "image_attention",
           "missing", "record_self_attention", "resolution_of", "self_attention_layers"]
