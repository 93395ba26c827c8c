"""Pixel-space diffusion: `train_vae.pretrained: pixels` puts the identity where the VAE stands."""

from __future__ import annotations

import subprocess
import sys

import torch

from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.sample import pack_latents
from synthmed.diffusion.schedulers import default_sampler, make_noise_scheduler
from synthmed.models.autoencoder import encode_posterior, load_autoencoder, validate
from synthmed.models.pixel_space import PixelSpace
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_unet


def test_pixel_space_encodes_the_images_themselves_and_loads_as_an_autoencoder(tmp_path):
    images = (torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    space = PixelSpace(in_channels=1, sample_size=16)
    mean, std = encode_posterior(space, images)
    assert torch.allclose(mean, images.float() / 127.5 - 1, atol=1e-6) and float(std.max()) < 1e-6
    metrics, recon = validate(space, images, [0, 3])
    assert metrics["psnr"] >= 99 and metrics["ssim"] > 0.999 and recon.shape == (2, 1, 16, 16)
    space.register_to_config(scaling_factor=2.0)
    space.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(tmp_path / "vae")
    assert isinstance(loaded, PixelSpace) and loaded.config.scaling_factor == 2.0
    assert loaded.config.latent_channels == 1 and loaded.config.block_out_channels == [1]  # factor 1


def test_a_pixel_space_pipeline_samples_packed_pixels_and_reloads(tmp_path):
    """16 px greyscale images packed 2x2 are the tiny UNet's 8x8x4 grid; the saved folder loads offline."""
    pipe = SynthMedPipeline(tiny_unet(), PixelSpace(in_channels=1, sample_size=16),
                            default_sampler(make_noise_scheduler(1000)), text_max_length=8)
    pipe.set_progress_bar_config(disable=True)
    assert pack_latents(torch.zeros(1, 1, 16, 16), 2).shape == (1, 4, 8, 8)
    images = pipe.generate(["a slice", "another slice"], [1, 2], num_inference_steps=3)
    assert images.shape == (2, 1, 16, 16) and images.dtype.name == "uint8"
    pipe.save_pretrained(tmp_path / "model")
    # a fresh interpreter that imports only the pipeline (as the generate stage does) loads it
    load = ("import sys; from synthmed.diffusion.pipeline import SynthMedPipeline as P; "
            "print(type(P.from_pretrained(sys.argv[1]).vae).__name__)")
    proc = subprocess.run([sys.executable, "-c", load, str(tmp_path / "model")], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert proc.stdout.strip() == "PixelSpace", proc.stderr[-2000:]
    again = SynthMedPipeline.from_pretrained(tmp_path / "model")
    assert isinstance(again.vae, PixelSpace)
    assert (again.generate(["another slice"], [2], num_inference_steps=3) == images[1:]).all()
