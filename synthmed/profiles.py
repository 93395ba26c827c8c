"""Params profiles: overlays of params.yaml (only the keys that differ, nested by section) turned into
`key=value` overrides, for `dvc exp run -S` and the flow's `params` (its `profile:` parameter).

    dvc exp run $(python -m synthmed.profiles profiles/gpu-256.yaml)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from synthmed.errors import PipelineError


def overrides(profile: str | Path, params: str | Path = "params.yaml") -> list[str]:
    """``section.key=value`` for every leaf of the profile; a key params.yaml lacks is an error (it would add a
    key that no stage reads)."""
    base = yaml.safe_load(Path(params).read_text())
    out: list[str] = []

    def walk(node: dict, known: dict, prefix: str) -> None:
        for key, value in node.items():
            if not isinstance(known, dict) or key not in known:
                raise PipelineError(f"{profile}: '{prefix}{key}' is not a key of {params}; fix the profile")
            if isinstance(value, dict):
                walk(value, known[key], f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={_text(value)}")

    walk(yaml.safe_load(Path(profile).read_text()) or {}, base, "")
    return out


def _text(value) -> str:
    """A value as DVC's -S reads it (YAML), without spaces, so that a shell's word splitting keeps it whole."""
    plain = isinstance(value, str) and " " not in value and yaml.safe_load(value) == value
    return value if plain else json.dumps(value, separators=(",", ":"))


if __name__ == "__main__":
    print(" ".join(f"-S {item}" for item in overrides(sys.argv[1])))
