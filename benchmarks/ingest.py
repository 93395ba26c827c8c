"""Ingest throughput on an ImageCLEF-sized synthetic dataset; prints JSON.

2,000 JPEGs of 512 px with ten prompts each (20,000 rows of prompt-gt.csv),
ingested by the real stage at 256 px RGB. Target: the whole stage < 60 s on 2 cores.

    .venv/bin/python benchmarks/ingest.py [--images 2000] [--size 512] [--resolution 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_dataset(root: Path, n_images: int, size: int, prompts_per_image: int) -> None:
    """Smooth images with a random bright ellipse (JPEG-friendly, like endoscopy frames)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = ["Filename;Prompt"]
    for i in range(n_images):
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.2)]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(float)
        img = np.stack([0.6 * xx + 0.3 * blob, 0.3 * yy + 0.5 * blob, 0.2 + 0.2 * blob], -1)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / "images" / f"img{i:05d}.jpg", quality=90)
        side = "upper" if cy < 0.5 else "lower"
        rows += [f"img{i:05d};generate an image with a polyp in the {side} part, variant {k}"
                 for k in range(prompts_per_image)]
    (root / "prompt-gt.csv").write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synthmed-bench-"))
    try:
        t0 = time.perf_counter()
        make_dataset(work / "clef", args.images, args.size, args.prompts)
        make_s = time.perf_counter() - t0
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["ingest"].update(source="imageclef", path=str(work / "clef"), resolution=args.resolution,
                                channels=3, min_images=1)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stages.ingest"], cwd=work, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        metrics = json.loads((work / "metrics/all/ingest.json").read_text())
        print(json.dumps({
            "benchmark": "ingest_imageclef",
            "images": metrics["images"], "pairs": metrics["pairs"], "input_px": args.size,
            "output_px": args.resolution, "cores": os.cpu_count(),
            "dataset_creation_s": round(make_s, 1), "ingest_s": round(seconds, 1),
            "images_per_s": round(metrics["images"] / seconds, 1), "target_s": 60,
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
