"""Regenerate one image of a generated dataset from its metadata row, alone.

    python -m synthmed.diffusion.regenerate synth_000012.png [--dataset data/generate/dataset]
        [--model data/train_lora/model] [--out regenerated.png] [--real data/ingest/dataset]

The seed, prompt, sampler, steps and guidance come from the row; the exit code is 0
when the regenerated pixels equal the stored image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from synthmed.data.imagefolder import read_metadata
from synthmed.diffusion.image_sources import SourceEmbeddings
from synthmed.diffusion.schedulers import make_sampler
from synthmed.core.io import sha256_tree
from synthmed.diffusion.shards import save_image
from synthmed.viz import load_png, to_array


def regenerate(pipe, row: pd.Series, real: str = "data/ingest/dataset") -> np.ndarray:
    """The image of one metadata row (HW or HWC uint8), generated on its own; an image-conditioned model's
    from the embedding of its source image(s) in ``real``."""
    pipe.scheduler = make_sampler(row["scheduler"], pipe.scheduler.config)
    if getattr(pipe, "image_conditioned", False):
        rows = row.to_frame().T.reset_index(drop=True)
        condition = SourceEmbeddings(pipe, rows, real, row.get("interpolation") or "slerp", "metadata.csv")(rows)
    else:
        condition = [row["text"]]
    _, images = next(pipe.generate_batches(condition, [int(row["seed"])], batch_size=1,
                                           num_inference_steps=int(row["num_inference_steps"]),
                                           guidance_scale=float(row["guidance_scale"])))
    return to_array(images[0])


def find_row(meta: pd.DataFrame, name: str) -> pd.Series:
    hit = meta[(meta["file_name"] == name) | (meta["file_name"].str.split("/").str[-1] == name)]
    if hit.empty:
        raise SystemExit(f"error: {name} is not in metadata.csv; give a file_name from it")
    return hit.iloc[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file_name")
    ap.add_argument("--dataset", default="data/generate/dataset")
    ap.add_argument("--model", default="data/train_lora/model")  # what generate sampled
    ap.add_argument("--out", default="")
    ap.add_argument("--real", default="data/ingest/dataset")  # an image-conditioned model's source images
    args = ap.parse_args(argv)
    if Path("params.yaml").is_file():  # the thread count and kernels of the run that made the image
        from synthmed.core.config import apply_cpu_params

        apply_cpu_params()
    from synthmed.diffusion.generators import load_generator
    from synthmed.core.runtime import pick_device

    row = find_row(read_metadata(args.dataset), args.file_name)
    if sha256_tree(args.model) != row["model_sha256"]:
        print(f"warning: {args.model} is not the model that made this image (model_sha256 differs)", file=sys.stderr)
    pipe = load_generator(args.model, pick_device())
    image = regenerate(pipe, row, args.real)
    out = Path(args.out or f"regenerated_{Path(row['file_name']).name}")
    out = out.with_name(save_image(image, out.with_suffix("")))  # PNG, or .npy for a volume
    stored = load_png(Path(args.dataset) / row["file_name"])
    same = stored.shape == image.shape and np.array_equal(stored, image)
    diff = "identical" if same else f"differs in {int((stored != image).sum())} pixel values"
    print(f"{row['file_name']} (seed {row['seed']}, {row['scheduler']}, {row['num_inference_steps']} steps) "
          f"-> {out}: {diff}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
