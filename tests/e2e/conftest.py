"""The tiny DAG, built once per test session and shared by every test that only needs it built."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from tests.e2e.harness import dvc, make_repo


@pytest.fixture(scope="session")
def dag(tmp_path_factory) -> Path:
    """A git+DVC repository of the project with the tiny profile after one `dvc repro`. Under pytest-xdist the
    first worker to ask builds it and the others wait for it. Read it; change a `copy_of` it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    repo, built = root / "dag" / "repo", root / "dag" / "built"
    with FileLock(str(root / "dag.lock")):
        if not built.exists():
            shutil.rmtree(repo.parent, ignore_errors=True)  # a build that failed half-way
            dvc(make_repo(repo), "repro")
            built.touch()
    os.environ["DVC_SITE_CACHE_DIR"] = str(repo.parent / "dvc-site-cache")
    return repo


@pytest.fixture
def copy_of(dag: Path, tmp_path: Path):
    """copy_of() -> a private copy of the built DAG (workspace, git history, DVC cache and local store)."""
    def copy(name: str = "repo") -> Path:
        return Path(shutil.copytree(dag, tmp_path / name, symlinks=True))
    return copy
