import pytest

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
