import pytest
import torch

from synthmed.models.unet import build_unet


def unet(**kw):
    return build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                      cross_attention_dim=12, attention_head_dim=2, norm_num_groups=8, dropout=0.0, **kw)


def test_attention_levels_choose_which_resolutions_attend():
    assert unet().config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")  # all but the lowest
    model = unet(attention_levels=[1])
    assert model.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert model.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")  # mirrored: lowest level first
    with pytest.raises(ValueError, match="attention_levels must be among 0..1"):
        unet(attention_levels=[2])


@pytest.mark.parametrize("kw", [{}, {"dims": 3}, {"backbone": "invertible"}], ids=["2d", "3d", "invertible"])
def test_pooled_condition_feeds_the_tokens_to_the_time_embedding_and_survives_a_round_trip(tmp_path, kw):
    torch.manual_seed(0)
    model = unet(pooled_condition=True, **kw)
    assert getattr(unet(**kw), "add_embedding", None) is None
    with torch.no_grad():  # off the zero-initialised residual outputs, as after some training
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    x = torch.randn(2, 4, *[8] * kw.get("dims", 2))
    ctx = torch.randn(2, 5, 12)
    model(x, 10, encoder_hidden_states=ctx).sample.square().mean().backward()
    grad = model.add_embedding.pool.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the pooled path reaches the output
    model.eval().save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, 10, encoder_hidden_states=ctx).sample,
                                   model(x, 10, encoder_hidden_states=ctx).sample)
