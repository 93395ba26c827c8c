"""The saved generator is one diffusers pipeline folder that loads offline in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from diffusers import DDIMScheduler

from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.train import make_noise_scheduler
from tests.conftest import REPO_ROOT
from tests.diffusion.test_train import tiny_unet
from tests.models.test_autoencoder import tiny_vae

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
