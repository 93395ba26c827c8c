"""The recorded self-attention is the model's own, and aggregating it over resolutions keeps distributions."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from synthmed.segment.attention import (SelfAttentionMissing, aggregate, record_self_attention,
                                        self_attention_layers)
from tests.helpers import tiny_unet


def inputs(unet, n: int = 2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([10] * n), torch.randn(n, 5, 384, generator=g))


def test_the_recorded_maps_are_the_models_own_attention_probabilities_and_change_nothing():
    unet = tiny_unet().eval()
    unet.set_attn_processor(AttnProcessor())  # the classic processor computes the probabilities explicitly
    layers = self_attention_layers(unet)
    assert layers and all(name.endswith("attn1") for name in layers)
    own: dict[str, torch.Tensor] = {}
    for name, m in layers.items():  # the model's own softmax(q k^T / sqrt(d)), caught where it is made
        def catch(q, k, mask=None, *, _m=m, _name=name, _f=m.get_attention_scores):
            probs = _f(q, k, mask)
            own[_name] = probs.view(-1, _m.heads, *probs.shape[1:]).mean(1)
            return probs
        m.get_attention_scores = catch
    x, t, ctx = inputs(unet)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx).sample
        with record_self_attention(unet) as maps:
            recorded = unet(x, t, encoder_hidden_states=ctx).sample
    assert len(maps) == len(layers)
    for (name, expected), got in zip(own.items(), maps):  # the layers run in module order
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6), name
        assert torch.allclose(got.sum(-1), torch.ones(got.shape[:2]), atol=1e-5)
    assert torch.equal(plain, recorded)  # the recorder changes nothing the model computes
    assert all(isinstance(m.processor, AttnProcessor) for m in layers.values())  # and leaves its processors


def test_a_unet_without_self_attention_where_asked_says_so_in_one_line():
    from synthmed.models.unet import build_unet

    volume = build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                        cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8, dropout=0.0, dims=3)
    with pytest.raises(SelfAttentionMissing, match="cross-attention only") as exc, record_self_attention(volume):
        pass
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="blocks"), record_self_attention(tiny_unet(), ["middle"]):
        pass


def test_aggregation_brings_every_resolution_onto_the_finest_grid_as_distributions():
    g = torch.Generator().manual_seed(0)
    fine = torch.rand(2, 16, 16, generator=g).softmax(-1)  # a 4x4 grid
    coarse = torch.eye(4).expand(2, 4, 4)  # a 2x2 grid where each position attends only to itself
    out = aggregate([fine, coarse], side=4)
    assert out.shape == (2, 16, 16) and torch.allclose(out.sum(-1), torch.ones(2, 16), atol=1e-6)
    alone = aggregate([coarse], side=4)[0].reshape(4, 4, 4, 4)  # [query y, x, key y, x]
    # the queries of one coarse cell share its map, and that map is highest over the cell's own quadrant
    assert torch.equal(alone[0, 0], alone[1, 1]) and alone[0, 0, :2, :2].sum() > alone[0, 0, 2:, 2:].sum()
    assert torch.allclose(aggregate([fine], side=4), fine / fine.sum(-1, keepdim=True))
    cube = torch.rand(1, 8, 8, generator=g).softmax(-1)  # a 2x2x2 volume grid onto 4x4x4
    assert aggregate([cube], side=4, dims=3).shape == (1, 64, 64)
