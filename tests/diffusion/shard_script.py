"""Run by test_generation.py in a subprocess: sharded writing of 10 images, slowly.

argv: out_dir [--shard i/N] [--csv path] [--go path] [--delay s]. Prints "rendered <seed>" per image so the
test can kill it mid-run or count who rendered what; with --go it says "ready" and waits for that file, so that
several workers start together.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from synthmed.diffusion.shards import parse_shard, write_shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shard", default="1/1")
    ap.add_argument("--csv")
    ap.add_argument("--go")
    ap.add_argument("--delay", type=float, default=0.05)
    args = ap.parse_args()

    def render(rows):
        for seed in rows["seed"]:
            print(f"rendered {seed}", flush=True)
            time.sleep(args.delay)
            yield np.random.default_rng(int(seed)).integers(0, 256, (8, 8), dtype=np.uint8)

    if args.go:
        print("ready", flush=True)
        while not Path(args.go).exists():
            time.sleep(0.01)
    plan = pd.DataFrame({"image_index": range(10), "text": [f"p{i}" for i in range(10)], "seed": range(100, 110)})
    meta, stats = write_shards(plan, args.out, 3, "fp-1", render, parse_shard(args.shard))
    meta.to_csv(args.csv or f"{args.out}.csv", index=False)
    print("stats", stats["rendered"], stats["resumed"], flush=True)


if __name__ == "__main__":
    main()
