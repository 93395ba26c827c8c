"""Seeds, code/package fingerprints and the provenance record every stage writes.

Nothing time-dependent goes in here: the record is part of DVC-cached outputs,
so the same inputs, params and code must give the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

from synthmed.core.io import manifest_hash, sha256_bytes, sha256_file, sha256_tree, write_json

# the packages whose version can change a run's numbers: in the provenance record and the run fingerprint
_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "pillow", "nilearn")


def seed_everything(seed: int) -> "torch.Generator":
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    import torch  # here, not at the top: the stages that never touch a tensor start 1-2 s faster

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Deterministic kernels where torch has them; warn rather than fail elsewhere. This is
    # torch.use_deterministic_algorithms(True, warn_only=True) without its import of torch._inductor
    # (2 s per stage process) for a flag only torch.compile reads: the environment sets it there.
    os.environ.setdefault("TORCHINDUCTOR_DETERMINISTIC", "1")
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].deterministic = True
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any values (unlike hash(), identical across processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def code_version() -> str:
    """Hash of the synthmed and stages sources: changes exactly when the code does."""
    root = Path(__file__).resolve().parents[1]  # synthmed/
    h = hashlib.sha256()
    for pkg in (root, root.parent / "stages"):
        for path in sorted(pkg.rglob("*.py")):
            h.update(path.relative_to(root.parent).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def stage_code_paths(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[Path] | None:
    """The code deps that the working directory's dvc.yaml (the one DVC hashes) declares for ``stage`` (None
    without an entry)."""
    from synthmed.core.stage import is_code, stage_entries

    deps = stage_entries(stage, "deps", dvc_yaml)
    return None if deps is None else [Path(d) for d in deps if is_code(d)]


def stage_code_hash(stage: str) -> str:
    """Hash of the sources DVC hashes for ``stage`` (all of synthmed and stages if it has no entry)."""
    paths = stage_code_paths(stage)
    if paths is None:
        return code_version()
    h = hashlib.sha256()
    for dep in sorted(paths):
        files = sorted(dep.rglob("*.py")) if dep.is_dir() else [dep]
        for path in files:
            h.update(path.as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def run_record(stage: str, *, params: dict, seed: int, inputs: list[str | Path], **extra) -> dict:
    """Everything that decides a run's numbers: params, seed, input hashes, the stage's code and the machine's side
    (`run_environment`); as JSON would give it back (run.json in the run's folder keeps it)."""
    record = {"stage": stage, "params": params, "seed": seed, "inputs": input_hashes(inputs),
              "code": stage_code_hash(stage), **extra, "environment": run_environment()}
    return json.loads(json.dumps(record, default=str))


def fingerprint_of(record: dict) -> str:
    return sha256_bytes(json.dumps(record, sort_keys=True, default=str).encode())


def run_fingerprint(stage: str, *, params: dict, seed: int, inputs: list[str | Path], **extra) -> str:
    """One fingerprint of a run (`run_record`'s hash).

    Resume state (checkpoints, finished shards) is reused only by a run with the same fingerprint,
    so a code fix, like a changed param or input, starts afresh, and so does a run on another device, in
    another precision, with another number of processes, CPU mode or package version: a checkpoint of a run
    killed on the CPU is never continued on a GPU.
    """
    return fingerprint_of(run_record(stage, params=params, seed=seed, inputs=inputs, **extra))


def run_environment() -> dict[str, str]:
    """What besides params, inputs and code changes a run's numbers: the device (and GPU model), the precision
    ``mixed_precision: auto`` runs in there, the number of processes (data-parallel), the CPU mode where the CPU
    computes (strict or native kernels, threads, ISA, bf16) and the versions of the packages that compute. The same
    in every process of a data-parallel run."""
    from synthmed.core import reproducibility, runtime  # torch: only the stages that train or sample ask

    device = runtime.device_kind()
    env = {"device": device, "precision": runtime.auto_precision(), "processes": str(runtime.process_count())}
    if device == "cpu":  # on a GPU the CPU's kernels compute none of the model
        env["cpu"] = reproducibility.cpu_mode()
    return {**env, **package_versions()}


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def input_hashes(paths: list[str | Path]) -> dict[str, str]:
    """sha256 of each file, of each folder's files, or of a dataset folder's manifest (hashed once, by ingest)."""
    return {str(p): (manifest_hash(p) or sha256_tree(p)) if p.is_dir() else sha256_file(p) for p in map(Path, paths)}


def write_provenance(
    path: str | Path, *, stage: str, params: dict, seed: int, inputs: list[str | Path]
) -> None:
    write_json(
        path,
        {
            "stage": stage,
            "params": params,
            "seed": seed,
            "inputs": input_hashes(inputs),
            "code_sha256": code_version(),
            "packages": package_versions(),
        },
    )
