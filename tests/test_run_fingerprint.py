"""One run fingerprint (params, seed, inputs, code) decides which resume state a run may reuse; the local
store keeps that state out of DVC's reach, shared with the temporary workspaces of queued experiments."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthmed.core import store
from synthmed.core.provenance import run_fingerprint, stage_code_paths

DVC_YAML = """stages:
  train:
    cmd: python -m stages.train
    deps:
      - stages/train.py
      - synthmed/lib
      - data/input.csv
      - ${train.path}
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for rel, text in {"dvc.yaml": DVC_YAML, "stages/train.py": "STEP = 1\n", "synthmed/lib/loss.py": "A = 1\n",
                      "synthmed/other.py": "B = 1\n", "data/input.csv": "x\n1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def fingerprint() -> str:
    return run_fingerprint("train", params={"lr": 0.1}, seed=1, inputs=["data/input.csv"])


def test_the_code_deps_are_the_ones_dvc_hashes(project):
    assert stage_code_paths("train") == [Path("stages/train.py"), Path("synthmed/lib")]
    assert stage_code_paths("missing") is None


def test_a_fix_in_any_code_the_stage_depends_on_changes_the_fingerprint(project):
    before = fingerprint()
    assert fingerprint() == before  # stable
    (project / "synthmed/other.py").write_text("B = 2\n")  # not a dep of the stage
    assert fingerprint() == before
    (project / "synthmed/lib/loss.py").write_text("A = 2  # the fix\n")
    fixed = fingerprint()
    assert fixed != before
    (project / "stages/train.py").write_text("STEP = 2\n")
    assert fingerprint() not in (before, fixed)
    (project / "data/input.csv").write_text("x\n2\n")
    assert run_fingerprint("train", params={"lr": 0.1}, seed=1, inputs=["data/input.csv"]) != fixed
    assert run_fingerprint("train", params={"lr": 0.2}, seed=1, inputs=["data/input.csv"]) != fingerprint()


def test_the_store_is_shared_with_dvc_temporary_workspaces(tmp_path, monkeypatch):
    monkeypatch.delenv(store.ENV, raising=False)
    repo = tmp_path / "repo"
    temp_workspace = repo / ".dvc/tmp/exps/tmpabc123"
    temp_workspace.mkdir(parents=True)
    monkeypatch.chdir(temp_workspace)
    assert store.root() == repo.resolve() / ".synthmed"
    monkeypatch.chdir(repo)
    assert store.root() == Path(".synthmed")
    monkeypatch.setenv(store.ENV, str(tmp_path / "shared"))
    assert store.run_dir("train", "ab" * 32) == tmp_path / "shared/runs/train" / ("ab" * 12)
    store.run_dir("train", "ab" * 32).mkdir(parents=True)
    store.finish_run("train", "ab" * 32)
    assert not store.run_dir("train", "ab" * 32).exists()
