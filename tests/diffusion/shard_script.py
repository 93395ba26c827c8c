"""Run by test_generation.py in a subprocess: sharded writing of 10 images, slowly.

argv: out_dir. Prints "rendered <i>" per image so the test can kill it mid-run.
"""

import sys
import time

import numpy as np
import pandas as pd

from synthmed.diffusion.shards import write_shards


def render(rows):
    for seed in rows["seed"]:
        print(f"rendered {seed}", flush=True)
        time.sleep(0.05)
        yield np.random.default_rng(int(seed)).integers(0, 256, (8, 8), dtype=np.uint8)


if __name__ == "__main__":
    plan = pd.DataFrame({"image_index": range(10), "text": [f"p{i}" for i in range(10)], "seed": range(100, 110)})
    meta, stats = write_shards(plan, sys.argv[1], 3, "fp-1", render)
    meta.to_csv(f"{sys.argv[1]}.csv", index=False)
    print("stats", stats["rendered"], stats["resumed"], flush=True)
