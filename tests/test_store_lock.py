"""The local store shared by processes: a run's folder is held by one run (a second stops with one line naming the
holder; a SIGKILLed holder frees it), shard workers share theirs, and a run that finds another run's abandoned state
starts afresh with one line naming what changed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from synthmed.core import store
from synthmed.core.errors import PipelineError
from tests.conftest import REPO_ROOT

FP, OTHER = "ab" * 32, "cd" * 32


@pytest.fixture(autouse=True)
def isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ENV, str(tmp_path / "store"))
    monkeypatch.delenv("RANK", raising=False)
    yield
    for fp in (FP, OTHER):
        store.close_run("train", fp)


def hold(tmp_path, shared: bool = False) -> subprocess.Popen:
    """Another process that opens the run's folder and keeps it until killed."""
    code = ("import sys, time; from synthmed.core import store; "
            f"store.open_run('train', {FP!r}, shared={shared}); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, store.ENV: str(tmp_path / "store")})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_stops_with_one_line_and_a_killed_holder_frees_the_folder(tmp_path):
    proc = hold(tmp_path)
    try:
        with pytest.raises(PipelineError) as caught:
            store.open_run("train", FP)
        line = str(caught.value)
        assert "\n" not in line and f"pid {proc.pid} on {socket.gethostname()} (a train run)" in line
        assert line.endswith("wait for it to finish (or stop it), then rerun `dvc repro train`")
        store.finish_run("train", FP)  # a finish of someone else's run leaves it alone
        assert store.run_dir("train", FP).is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert store.open_run("train", FP) == store.run_dir("train", FP)  # the OS dropped the killed holder's lock
    store.finish_run("train", FP)
    assert not store.run_dir("train", FP).exists()


def test_shard_workers_share_a_run_that_a_whole_run_cannot_take(tmp_path):
    proc = hold(tmp_path, shared=True)
    try:
        store.open_run("train", FP, shared=True)  # a second worker: beside the first
        store.close_run("train", FP)
        with pytest.raises(PipelineError, match=f"in use by pid {proc.pid} on .* \\(a train shard worker\\)"):
            store.open_run("train", FP)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_the_other_processes_of_a_data_parallel_run_work_inside_rank_0s_lock(tmp_path, monkeypatch):
    proc = hold(tmp_path)
    try:
        monkeypatch.setenv("RANK", "1")
        assert store.open_run("train", FP).is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def record(**environment) -> dict:
    return {"stage": "train", "params": {"lr": 0.1, "unet": {"channels": [32, 64]}}, "seed": 1,
            "inputs": {"data/x": "h1"}, "code": "c1",
            "environment": {"device": "cpu", "precision": "fp32", "processes": "1", "torch": "2.5", **environment}}


def test_another_runs_state_is_removed_with_one_line_naming_what_changed(capsys):
    store.open_run("train", OTHER, record())
    (store.run_dir("train", OTHER) / "checkpoints").mkdir()
    store.close_run("train", OTHER)  # killed: its state stays
    capsys.readouterr()
    store.open_run("train", FP, record(device="cuda (NVIDIA H100, CUDA 12.4, cuDNN 90100)", torch="2.6"))
    assert capsys.readouterr().out == ("train: resume state from another run (device cpu -> cuda (NVIDIA H100, CUDA "
                                       "12.4, cuDNN 90100), torch 2.5 -> 2.6); starting fresh\n")
    assert sorted(p.name for p in store.run_dir("train", FP).parent.iterdir()) == [FP[:24]]
    store.close_run("train", FP)
    store.open_run("train", FP, record())  # its own state: no line
    assert capsys.readouterr().out == ""


def test_a_run_going_on_beside_this_one_is_left_alone(tmp_path, capsys):
    proc = hold(tmp_path)  # FP: another experiment, running
    try:
        store.open_run("train", OTHER, record())
        assert capsys.readouterr().out == "" and store.run_dir("train", FP).is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_what_changed_is_named_for_each_component():
    new = record()
    assert store.describe_changes(record(), new) == "another fingerprint"
    assert store.describe_changes(None, new) == "its settings were not recorded"
    assert store.describe_changes(record(processes="2", cpu="native, AVX512, bf16 yes"), new) == (
        "processes 2 -> 1, cpu native, AVX512, bf16 yes -> none")
    old = {**record(), "params": {"lr": 0.2, "unet": {"channels": [32]}}, "seed": 2, "inputs": {"data/x": "h0"},
           "code": "c0"}
    assert store.describe_changes(old, new) == "code, inputs (data/x), params (lr, unet.channels), seed 2 -> 1"
