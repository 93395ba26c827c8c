"""Training checkpoints: written atomically every N steps, last M kept, resumed after a kill.

A checkpoint carries a fingerprint of everything that determines the run (params,
seed, inputs); a checkpoint of another run is never resumed, it is cleared.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from synthmed.io import atomic_path

_NAME = re.compile(r"^step(\d{8})\.pt$")


def _existing(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: str | Path, step: int, state: dict, keep: int) -> Path:
    folder = Path(folder)
    path = folder / f"step{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for _, old in _existing(folder)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_latest(folder: str | Path, fingerprint: str) -> dict | None:
    """The newest checkpoint of this run, or None; checkpoints of other runs are removed."""
    folder = Path(folder)
    ckpts = _existing(folder)
    if not ckpts:
        return None
    state = torch.load(ckpts[-1][1], map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        shutil.rmtree(folder)  # params or inputs changed since: start afresh
        return None
    return state
