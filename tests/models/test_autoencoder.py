import math

import pytest
import torch
from diffusers import AutoencoderKL

from synthmed.models.autoencoder import (build_autoencoder, encode_posterior, latent_scaling_factor,
                                         posterior_noise_fraction, reconstruct, reconstruction_metrics,
                                         train_autoencoder)
from tests.helpers import tiny_vae, vae_train_config


def test_vae_trains_reconstructs_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    vae = tiny_vae()
    before = reconstruction_metrics(images, reconstruct(vae, images))
    log = train_autoencoder(vae, images, vae_train_config(steps=40), g)
    after = reconstruction_metrics(images, reconstruct(vae, images))
    assert after["mae"] < before["mae"] and log[-1]["loss"] < log[0]["loss"]
    assert vae.encode(images).latent_dist.mean.shape == (8, 4, 8, 8)  # factor 2 per extra level
    vae.register_to_config(scaling_factor=latent_scaling_factor(*encode_posterior(vae, images), g))
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == vae.config.scaling_factor != 0.18215
    assert torch.allclose(reconstruct(loaded, images), reconstruct(vae, images), atol=1e-6)


def test_l2_ssim_loss_and_resume_match_an_uninterrupted_run(tmp_path):
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = dict(recon_loss="l1+l2", ssim_weight=0.5, checkpoint_every=5, warmup_steps=3)
    full = tiny_vae()
    log_full = train_autoencoder(full, images, vae_train_config(steps=12, **settings), torch.Generator().manual_seed(1))
    part = tiny_vae()  # a run "killed" after step 10: its newest checkpoint is that of step 10
    train_autoencoder(part, images, vae_train_config(steps=12, **settings), torch.Generator().manual_seed(1),
                      checkpoint_dir=tmp_path, fingerprint="f")
    (tmp_path / "step00000012.pt").unlink()  # the checkpoints' own names; step 10's stays
    assert (tmp_path / "step00000010.pt").is_file()
    resumed = tiny_vae()
    log = train_autoencoder(resumed, images, vae_train_config(steps=12, **settings), torch.Generator().manual_seed(99),
                            checkpoint_dir=tmp_path, fingerprint="f")
    assert [r["step"] for r in log] == list(range(12)) and log[-1]["loss"] == log_full[-1]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_bf16_autocast_trains_and_keeps_fp32_weights():
    from synthmed.models.autoencoder import use_bf16

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    vae = tiny_vae()
    log = train_autoencoder(vae, images, vae_train_config(steps=30, mixed_precision="bf16", warmup_steps=5), g)
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert use_bf16(torch.device("cpu"), "bf16") and not use_bf16(torch.device("cpu"), "no")


def test_posterior_noise_fraction_tells_noisy_latents_from_clean_ones():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = tiny_vae()
    assert 0.5 < posterior_noise_fraction(*encode_posterior(vae, images)) <= 1.0  # at init the std is about 1
    with torch.no_grad():  # the logvar half of the posterior's last conv: variance e^-8 everywhere
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-8.0)
        mean_var = float(vae.encode(images).latent_dist.mean.double().var())
    noise = math.exp(-8.0)
    assert abs(posterior_noise_fraction(*encode_posterior(vae, images)) - noise / (mean_var + noise)) < 1e-6


def test_perceptual_term_trains_2d_and_is_refused_for_volumes():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    plain = train_autoencoder(tiny_vae(), images, vae_train_config(steps=15), torch.Generator().manual_seed(1))
    vae = tiny_vae()
    log = train_autoencoder(vae, images, vae_train_config(steps=15, perceptual_weight=0.5),
                            torch.Generator().manual_seed(1))
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[0]["recon"] > plain[0]["recon"]  # the same first batch, the perceptual distance added to its loss
    volumes = torch.rand(4, 1, 8, 8, 8, generator=g) * 2 - 1
    vae3d = build_autoencoder(in_channels=1, block_out_channels=[8, 8], layers_per_block=1, latent_channels=4,
                              norm_num_groups=4, sample_size=8, mid_attention=False, dims=3)
    with pytest.raises(ValueError, match="perceptual_weight"):
        train_autoencoder(vae3d, volumes, vae_train_config(steps=2, perceptual_weight=0.5), g)
