"""Faults as a user meets them, under `dvc repro`: a stage killed (SIGKILL, the launcher and its children) at a
point where it has paid for work, then run again, writes the bytes an uninterrupted run wrote; a disk that refuses
a write mid-stage gives one line naming the path and leaves nothing half-written."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import dvc
from tests.e2e.test_pipeline import lock_hashes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# Where each stage keeps what a killed run has paid for (the local store), and what its rerun says on finding it.
PAID = {
    "train_vae": (".synthmed/runs/train_vae/*/checkpoints/step*.pt", "resuming from step"),
    "train_ldm": (".synthmed/runs/train_ldm/*/checkpoints/step*.pt", "resuming from step"),
    "generate": (".synthmed/runs/generate/*/shards/*/shard.csv", " from finished shards"),
    "evaluate": (".synthmed/cache/features/*.pt", None),  # a feature cache: read, not recomputed
}


def start(repo: Path, *args: str, log: Path, **popen) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: DVC's children would hold a pipe open
        return subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)


def kill_once_paid(repo: Path, stage: str, log: Path) -> None:
    """Start `dvc repro --force` of ``stage`` and SIGKILL it (DVC, the stage and its children) once it has paid."""
    proc = start(repo, "repro", "--force", "--single-item", stage, log=log)
    deadline = time.monotonic() + 300
    while not list(repo.glob(PAID[stage][0])):
        assert proc.poll() is None and time.monotonic() < deadline, f"ended before the kill:\n{log.read_text()}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"ended before the kill:\n{log.read_text()}"


def rerun_gives_the_same_bytes(repo: Path, stage: str, before: dict) -> None:
    again = dvc(repo, "repro", "--force", "--single-item", stage)  # --force: not DVC's run cache
    assert lock_hashes(repo, stage) == before, again.stdout
    resumed = PAID[stage][1]
    if resumed:
        assert resumed in again.stdout and " 0 from finished shards" not in again.stdout, again.stdout
    assert not list(repo.rglob(".*.tmp")), "a temporary file outlived the runs"


@pytest.mark.parametrize("stage", [s for s in PAID if s != "train_vae"])  # train_vae: the test below
def test_a_stage_killed_under_dvc_repro_reruns_to_the_same_bytes(copy_of, tmp_path: Path, stage: str):
    repo = copy_of()
    before = lock_hashes(repo, stage)
    if stage == "evaluate":  # the built DAG's cache would hold every feature already
        shutil.rmtree(repo / ".synthmed/cache/features", ignore_errors=True)
    kill_once_paid(repo, stage, tmp_path / "killed.log")
    rerun_gives_the_same_bytes(repo, stage, before)


def _file_size_limit(limit: int):
    def apply() -> None:  # writes past `limit` bytes fail (EFBIG) as on a full disk, instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_train_vae_killed_then_refused_a_write_reruns_to_the_same_bytes(copy_of, tmp_path: Path):
    repo = copy_of()
    before = lock_hashes(repo, "train_vae")
    kill_once_paid(repo, "train_vae", tmp_path / "killed.log")
    paid = sorted(repo.glob(PAID["train_vae"][0]))
    # The resumed run's next checkpoint (weights and optimiser state: over 256 kB) meets a disk that refuses it;
    # DVC's own files are smaller.
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train_vae"], cwd=repo,
                          capture_output=True, text=True, preexec_fn=_file_size_limit(256 * 1024))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and ".synthmed/runs/train_vae" in errors[0], \
        proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "resuming from step" in proc.stdout
    assert not list(repo.rglob(".*.tmp")) and sorted(repo.glob(PAID["train_vae"][0])) == paid  # nothing half-written
    rerun_gives_the_same_bytes(repo, "train_vae", before)  # room again
