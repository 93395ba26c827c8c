"""One run fingerprint (params, seed, inputs, code, and the device, precision, processes, CPU mode and package
versions) decides which resume state a run may reuse; the local store keeps that state out of DVC's reach, shared
with the temporary workspaces of queued experiments."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthmed.core import store
from synthmed.core.provenance import run_fingerprint, run_record, stage_code_paths

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


@pytest.mark.parametrize("component, change", [
    ("device", lambda m: m.setattr("synthmed.core.runtime.device_kind", lambda: "cuda (NVIDIA H100, CUDA 12.4, cuDNN 9)")),
    ("precision", lambda m: m.setattr("synthmed.core.runtime.auto_precision", lambda: "bf16")),
    ("processes", lambda m: m.setenv("WORLD_SIZE", "2")),
    ("cpu", lambda m: m.setattr("synthmed.core.reproducibility.cpu_mode", lambda: "strict (MKL COMPATIBLE,STRICT), "
                                "AVX2, bf16 no")),
    ("torch", lambda m: m.setattr("importlib.metadata.version", lambda name: "9.9" if name == "torch" else "1.0")),
    ("peft", lambda m: m.setattr("importlib.metadata.version", lambda name: "9.9" if name == "peft" else "1.0")),
])
def test_a_run_on_another_device_precision_process_count_cpu_mode_or_package_is_another_run(project, monkeypatch,
                                                                                           component, change):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "1.0")
    monkeypatch.setattr("synthmed.core.runtime.device_kind", lambda: "cpu")  # the CPU component is a CPU run's
    before = fingerprint()
    with monkeypatch.context() as m:
        change(m)
        assert fingerprint() != before, component
        assert component in run_record("train", params={}, seed=1, inputs=[])["environment"]
    assert fingerprint() == before


def test_a_changed_component_starts_afresh_with_one_line(project, monkeypatch, capsys):
    from synthmed.core.stage import Stage

    monkeypatch.setenv(store.ENV, str(project / "store"))
    (project / "params.yaml").write_text("seed: 1\ntrain:\n  path: ''\n")
    monkeypatch.setattr("synthmed.core.runtime.device_kind", lambda: "cpu")
    killed = Stage.load("train", None)
    killed.run_dir(killed.fingerprint())
    killed.close()  # killed on the CPU; resumed where a GPU is found
    monkeypatch.setattr("synthmed.core.runtime.device_kind", lambda: "cuda (NVIDIA H100, CUDA 12.4, cuDNN 9)")
    monkeypatch.setattr("synthmed.core.runtime.auto_precision", lambda: "bf16")
    capsys.readouterr()
    resumed = Stage.load("train", None)
    folder = resumed.run_dir(resumed.fingerprint())
    resumed.close()
    line = capsys.readouterr().out
    assert line.startswith("train: resume state from another run (device cpu -> cuda (NVIDIA H100, CUDA 12.4, cuDNN 9), "
                           "precision fp32 -> bf16, cpu native, ") and line.endswith(" -> none); starting fresh\n")
    assert line.count("\n") == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # the CPU run's state is gone, not piling up
