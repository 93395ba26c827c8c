"""How wall time and peak memory of every stage grow with the dataset; prints JSON and a table.

For each size N it makes its own labelled ImageFolder (N images, ``--captions`` captions each, two classes),
runs every stage as `python -m stages.<name>` in a scratch directory, one after the other, training cut to
a few steps so that only the data path is measured, and records each stage's wall time and peak RSS (the
child's own, from wait4). `generate` renders a fixed 64-prompt plan (its memory does not depend on N);
`evaluate` and `evaluate_vlp` then score a stand-in synthetic set as large as the real one (a copy of the
ingested images), as a real run's full plan would give them. The last lines give, per stage, the log-log
slope of time and of memory between the two largest N (1 = linear). With ``--profile`` the stages build that
profile's models (training still cut to a few steps); on a GPU host each stage's peak GPU memory is recorded
too (benchmarks/gpu_peak; benchmarks/gpu_check.sh).

    .venv/bin/python benchmarks/scale.py [--sizes 500 2000 8000] [--resolution 64] [--channels 1] [--captions 10]
        [--profile profiles/gpu-256.yaml]
    .venv/bin/python benchmarks/scale.py --memorization 20000 1400   # the search alone, on random rows
"""

from __future__ import annotations

import argparse
import json
import math
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

from synthmed.core.stage import stage_names

REPO = Path(__file__).resolve().parent.parent
STAGES = stage_names(REPO / "dvc.yaml")
CUT = {"steps": 3, "checkpoint_every": 0}


def make_dataset(root: Path, n: int, size: int, channels: int, captions: int) -> None:
    """A bright disc in the upper or lower half (the label) on a textured background, with ``captions`` captions
    (also the large generated set of tests/e2e/test_scale.py)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = ["file_name,text,label"]
    for i in range(n):
        upper = i % 2 == 0
        cy, cx, r = rng.uniform(0.15, 0.45) + (0 if upper else 0.4), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(float)
        grey = 0.2 + 0.3 * xx + 0.5 * disc + rng.normal(0, 0.03, (size, size))  # texture: no two images alike
        img = grey if channels == 1 else np.stack([grey, 0.8 * grey + 0.1 * yy, 0.5 * grey], -1)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / f"img{i:06d}.png")
        where = "upper" if upper else "lower"
        rows += [f"img{i:06d}.png,a lesion in the {where} half of the image seen at {cx:.2f} (view {k}),{where}"
                 for k in range(captions)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def params_for(data: Path, resolution: int, channels: int, base: dict | None = None) -> dict:
    """``base`` (default: params.yaml) on ``data`` with training cut to a few steps and the smallest studies."""
    p = base or yaml.safe_load((REPO / "params.yaml").read_text())
    p["ingest"].update(source="imagefolder", path=str(data), resolution=resolution, channels=channels, min_images=1,
                       image_level_splits=True)  # generated images share looks across splits, no patients
    p["train_vae"].update(CUT)
    p["train_ldm"].update(CUT, validate_every=3)
    p["prompts"].update(source="file", file=str(data.parent / "plan.txt"))
    p["evaluate"]["classifier"].update(steps=3, val_every=0)
    p["evaluate"]["augmentation"].update(fractions=[1.0], seeds=1)
    p["evaluate_vlp"].update(steps=3, seeds=1)
    return p


def run(work: Path, stage: str) -> dict:
    """The stage's wall time and peak RSS; on a GPU host also its peak GPU memory (benchmarks/gpu_peak)."""
    t0 = time.perf_counter()
    peak = work / f"{stage}.gpu.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'benchmarks/gpu_peak'}", "SYNTHMED_GPU_PEAK": str(peak)}
    with open(work / f"{stage}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=work, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{stage} failed:\n{(work / f'{stage}.log').read_text()[-3000:]}")
    out = {"s": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}  # ru_maxrss is in KiB
    if peak.is_file():  # one line per process that used CUDA (one per rank when data-parallel)
        out["peak_gpu_gb"] = max(json.loads(line)["peak_allocated_gb"] for line in peak.read_text().splitlines())
    return out


def stand_in_synthetic(work: Path) -> None:
    """evaluate at full-plan size: the ingested images as if generated (every split's captions)."""
    synth = work / "data/generate/dataset"
    shutil.rmtree(synth, ignore_errors=True)  # generate's output, when it ran
    shutil.copytree(work / "data/ingest/dataset", synth)


