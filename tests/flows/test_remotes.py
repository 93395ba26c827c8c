"""The flow's checks before a run that pushes its results: one line naming the missing remote."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.pipeline import check_remotes


def test_push_without_remotes_stops_before_anything_runs(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    with pytest.raises(ValueError, match="no default DVC remote.*dvc remote add -d"):
        check_remotes(str(tmp_path), git=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "s", str(tmp_path / "store")], cwd=tmp_path,
                   check=True)
    check_remotes(str(tmp_path), git=False)  # a plain run pushes to the DVC remote only
    with pytest.raises(ValueError, match="no git remote `origin`"):
        check_remotes(str(tmp_path), git=True)
