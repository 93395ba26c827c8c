import torch
from diffusers import AutoencoderKL

from synthmed.models.autoencoder import (VAETrainConfig, build_autoencoder, latent_scaling_factor,
                                         reconstruct, reconstruction_metrics, train_autoencoder)


def cfg(**kw) -> VAETrainConfig:
    base = dict(steps=40, batch_size=8, lr=3e-3, kl_weight=1e-6, recon_loss="l1", ssim_weight=0.0,
                checkpoint_every=0, keep_checkpoints=2)
    return VAETrainConfig(**{**base, **kw})


def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder(in_channels=1, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=16)


def test_vae_trains_reconstructs_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    vae = tiny_vae()
    before = reconstruction_metrics(images, reconstruct(vae, images))
    log = train_autoencoder(vae, images, cfg(steps=40), g)
    after = reconstruction_metrics(images, reconstruct(vae, images))
    assert after["mae"] < before["mae"] and log[-1]["loss"] < log[0]["loss"]
    assert vae.encode(images).latent_dist.mean.shape == (8, 4, 8, 8)  # factor 2 per extra level
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, images, g))
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config.scaling_factor == vae.config.scaling_factor != 0.18215
    assert torch.allclose(reconstruct(loaded, images), reconstruct(vae, images), atol=1e-6)


def test_l2_ssim_loss_and_resume_match_an_uninterrupted_run(tmp_path):
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    settings = dict(recon_loss="l1+l2", ssim_weight=0.5, checkpoint_every=5)
    full = tiny_vae()
    log_full = train_autoencoder(full, images, cfg(steps=12, **settings), torch.Generator().manual_seed(1))
    part = tiny_vae()  # a run "killed" after step 10: its steps stop there, its checkpoint stays
    train_autoencoder(part, images, cfg(steps=10, **settings), torch.Generator().manual_seed(1),
                      checkpoint_dir=tmp_path, fingerprint="f")
    resumed = tiny_vae()
    log = train_autoencoder(resumed, images, cfg(steps=12, **settings), torch.Generator().manual_seed(99),
                            checkpoint_dir=tmp_path, fingerprint="f")
    assert [r["step"] for r in log] == list(range(12)) and log[-1]["loss"] == log_full[-1]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
