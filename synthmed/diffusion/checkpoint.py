"""Training checkpoints: written atomically every N steps, last M kept, resumed after a kill.

A checkpoint carries a fingerprint of everything that determines the run (params, seed, inputs, code,
device, precision, processes, CPU mode, package versions: synthmed.core.provenance.run_record) and lives
in that run's folder of the local store (synthmed.core.store), which the run holds locked; a checkpoint
of another run is never resumed, it is cleared.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from synthmed.core.io import atomic_path

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
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: str | Path, fingerprint: str) -> dict | None:
    """The newest checkpoint of this run, or None; checkpoints of other runs are removed."""
    folder = Path(folder)
    ckpts = _existing(folder)
    if not ckpts:
        return None
    state = torch.load(ckpts[-1][1], map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:  # never in a stage (its folder is keyed by the fingerprint)
        print(f"{folder}: checkpoints of another run; starting fresh", flush=True)
        shutil.rmtree(folder)
        return None
    return state


class TrainedState:
    """A model's trained parameters (those that require grad) as a checkpoint entry: the whole model when it
    trains from scratch, only the adapter of a LoRA fine-tune, not its gigabytes of frozen base."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"checkpoint holds {len(state)} trained tensors, the model {len(expected)}; "
                             f"e.g. {sorted(set(state) ^ expected)[:3]}")
        self.model.load_state_dict(state, strict=False)


def capture(step: int, fingerprint: str, log: list[dict], generator: torch.Generator, **stateful) -> dict:
    """Everything a resumed run needs: step, log, RNG states and each object's state_dict."""
    return {"step": step, "fingerprint": fingerprint, "log": log, "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            **{name: obj.state_dict() for name, obj in stateful.items() if obj is not None}}


def restore(state: dict, generator: torch.Generator, **stateful) -> tuple[int, list[dict]]:
    for name, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(state[name])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["log"]


def resume(folder: str | Path | None, fingerprint: str, generator: torch.Generator, name: str,
           **stateful) -> tuple[int, list[dict]]:
    """(first step, log so far): those of the newest checkpoint of this run in ``folder`` (its state restored
    into ``stateful`` and the generators, and a line saying so), else (0, [])."""
    state = load_latest(folder, fingerprint) if folder else None
    if state is None:
        return 0, []
    start, log = restore(state, generator, **stateful)
    print(f"{name}: resuming from step {start} ({folder})")
    return start, log
