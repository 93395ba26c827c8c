"""A SIGKILLed training run resumes from its last checkpoint and ends byte-identical to an uninterrupted one,
with the default recipe's random paths on (dropout, self-conditioning, augmented views, context dropout)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from synthmed.diffusion.checkpoint import load_latest, save_checkpoint
from tests.conftest import REPO_ROOT
from tests.diffusion import resume_script

SCRIPT = [sys.executable, "-m", "tests.diffusion.resume_script"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("lora",), ("invertible3d",)],
                         ids=["from_scratch", "lora_adapter", "invertible_volumes"])
def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path, capsys, mode):
    # Only the run that is killed needs a process of its own; the uninterrupted and the resumed run go in-process
    # (one torch thread either way, as in every process a test worker starts: tests/conftest.py).
    resume_script.train(str(tmp_path / "ckpt_full"), str(tmp_path / "full.pt"), *mode)

    proc = subprocess.Popen([*SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "resumed.pt"), *mode], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # kill hard right after the second checkpoint lands
        if "checkpoint at step 10" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed.pt").exists()

    capsys.readouterr()
    resume_script.train(str(tmp_path / "ckpt"), str(tmp_path / "resumed.pt"), *mode)
    again = capsys.readouterr().out
    resumed_from = int(again.split("resuming from step ")[1].split()[0])
    assert resumed_from >= 10 and "checkpoint at step 30" in again
    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert [r["step"] for r in b["log"]] == list(range(30))
    assert a["log"] == b["log"]  # losses, learning rates and validation losses, float for float
    assert [r["step"] + 1 for r in b["log"] if "val_loss_ema" in r] == [10, 20, 30]
    for kind in ("weights", "raw"):  # the EMA weights that ship and the training weights
        assert all(torch.equal(a[kind][k], b[kind][k]) for k in a[kind]), kind
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step00000025.pt", "step00000030.pt"]
    kept = load_latest(tmp_path / "ckpt", "run-a")["unet"]  # a LoRA checkpoint holds the adapter, not the base
    assert all("lora_" in k for k in kept) if mode == ("lora",) else len(kept) == len(a["weights"])


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, capsys):
    save_checkpoint(tmp_path / "c", 10, {"fingerprint": "old", "step": 10}, keep=2)
    assert load_latest(tmp_path / "c", "old")["step"] == 10
    assert load_latest(tmp_path / "c", "new") is None and not (tmp_path / "c").exists()
    assert capsys.readouterr().out == f"{tmp_path / 'c'}: checkpoints of another run; starting fresh\n"
