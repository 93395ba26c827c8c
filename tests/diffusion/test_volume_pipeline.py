"""The 3-D generator: a volume autoencoder and a volume UNet in one SynthMedPipeline folder, sampled seed by
seed, saved as .npy, and the 2-D helpers that see volumes (packing, grids, plane features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from synthmed.diffusion.schedulers import make_noise_scheduler

from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.sample import pack_latents, unpack_latents
from synthmed.diffusion.shards import save_image
from synthmed.metrics.volumes import PlaneFeatures, central_plane_images, nearest_volume_metrics
from synthmed.models.autoencoder import build_autoencoder, load_autoencoder, reconstruction_metrics
from synthmed.models.unet import build_unet
from synthmed.viz import central_planes, image_grid
from synthmed.text.encoder import TextEncoder
from tests.helpers import tiny_volume_vae


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(max_length=8)


def test_volume_autoencoder_round_trips_its_folder(tmp_path):
    vae = tiny_volume_vae()
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    post = vae.encode(x).latent_dist
    assert post.mean.shape == (2, 2, 8, 8, 8) and post.kl().shape == (2,)
    vae.save_pretrained(tmp_path / "vae")
    again = load_autoencoder(tmp_path / "vae")
    assert type(again).__name__ == "VolumeAutoencoderKL"
    torch.testing.assert_close(again.decode(post.mean).sample, vae.decode(post.mean).sample)
    m = reconstruction_metrics(x.clamp(-1, 1), (0.9 * x).clamp(-1, 1))
    assert 10 < m["psnr"] < 60 and 0 < m["ssim"] <= 1


def test_volume_mid_attention_is_refused():
    with pytest.raises(ValueError, match="mid_attention is 2-D only"):
        build_autoencoder(in_channels=1, block_out_channels=[8, 8], layers_per_block=1, latent_channels=2,
                          norm_num_groups=4, sample_size=16, mid_attention=True, dims=3)


@pytest.mark.parametrize("patch", [1, 2])
def test_volume_latents_pack_and_unpack(patch):
    vae = tiny_volume_vae()
    z = torch.randn(3, 2, 8, 8, 8)
    packed = pack_latents(z, patch)
    assert packed.shape == (3, 2 * patch**3, 8 // patch, 8 // patch, 8 // patch)
    assert torch.equal(unpack_latents(vae, packed), z)


def test_volume_pipeline_samples_by_seed_and_survives_its_folder(tmp_path, encoder):
    vae = tiny_volume_vae()
    torch.manual_seed(1)
    unet = build_unet(sample_size=4, in_channels=16, block_out_channels=[8, 16], layers_per_block=1,
                      cross_attention_dim=encoder.hidden_size, attention_head_dim=2, norm_num_groups=4,
                      dropout=0.0, self_condition=True, attention_levels=[1], dims=3)
    pipe = SynthMedPipeline(unet, vae, DDIMScheduler.from_config(make_noise_scheduler(1000).config), text_max_length=8)
    pipe.use_text_encoder(encoder)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a volume", "another volume", "a volume"], [5, 6, 5]
    volumes = pipe.generate(prompts, seeds, num_inference_steps=3, batch_size=2)
    assert volumes.shape == (3, 1, 16, 16, 16) and volumes.dtype == np.uint8
    assert np.array_equal(volumes[0], volumes[2]) and not np.array_equal(volumes[0], volumes[1])
    with pytest.raises(ValueError, match="not a picture"):
        pipe("a volume", num_inference_steps=2, output_type="pil")
    assert pipe("a volume", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 16, 1)

    pipe.save_pretrained(tmp_path / "model")
    again = SynthMedPipeline.from_pretrained(tmp_path / "model").use_text_encoder(encoder)
    again.set_progress_bar_config(disable=True)
    assert type(again.unet).__name__ == "ConditionalUNet" and type(again.vae).__name__ == "VolumeAutoencoderKL"
    assert np.array_equal(again.generate(prompts[:1], seeds[:1], num_inference_steps=3), volumes[:1])

    name = save_image(volumes[0, 0], tmp_path / "synth_000000")
    assert name.endswith(".npy") and np.array_equal(np.load(tmp_path / name), volumes[0, 0])
    first = (tmp_path / name).read_bytes()
    save_image(volumes[0, 0], tmp_path / "synth_000000")
    assert (tmp_path / name).read_bytes() == first  # same voxels, same bytes (DVC hashes them)


def test_volume_views_agree_between_the_grid_and_the_plane_features():
    vol = np.zeros((8, 10, 12), dtype=np.uint8)
    vol[:, :, 6] = 200  # the axial central plane lit
    tiles = central_planes(vol)
    assert tiles.shape == (12, 3 * 12 + 2) and tiles[:, :12].max() == 200
    image_grid([vol, vol], ["a", "b"])  # volumes tile as their planes
    planes = central_plane_images(torch.as_tensor(vol)[None, None])
    assert [tuple(p.shape[2:]) for p in planes] == [(10, 8), (12, 8), (12, 10)]
    assert planes[0].max() == 200 and planes[1].max() == 200 and planes[2].max() == 200  # each cuts the lit plane
    axial = torch.as_tensor(tiles[: planes[0].shape[2], : planes[0].shape[3]])
    assert torch.equal(axial, planes[0][0, 0])

    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).mean(1, keepdim=True)

    feats = PlaneFeatures(Mean())(torch.as_tensor(vol)[None, None].float())
    assert feats.shape == (1, 3)


def test_nearest_volume_metrics_score_copies_above_noise():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 255, (6, 1, 16, 16, 16), generator=g, dtype=torch.uint8)
    test = torch.randint(0, 255, (4, 1, 16, 16, 16), generator=g, dtype=torch.uint8)
    copies = nearest_volume_metrics(test.clone(), train, test)
    noise = nearest_volume_metrics(torch.randint(0, 255, (4, 1, 16, 16, 16), generator=g, dtype=torch.uint8),
                                   train, test)
    assert copies["volume_mae"] == pytest.approx(0.0, abs=1e-12) and copies["volume_ssim"] == pytest.approx(1.0)
    assert noise["volume_mae"] > 0.2 and noise["volume_ssim"] < 0.2
    assert noise["volume_ssim_real_test_vs_train"] == pytest.approx(copies["volume_ssim_real_test_vs_train"])
