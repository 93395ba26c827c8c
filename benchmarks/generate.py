"""Sampler throughput and quality on the trained demo model; prints JSON.

- images per second of each sampler at an equal image count and step count;
- fd_effnet (vs the real test images) of DPM-Solver++ at 20 steps against DDIM at 50 steps,
  both on the test split's captions with the same seeds.

Needs `dvc repro train_ldm` first.

    .venv/bin/python benchmarks/generate.py [--images 32] [--steps 25]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synthmed.data.dataset import split_images  # noqa: E402
from synthmed.diffusion.pipeline import SynthMedPipeline  # noqa: E402
from synthmed.diffusion.schedulers import SAMPLERS, make_sampler  # noqa: E402
from synthmed.metrics.features import load_effnet_lite0  # noqa: E402
from synthmed.metrics.fidelity import extract_features, frechet_distance  # noqa: E402
from synthmed.core.runtime import pick_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    device = pick_device()
    guidance = yaml.safe_load((REPO / "params.yaml").read_text())["generate"]["guidance_scale"]
    pipe = SynthMedPipeline.from_pretrained(REPO / "data/train_ldm/model").to(device)
    pipe.set_progress_bar_config(disable=True)
    rows, real = split_images(REPO / "data/ingest/dataset", ["test"])
    prompts, seeds = rows["text"].tolist(), list(range(len(rows)))

    def run(name: str, steps: int, n: int):
        pipe.scheduler = make_sampler(name, pipe.scheduler.config)
        start = time.perf_counter()
        images = pipe.generate(prompts[:n], seeds[:n], num_inference_steps=steps, guidance_scale=guidance)
        return images, time.perf_counter() - start

    n = min(args.images, len(prompts))
    run("ddim", 2, 2)  # warm-up
    speed = {name: round(n / run(name, args.steps, n)[1], 2) for name in SAMPLERS}
    extractor = load_effnet_lite0().to(device)
    f_real = extract_features(extractor, real)
    fd = {}
    for name, steps in (("dpmpp", 20), ("ddim", 50)):
        images, seconds = run(name, steps, len(prompts))
        fd[f"{name}_{steps}"] = {"fd_effnet": round(frechet_distance(f_real, extract_features(
            extractor, torch.as_tensor(images))), 2), "seconds": round(seconds, 1)}
    print(json.dumps({"benchmark": "generate", "device": device.type, "threads": torch.get_num_threads(),
                      "images": n, "steps": args.steps, "images_per_s": speed, "test_images": len(prompts),
                      "fd_vs_real_test": fd}, indent=2))


if __name__ == "__main__":
    main()
