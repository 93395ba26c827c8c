"""A fresh git+DVC repository of the project for end-to-end tests, and the commands they run in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flows.pipeline import STAGES  # dvc.yaml's order
from synthmed.core.stage import stage_entries, stage_names
from synthmed.profiles import merged
from tests.conftest import REPO_ROOT

TINY_OVERLAY = REPO_ROOT / "tests/e2e/params_tiny.yaml"


def tiny_params() -> dict:
    """The tiny profile: params.yaml with the keys of tests/e2e/params_tiny.yaml replaced."""
    return merged(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), yaml.safe_load(TINY_OVERLAY.read_text()),
                  TINY_OVERLAY.name)


def sh(repo: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, env=env or os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check, env=env)


def make_repo(root: Path, params: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """A fresh git+DVC repo at ``root`` holding the project's tracked files, the tiny params profile (or
    ``params``) and ``extra_files`` (relative path -> bytes, e.g. a dataset under data/raw/)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        generated = rel.startswith("metrics/") or (rel.startswith("data/") and not rel.startswith("data/raw/"))
        if generated or rel == "dvc.lock" or not (REPO_ROOT / rel).is_file():
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, root / rel)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params() if params is None else params, sort_keys=False))
    for rel, data in (extra_files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.environ["DVC_SITE_CACHE_DIR"] = str(root.parent / "dvc-site-cache")
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "init", "--allow-empty")
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    return root


def declared_outputs(repo: Path) -> dict[str, list[str]]:
    return {name: [o for key in ("outs", "metrics", "plots") for o in stage_entries(name, key, repo / "dvc.yaml") or []]
            for name in stage_names(repo / "dvc.yaml")}


def assert_declared_outputs(repo: Path) -> None:
    """Every stage of the DAG ran and wrote every output dvc.yaml declares for it."""
    outputs = declared_outputs(repo)
    for stage, paths in outputs.items():
        for p in paths:
            assert (repo / p).exists(), f"{stage} did not write {p}"
