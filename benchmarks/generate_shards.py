"""Sharded generation against a single run, in one run of this script; prints JSON.

Times `python -m stages.generate` alone, then N workers (`--shard i/N`, started together) plus the merge
(a plain run that finds every shard finished), on the workspace's trained model and plan, and checks
that both wrote the same dataset. Each stage process uses `cpu.threads` threads, so on a machine with
fewer cores than N x threads the workers compete for them.

Needs `dvc repro prompts train_lora` first (the model and the plan); leaves data/generate as it was.

    .venv/bin/python benchmarks/generate_shards.py [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from synthmed.core.io import sha256_tree  # noqa: E402


def stage(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "stages.generate", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait(*procs: subprocess.Popen) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"generate failed ({p.returncode}):\n{err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    dataset = REPO / "data/generate/dataset"

    tick = time.perf_counter()
    wait(stage())
    single_s = time.perf_counter() - tick
    single = sha256_tree(dataset)

    tick = time.perf_counter()
    wait(*[stage("--shard", f"{i}/{args.workers}") for i in range(1, args.workers + 1)])
    workers_s = time.perf_counter() - tick
    wait(stage())
    total_s = time.perf_counter() - tick
    print(json.dumps({
        "images": sum(1 for _ in dataset.rglob("*.png")),
        "workers": args.workers,
        "cpu_cores": os.cpu_count(),
        "single_s": round(single_s, 1),
        "sharded_workers_s": round(workers_s, 1),
        "sharded_with_merge_s": round(total_s, 1),
        "speedup": round(single_s / total_s, 2),
        "same_dataset": sha256_tree(dataset) == single,
    }, indent=2))


if __name__ == "__main__":
    main()
