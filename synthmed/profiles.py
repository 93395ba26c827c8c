"""Params profiles: overlays of params.yaml (only the keys that differ, nested by section), merged onto it
(`merged`: the test suite's tiny profile) or turned into `key=value` overrides (`overrides`: for
`dvc exp run -S` and the flow's `profile:` parameter).

    dvc exp run $(python -m synthmed.profiles profiles/gpu-256.yaml)

A profile may start from another (``extends: gpu-256.yaml``) and change only what differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from synthmed.core.errors import PipelineError


def merged(base: dict, overlay: dict, source: str = "the profile", where: str = "", strict: bool = True) -> dict:
    """``base`` with ``overlay``'s values put in, section by section; a key ``base`` lacks is an error (it would
    add a key that no stage reads), or with ``strict`` off (one profile over another) added as it is."""
    out = dict(base)
    for key, value in overlay.items():
        if strict and (key not in base or (isinstance(value, dict) and not isinstance(base[key], dict))):
            raise PipelineError(f"{source}: '{where}{key}' is not a key of params.yaml; fix the profile")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value, source, f"{where}{key}.", strict)
        else:
            out[key] = value
    return out


def leaves(overlay: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(``section.key``, value) of every leaf of an overlay."""
    return [item for key, value in overlay.items()
            for item in (leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)])]


def read_overlay(profile: str | Path) -> dict:
    """A profile's overlay; ``extends: other.yaml`` (beside it) takes that profile's keys first, its own win."""
    profile = Path(profile)
    overlay = yaml.safe_load(profile.read_text()) or {}
    parent = overlay.pop("extends", None)
    return merged(read_overlay(profile.parent / parent), overlay, strict=False) if parent else overlay


def overrides(profile: str | Path, params: str | Path = "params.yaml") -> list[str]:
    """``section.key=value`` for every leaf of the profile, checked against params.yaml."""
    overlay = read_overlay(profile)
    merged(yaml.safe_load(Path(params).read_text()), overlay, str(profile))
    return [f"{key}={_text(value)}" for key, value in leaves(overlay)]


def _text(value) -> str:
    """A value as DVC's -S reads it (YAML), without spaces, so that a shell's word splitting keeps it whole."""
    plain = isinstance(value, str) and " " not in value and yaml.safe_load(value) == value
    return value if plain else json.dumps(value, separators=(",", ":"))


if __name__ == "__main__":
    print(" ".join(f"-S {item}" for item in overrides(sys.argv[1])))
