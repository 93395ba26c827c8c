import torch
from diffusers import AutoencoderKL

from synthmed.models.autoencoder import (VAETrainConfig, build_autoencoder, latent_scaling_factor,
                                         reconstruct, reconstruction_metrics, train_autoencoder)


def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder(in_channels=1, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=16)


def test_vae_trains_reconstructs_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    vae = tiny_vae()
    before = reconstruction_metrics(images, reconstruct(vae, images))
    log = train_autoencoder(vae, images, VAETrainConfig(steps=40, batch_size=8, lr=3e-3, kl_weight=1e-6), g)
    after = reconstruction_metrics(images, reconstruct(vae, images))
    assert after["mae"] < before["mae"] and log[-1]["loss"] < log[0]["loss"]
    assert vae.encode(images).latent_dist.mean.shape == (8, 4, 8, 8)  # factor 2 per extra level
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, images, g))
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == vae.config.scaling_factor != 0.18215
    assert torch.allclose(reconstruct(loaded, images), reconstruct(vae, images), atol=1e-6)
