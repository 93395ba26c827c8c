"""Data-parallel training on the CPU, as a GPU worker with several GPUs runs it: a training stage started with
SYNTHMED_PROCESSES=2 restarts itself as two gloo processes (synthmed.core.runtime.launch_ranks). Against one process
at the same global batch: the same weights within float tolerance (the gradients are all-reduced sums in
another order), each step's batch split between the ranks, one writer, and a killed 2-process run that resumes
to the uninterrupted result; the latent and caption caches are encoded a share per process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
RECORDER = REPO_ROOT / "tests/e2e/read_recorder"
WEIGHTS = {"train_vae": "data/train_vae/vae/diffusion_pytorch_model.safetensors",
           "train_ldm": "data/train_ldm/model/unet/diffusion_pytorch_model.safetensors"}


def start(repo: Path, stage: str, processes: int, rows: Path) -> subprocess.Popen:
    env = {**os.environ, "SYNTHMED_PROCESSES": str(processes), "PYTHONPATH": str(RECORDER),
           "SYNTHMED_READ_ROWS": str(rows)}
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def train(repo: Path, stage: str, processes: int, rows: Path) -> tuple[dict, str]:
    proc = start(repo, stage, processes, rows)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return load_file(repo / WEIGHTS[stage]), out


def reads(rows: Path) -> dict[int, list]:
    """rank -> the (file, rows) it read from DiskArrays, in order."""
    return {entry["rank"]: entry["reads"] for entry in map(json.loads, rows.read_text().splitlines())}


def relative_difference(a: dict, b: dict) -> float:
    """|a - b| / |b| over all weights (Adam turns rounding-level gradient differences on near-zero coordinates
    into whole steps, so single coordinates can differ by a learning rate; the model as a whole may not)."""
    assert a.keys() == b.keys()
    diff = sum((a[k].double() - b[k].double()).pow(2).sum() for k in a) ** 0.5
    return (diff / sum(b[k].double().pow(2).sum() for k in b) ** 0.5).item()


@pytest.mark.parametrize("stage", ["train_vae", "train_ldm"])
def test_two_processes_train_as_one(copy_of, tmp_path: Path, stage: str):
    repo = copy_of()
    shutil.rmtree(repo / ".synthmed/runs", ignore_errors=True)  # nothing to resume: both runs train from step 0
    if stage == "train_ldm":  # dropout masks come from each process's own RNG, not the shared generator
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["train_ldm"]["unet"]["dropout"] = 0.0
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    one, _ = train(repo, stage, 1, tmp_path / "one.jsonl")
    losses_one = pd.read_csv(repo / f"data/{stage}/loss.csv")["loss"]
    (repo / "metrics" / f"{stage}.json").unlink()
    two, log = train(repo, stage, 2, tmp_path / "two.jsonl")
    assert "data-parallel over 2 processes (CPU, gloo)" in log and log.count(f"{stage}: finished") == 1, log
    losses_two = pd.read_csv(repo / f"data/{stage}/loss.csv")["loss"]
    # the first step: the same weights on the same global batch, its loss the mean of the two halves'
    assert losses_two[0] == pytest.approx(losses_one[0], rel=1e-5)
    assert np.allclose(losses_two, losses_one, rtol=0.02)  # then the runs drift apart by rounding only
    difference = relative_difference(two, one)
    print(f"{stage}: weights differ by {difference:.2e} (relative L2); losses by at most "
          f"{(losses_two / losses_one - 1).abs().max():.2e} (relative)")
    assert difference < 0.01
    assert (repo / "metrics" / f"{stage}.json").is_file()  # written once, by rank 0
    single, ranks = reads(tmp_path / "one.jsonl")[0], reads(tmp_path / "two.jsonl")
    assert sorted(ranks) == [0, 1]
    pixels = {rank: [rows for name, rows in r if name.endswith(".u8")] for rank, r in ranks.items()}
    if stage == "train_vae":  # each step's global batch, split in two halves: rank 0 the first, rank 1 the second
        train_file = single[0][0]  # the first read is the first step's
        single = [rows for name, rows in single if name == train_file]
        steps = len(pixels[1])
        assert steps >= 30 and all(len(r) == len(s) // 2 for r, s in zip(pixels[1], single))
        assert [a + b for a, b in zip(pixels[0][:steps], pixels[1])] == single[:steps]
    else:  # each process encodes its own share of the images into the run's latent cache, then reads the whole
        shares = [{(name, row) for name, rows in ranks[r] if name.endswith(".u8") for row in rows} for r in (0, 1)]
        assert shares[0] and shares[1] and not shares[0] & shares[1]
        assert shares[0] | shares[1] == {(name, row) for name, rows in single if name.endswith(".u8") for row in rows}
        assert any(name == "mean.f32" for name, _ in ranks[1])
        assert not list((repo / ".synthmed/runs/train_ldm").rglob("*.part*"))  # the shares, joined and removed


def test_a_killed_two_process_run_resumes_to_the_same_weights(copy_of, tmp_path: Path):
    repo = copy_of()
    shutil.rmtree(repo / ".synthmed/runs", ignore_errors=True)
    whole, _ = train(repo, "train_vae", 2, tmp_path / "whole.jsonl")
    proc = start(repo, "train_vae", 2, tmp_path / "killed.jsonl")
    checkpoints = repo / ".synthmed/runs/train_vae"
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("*/checkpoints/step*")):  # the first checkpoint (step 10 of 30)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    resumed, log = train(repo, "train_vae", 2, tmp_path / "resumed.jsonl")
    assert "resuming from step" in log, log
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
