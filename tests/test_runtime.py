"""The processes a training stage runs as (synthmed.core.runtime): how many, and what happens when one fails."""

from __future__ import annotations

import time

import pytest

from synthmed.core import runtime
from synthmed.core.errors import PipelineError


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_process_count_is_one_line(monkeypatch, value):
    monkeypatch.setenv(runtime.PROCESSES_ENV, value)
    with pytest.raises(PipelineError, match="SYNTHMED_PROCESSES"):
        runtime.data_parallel_processes()


def test_the_process_count_on_the_cpu(monkeypatch):
    monkeypatch.delenv(runtime.PROCESSES_ENV, raising=False)
    assert runtime.data_parallel_processes() == 1  # no GPU here: one process
    monkeypatch.setenv(runtime.PROCESSES_ENV, "2")
    assert runtime.data_parallel_processes() == 2  # gloo on the CPU


def test_one_failing_rank_stops_the_others_and_gives_its_exit_code(tmp_path, monkeypatch):
    """Rank 1 fails as a stage with bad params does (exit 2); rank 0 would wait for it forever in a collective."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/fake.py").write_text(
        "import os, sys, time\n"
        "assert os.environ['WORLD_SIZE'] == '2' and os.environ['MASTER_ADDR']\n"
        "sys.exit(2) if os.environ['RANK'] == '1' else time.sleep(600)\n")
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    assert runtime.launch_ranks("fake", 2) == 2
    assert time.monotonic() - t0 < 60
