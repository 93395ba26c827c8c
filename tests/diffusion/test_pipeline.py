"""The saved generator is one diffusers pipeline folder that loads offline in a fresh process, and is
called as a diffusers pipeline: `pipe(prompt, generator=..., output_type=...).images`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils import BaseOutput
from PIL import Image

from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.schedulers import make_sampler
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.text.encoder import TextEncoder
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_unet, tiny_vae

LOAD_AND_GENERATE = """
import sys, numpy as np
from synthmed.diffusion.pipeline import SynthMedPipeline
pipe = SynthMedPipeline.from_pretrained(sys.argv[1])
np.save(sys.argv[2], pipe.generate(["axial slice at z = +10 mm", "coronal slice"], [5, 6], num_inference_steps=4))
"""


def test_pipeline_folder_loads_in_a_fresh_process_and_generates(tmp_path):
    sched = DDIMScheduler.from_config(make_noise_scheduler(1000).config)
    pipe = SynthMedPipeline(tiny_unet(), tiny_vae().eval(), sched, text_max_length=8)
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model/model_index.json").is_file() and (tmp_path / "model/vae/config.json").is_file()
    here = pipe.generate(["axial slice at z = +10 mm", "coronal slice"], [5, 6], num_inference_steps=4)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(tmp_path / "model"), str(tmp_path / "x.npy")],
                          cwd=REPO_ROOT, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    there = np.load(tmp_path / "x.npy")
    assert there.shape == (2, 1, 16, 16) and there.dtype == np.uint8
    assert np.array_equal(here, there)  # same seeds, same pixels, whichever process


# --- the diffusers call interface and the seed-per-image batches share one sampling loop ---

PROMPTS = ["axial slice at z = +10 mm", "coronal slice", "left sagittal slice"]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(max_length=8)


@pytest.fixture
def pipe(encoder):
    sched = DDIMScheduler.from_config(make_noise_scheduler(1000).config)
    p = SynthMedPipeline(tiny_unet(), tiny_vae().eval(), sched, text_max_length=8).use_text_encoder(encoder)
    p.set_progress_bar_config(disable=True)
    return p


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # ddpm: fresh noise every step from the generator
def test_call_gives_the_image_generate_batches_gives_for_that_seed(pipe, sampler):
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    seeds = [11, 12, 13]
    batch = pipe.generate(PROMPTS, seeds, num_inference_steps=4, batch_size=3)
    for prompt, seed, expected in zip(PROMPTS, seeds, batch):
        out = pipe(prompt, num_inference_steps=4, generator=seeded(seed), output_type="np")
        assert isinstance(out, BaseOutput) and out.images.shape == (1, 16, 16, 1)
        assert out.images.dtype == np.float32 and 0 <= out.images.min() and out.images.max() <= 1
        # uint8 is the same float image rounded to 1/255
        assert np.abs(out.images[0].transpose(2, 0, 1) * 255 - expected).max() <= 0.5 + 1e-3


def test_the_image_of_a_generator_does_not_depend_on_the_batch(pipe):
    three = pipe(PROMPTS, num_inference_steps=4, generator=[seeded(1), seeded(2), seeded(3)], output_type="np").images
    alone = pipe(PROMPTS[1], num_inference_steps=4, generator=seeded(2), output_type="np").images
    other = pipe([PROMPTS[1], PROMPTS[0]], num_inference_steps=4, generator=[seeded(2), seeded(9)],
                 output_type="np").images
    assert np.allclose(three[1], alone[0], atol=1e-5) and np.allclose(other[0], alone[0], atol=1e-5)
    assert not np.allclose(three[0], three[1], atol=1e-3)
    by_batches = pipe.generate(PROMPTS, [1, 2, 3], num_inference_steps=4, batch_size=2)  # batches of 2 and 1
    assert np.array_equal(by_batches, pipe.generate(PROMPTS, [1, 2, 3], num_inference_steps=4, batch_size=3))


def test_output_types_images_per_prompt_and_generators(pipe):
    pil = pipe(PROMPTS[:2], num_inference_steps=2, num_images_per_prompt=2,
               generator=[seeded(s) for s in range(4)]).images
    assert len(pil) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in pil)
    pt = pipe(PROMPTS[:2], num_inference_steps=2, num_images_per_prompt=2, generator=[seeded(s) for s in range(4)],
              output_type="pt").images
    assert pt.shape == (4, 1, 16, 16)
    assert np.abs(np.asarray(pil[3], dtype=float) - pt[3, 0].numpy() * 255).max() <= 0.5 + 1e-3
    (latents,) = pipe(PROMPTS[0], num_inference_steps=2, generator=seeded(0), output_type="latent", return_dict=False)
    assert latents.shape == (1, 4, 8, 8)
    # one generator for several images: they draw from it in turn, so they differ and repeat as a whole
    one = pipe(PROMPTS[0], num_images_per_prompt=2, num_inference_steps=2, generator=seeded(5), output_type="np")
    again = pipe(PROMPTS[0], num_images_per_prompt=2, num_inference_steps=2, generator=seeded(5), output_type="np")
    assert np.array_equal(one.images, again.images) and not np.allclose(one.images[0], one.images[1], atol=1e-3)
    torch.manual_seed(3)  # no generator: reproducible under torch's global seed
    a = pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images
    torch.manual_seed(3)
    assert np.array_equal(a, pipe(PROMPTS[0], num_inference_steps=2, output_type="np").images)
    with pytest.raises(ValueError, match="3 generators for 4 images"):
        pipe(PROMPTS[:2], num_images_per_prompt=2, generator=[seeded(s) for s in range(3)])
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS[0], output_type="tensor")


def test_negative_prompt_replaces_the_empty_conditioning(pipe):
    def image(**kw):
        return pipe(PROMPTS[0], num_inference_steps=3, generator=seeded(4), output_type="np", **kw).images[0]

    assert np.allclose(image(), image(negative_prompt=""), atol=1e-6)  # the default is the empty caption
    assert not np.allclose(image(), image(negative_prompt="coronal slice"), atol=1e-4)
    two = pipe(PROMPTS[:2], negative_prompt=["coronal slice", ""], num_inference_steps=3,
               generator=[seeded(4), seeded(6)], output_type="np").images
    assert np.allclose(two[0], image(negative_prompt="coronal slice"), atol=1e-5)


def test_call_round_trips_through_save_and_from_pretrained(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = SynthMedPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="np")
    assert np.array_equal(pipe(PROMPTS[0], generator=seeded(8), **kw).images,
                          loaded(PROMPTS[0], generator=seeded(8), **kw).images)
