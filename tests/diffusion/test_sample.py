import torch
from diffusers import DDIMScheduler

from synthmed.diffusion.sample import decode_to_uint8, sample_latents, seeded_generators
from synthmed.diffusion.schedulers import make_noise_scheduler
from tests.helpers import tiny_unet, tiny_vae


def run(unet, seeds, guidance=3.0, cond=None):
    sched = DDIMScheduler.from_config(make_noise_scheduler(1000).config)
    n = len(seeds)
    g = torch.Generator().manual_seed(1)
    cond = cond if cond is not None else torch.randn(1, 6, 384, generator=g).expand(n, -1, -1)
    mask = torch.ones(n, 6, dtype=torch.long)
    return sample_latents(unet, sched, cond, mask, torch.zeros(1, 6, 384), torch.ones(1, 6, dtype=torch.long),
                          seeded_generators(seeds), num_inference_steps=5, guidance_scale=guidance)


def test_each_image_is_reproducible_from_its_own_seed():
    unet = tiny_unet().eval()
    a = run(unet, [11, 12, 13])
    assert torch.allclose(run(unet, [12])[0], a[1], atol=1e-5)  # alone or in a batch: same image
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(run(unet, [11], guidance=1.0)[0], a[0])  # guidance changes the sample


def test_decode_gives_uint8_images():
    vae = tiny_vae().eval()
    images = decode_to_uint8(vae, torch.randn(2, 4, 8, 8))
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 16, 16)
