"""What the `generate` stage samples: a SynthMedPipeline folder, or a fine-tuned diffusers pipeline
(Stable Diffusion, Kandinsky 2.2 prior + decoder) behind the same batch interface.

`generate_batches(prompts, seeds, ...)` yields uint8 images [B, C, H, W]; image i comes from seeds[i]
alone, whatever its batch. A fine-tuned pretrained pipeline makes RGB images at its own size; the
`data_format.json` that `train_lora` writes beside it says the channels and size of the images it
stands in for, and its outputs are converted to them (luminance, antialiased resize), so that
`evaluate` compares like with like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from synthmed.diffusion.bases import DATA_FORMAT, _class_in, quiet_loading
from synthmed.diffusion.sample import seeded_generators, spatial_dims, unpack_latents
from synthmed.core.errors import PipelineError


FINE_TUNED = ("StableDiffusionPipeline", "KandinskyV22CombinedPipeline")  # what train_lora writes from a pretrained base


class DiffusersGenerator:
    """A diffusers text-to-image pipeline, called the way its users call it, in the stage's batches."""

    def __init__(self, pipe, channels: int, resolution: int, sample_size: int | None = None):
        self.pipe, self.channels, self.resolution = pipe, channels, resolution
        self.size = {"height": sample_size, "width": sample_size} if sample_size else {}  # else the pipeline's own

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, value):
        self.pipe.scheduler = value

    @property
    def device(self):
        return self.pipe.device

    def to_dataset_format(self, images: np.ndarray) -> torch.Tensor:
        """float [B, H, W, 3] in [0, 1] -> uint8 [B, channels, resolution, resolution]."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        if self.channels == 1:  # ITU-R BT.601 luminance, as PIL's "L" conversion
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    @torch.no_grad()
    def generate_batches(self, prompts: list[str], seeds: list[int], num_inference_steps: int = 50,
                         guidance_scale: float = 3.0, batch_size: int = 32) -> Iterator[tuple[int, torch.Tensor]]:
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        for i in range(0, len(prompts), batch_size):
            j = slice(i, i + batch_size)
            out = self.pipe(list(prompts[j]), generator=seeded_generators(seeds[j]),
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="np",
                            **self.size)
            yield i, self.to_dataset_format(out.images)


def load_generator(folder: str | Path, device: torch.device | str = "cpu"):
    """The pipeline in ``folder``, ready for `generate_batches`."""
    folder = Path(folder)
    quiet_loading()
    kind = _class_in(folder)
    if kind == "SynthMedPipeline":
        from synthmed.diffusion.pipeline import SynthMedPipeline

        pipe = SynthMedPipeline.from_pretrained(folder).to(device)
        try:  # the UNet's channels are the VAE's, or packed patches of them (train_ldm.unet.latent_patch)
            unpack_latents(pipe.vae, torch.zeros(1, pipe.unet.config.out_channels, *[1] * spatial_dims(pipe.unet)))
        except ValueError as exc:
            raise PipelineError(f"{folder}: {exc}; retrain it (dvc repro train_ldm)") from None
    elif kind in FINE_TUNED:
        import diffusers

        fmt = folder / DATA_FORMAT
        if not fmt.is_file():
            raise PipelineError(f"{fmt}: missing; a fine-tuned pipeline comes from train_lora, which writes it")
        spec = json.loads(fmt.read_text())
        extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "StableDiffusionPipeline" else {}
        pipe = DiffusersGenerator(getattr(diffusers, kind).from_pretrained(folder, **extra).to(device),
                                  int(spec["channels"]), int(spec["resolution"]), spec.get("sample_size"))
    else:
        raise PipelineError(f"{folder}: not a pipeline generate can sample (model_index.json names "
                            f"{kind or 'nothing: there is none'}); expected SynthMedPipeline, "
                            f"{', '.join(FINE_TUNED)}")
    (pipe.pipe if isinstance(pipe, DiffusersGenerator) else pipe).set_progress_bar_config(disable=True)
    return pipe
