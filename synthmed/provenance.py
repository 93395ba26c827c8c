"""Seeds, code/package fingerprints and the provenance record every stage writes.

Nothing time-dependent goes in here: the record is part of DVC-cached outputs,
so the same inputs, params and code must give the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import random
from pathlib import Path

import numpy as np
import torch

from synthmed.io import sha256_file, sha256_tree, write_json

_PACKAGES = ("torch", "diffusers", "transformers", "numpy", "pillow", "torchmetrics", "nilearn")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Deterministic kernels where torch has them; warn rather than fail elsewhere.
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any values (unlike hash(), identical across processes)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def code_version() -> str:
    """Hash of the synthmed and stages sources: changes exactly when the code does."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for pkg in (root, root.parent / "stages"):
        for path in sorted(pkg.rglob("*.py")):
            h.update(path.relative_to(root.parent).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def input_hashes(paths: list[str | Path]) -> dict[str, str]:
    return {
        str(p): (sha256_tree(p) if Path(p).is_dir() else sha256_file(p)) for p in map(Path, paths)
    }


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
