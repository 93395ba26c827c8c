"""The local store: resume state and caches that no DVC checkout touches.

DVC restores every declared output to its committed version before `dvc exp run` reproduces
(persistent ones too) and can never restore an uncached one, so state that a killed run already
paid for cannot live in a stage's outputs. It lives here instead, git- and DVC-ignored:

- ``runs/<stage>/<fingerprint>/``: resume state of one run (checkpoints, finished shards), keyed by
  its run fingerprint (params, seed, inputs and code); removed once the stage has written its
  outputs, so a forced rerun starts afresh.
- ``cache/<name>/``: content-addressed caches that stay valid across runs (LLM replies, image
  features); safe to delete at any time, they only cost time (or money) to rebuild.

The store is ``.synthmed/`` at the repository root, shared by the temporary workspaces of
`dvc exp run --queue/--temp`; ``$SYNTHMED_STORE`` moves it (e.g. to disk shared by several checkouts).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ENV = "SYNTHMED_STORE"
NAME = ".synthmed"
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")  # where DVC runs queued/temp experiments


def root() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    parts = Path.cwd().resolve().parts
    for i in range(len(parts) - len(_DVC_TEMP_WORKSPACE)):
        if parts[i : i + len(_DVC_TEMP_WORKSPACE)] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[:i]) / NAME  # the repository that queued the experiment
    return Path(NAME)  # stages run in the repository root


def run_dir(stage: str, fingerprint: str) -> Path:
    return root() / "runs" / stage / fingerprint[:24]


def cache_dir(name: str) -> Path:
    return root() / "cache" / name


def finish_run(stage: str, fingerprint: str) -> None:
    """Drop a run's resume state once its outputs are written."""
    shutil.rmtree(run_dir(stage, fingerprint), ignore_errors=True)
