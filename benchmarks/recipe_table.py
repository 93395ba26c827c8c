"""The recipe search's table: one row per finished DVC experiment, from its own committed metrics and logs.

For each experiment name: the overrides against its base commit's params.yaml, each stage's wall time (its
"finished in" line in `dvc queue logs`), and the fidelity, adherence and augmentation figures of
metrics/all/evaluate.json with their 95 % intervals. Prints a Markdown table (or JSON with --json).

A recipe is chosen on the val figures (synthetic images of val captions against the real val images: the
default, `--split val`); the one chosen is then reported on test (`--split test`). An experiment scored before
evaluate wrote val figures shows "—" on val.

    .venv/bin/python benchmarks/recipe_table.py lr1e3 flow vzsnr [--split val|test] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import yaml

FIGURES = ["kid_effnet", "precision", "recall", "fd_effnet_inf", "grid_excess_db"]
CACHE = ".dvc/cache/files/md5"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def exp_ref(name: str) -> str:
    refs = [line.split()[-1] for line in git("for-each-ref", "refs/exps").splitlines()
            if line.endswith(f"/{name}") and "/celery/" not in line]
    if not refs:
        sys.exit(f"error: no finished experiment named {name!r} (dvc exp list -A)")
    return refs[-1]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def overrides(ref: str) -> dict:
    """The params that differ from the base commit's (keys the base lacks: where they differ from today's
    params.yaml, i.e. where they are not the default they were added with)."""
    mine = flat(yaml.safe_load(git("show", f"{ref}:params.yaml")))
    base = flat(yaml.safe_load(git("show", f"{ref}~1:params.yaml")))
    now = flat(yaml.safe_load(open("params.yaml")))
    return {k: v for k, v in mine.items() if base.get(k, now.get(k)) != v}


def stage_seconds(name: str) -> dict[str, float]:
    log = subprocess.run(["dvc", "queue", "logs", name], capture_output=True, text=True).stdout
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+): finished in ([\d.]+) s", log, re.M)}


def cached_images(ref: str, out: str = "data/generate/dataset"):
    """uint8 images [N, C, H, W] of an experiment's output folder, read from the DVC cache."""
    import numpy as np
    import torch
    from PIL import Image

    lock = yaml.safe_load(git("show", f"{ref}:dvc.lock"))
    md5 = next(o["md5"] for st in lock["stages"].values() for o in st.get("outs", []) if o["path"] == out)
    listing = json.load(open(f"{CACHE}/{md5[:2]}/{md5[2:]}"))
    arrays = [np.asarray(Image.open(f"{CACHE}/{e['md5'][:2]}/{e['md5'][2:]}"))
              for e in sorted(listing, key=lambda e: e["relpath"]) if e["relpath"].endswith(".png")]
    x = torch.from_numpy(np.stack(arrays))
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


PREFIX = {"val": "val_", "test": ""}  # evaluate's names for the figures of each split's captions


def row(name: str, split: str = "val") -> dict:
    ref = exp_ref(name)
    ev = json.loads(git("show", f"{ref}:metrics/all/evaluate.json"))
    ldm = json.loads(git("show", f"{ref}:metrics/all/train_ldm.json"))
    out = {"name": name, "overrides": overrides(ref), "seconds": stage_seconds(name),
           "val_loss_ema": ldm.get("val_loss_ema")}
    if "grid_excess_db" not in ev and split == "test":  # scored before the figure existed: measured here on its images
        from synthmed.metrics.grid_artifacts import grid_excess_db, grid_ratios

        value, low, high = grid_excess_db(grid_ratios(cached_images(ref)), 200, 0)
        ev.update(grid_excess_db=value, grid_excess_db_ci_low=low, grid_excess_db_ci_high=high)
    pre = PREFIX[split]
    for k in FIGURES:  # the checkerboard is measured on every synthetic image: the same on both sides
        key = k if k == "grid_excess_db" else pre + k
        out[k] = [ev.get(key), ev.get(f"{key}_ci_low"), ev.get(f"{key}_ci_high")]
    out["adherence"] = [ev.get(pre + k) for k in ("adherence_acc", "adherence_acc_ci_low", "adherence_acc_ci_high")]
    out["adherence"].append(ev.get("adherence_real_test_acc"))
    out["gains"] = {k: v for k, v in ev.items() if k.startswith("aug_gain_") and "synth" not in k}
    return out


def cell(v) -> str:
    if v is None or v[0] is None:
        return "—"
    if v[1] is None:
        return f"{v[0]:.3g}"
    return f"{v[0]:.3g} [{v[1]:.3g}, {v[2]:.3g}]"


def markdown(rows: list[dict], split: str = "val") -> str:
    head = ["name", "overrides", "train_ldm s", f"{split} kid_effnet [95 % CI]", "precision", "recall",
            "fd_effnet_inf", "grid dB", f"{split} adherence (ceiling)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o = " ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "—"
        a, seconds = r["adherence"], r["seconds"].get("train_ldm")
        lines.append("| " + " | ".join([r["name"], o, "(cached)" if seconds is None else f"{seconds:.0f}",
                                        *(cell(r[k]) for k in FIGURES),
                                        "—" if a[0] is None else f"{cell(a[:3])} ({a[3] or float('nan'):.3f})"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+")
    ap.add_argument("--split", choices=sorted(PREFIX), default="val", help="val: to choose a recipe; test: to report it")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [row(n, args.split) for n in args.names]
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