def measure(n: int, args, root: Path) -> dict:
    work = root / f"n{n}"
    make_dataset(work / "raw", n, args.size, args.channels, args.captions)
    (work / "plan.txt").write_text("\n".join(f"a lesion in the {'upper' if k % 2 else 'lower'} half, plan {k}"
                                             for k in range(64)) + "\n")
    shutil.copytree(REPO / "prompts", work / "prompts")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    if args.profile:  # e.g. profiles/gpu-256.yaml: its models and batches, training still cut to a few steps
        from synthmed.profiles import merged, read_overlay

        base = merged(base, read_overlay(args.profile), args.profile)
    (work / "params.yaml").write_text(yaml.safe_dump(params_for(work / "raw", args.resolution, args.channels, base)))
    out = {}
    for stage in args.stages:
        if stage == "evaluate":
            stand_in_synthetic(work)
        out[stage] = run(work, stage)
        print(f"N={n} {stage}: {out[stage]}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return out


def memorization_search(n_synth: int, n_train: int) -> dict:
    """Wall time and peak RSS growth of the memorization search alone (synthmed.metrics.privacy.nearest), on
    random rows: feature space (EfficientNet-Lite0's 1,280 dimensions) and pixel space at 64 px RGB."""
    import resource

    import torch

    from synthmed.metrics.privacy import PixelSpace, nearest

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    out = {"n_synthetic": n_synth, "n_train": n_train}
    spaces = {"feature": lambda n: torch.randn(n, 1280, generator=g),
              "pixel_64px_rgb": lambda n: PixelSpace(torch.randint(0, 256, (n, 3, 64, 64), generator=g,
                                                                    dtype=torch.uint8))}
    for name, make in spaces.items():
        synth, train = make(n_synth), make(n_train)
        t0 = time.perf_counter()
        nearest(synth, train)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return out


def slope(a: float, b: float, n_a: int, n_b: int) -> float | None:
    return round(math.log(b / a) / math.log(n_b / n_a), 2) if a > 0 and b > 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--size", type=int, default=0, help="side of the generated images (default: the resolution)")
    ap.add_argument("--channels", type=int, default=1, choices=[1, 3])
    ap.add_argument("--captions", type=int, default=10)
    ap.add_argument("--stages", nargs="+", default=STAGES)
    ap.add_argument("--profile", default="", help="a params overlay to start from, e.g. profiles/gpu-256.yaml")
    ap.add_argument("--memorization", type=int, nargs=2, metavar=("N_SYNTH", "N_TRAIN"),
                    help="time only the memorization search at these sizes (e.g. 20000 1400)")
    args = ap.parse_args()
    if args.memorization:
        print(json.dumps({"benchmark": "scale.memorization", "cores": os.cpu_count(),
                          **memorization_search(*args.memorization)}, indent=2))
        return
    args.size = args.size or args.resolution
    root = Path(tempfile.mkdtemp(prefix="synthmed-scale-"))
    try:
        results = {n: measure(n, args, root) for n in args.sizes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    a, b = sorted(results)[-2:] if len(results) > 1 else (None, None)
    report = {"benchmark": "scale", "cores": os.cpu_count(), "resolution": args.resolution, "channels": args.channels,
              "captions_per_image": args.captions, "training_steps": CUT["steps"], "by_size": results}
    if a is not None:
        report["slopes"] = {s: {"time": slope(results[a][s]["s"], results[b][s]["s"], a, b),
                                "peak_rss": slope(results[a][s]["peak_rss_gb"], results[b][s]["peak_rss_gb"], a, b),
                                "peak_rss_ratio": round(results[b][s]["peak_rss_gb"] / results[a][s]["peak_rss_gb"], 2)}
                            for s in args.stages}
    print(json.dumps(report, indent=2))
    print("\n| stage | " + " | ".join(f"N={n} s / GB" for n in results) + " | slope time | RSS ratio |")
    print("|---" * (len(results) + 3) + "|")
    for s in args.stages:
        cells = " | ".join(f"{results[n][s]['s']} / {results[n][s]['peak_rss_gb']}" for n in results)
        sl = report.get("slopes", {}).get(s, {})
        print(f"| {s} | {cells} | {sl.get('time', '')} | {sl.get('peak_rss_ratio', '')} |")


if __name__ == "__main__":
    main()
