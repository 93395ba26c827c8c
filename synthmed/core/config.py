"""Typed, validated access to one stage's section of params.yaml.

Each stage declares its params as a dataclass; every field must be present in
params.yaml (so `dvc exp run -S stage.key=value` always has a key to set) and of
the declared type. Unknown keys are rejected, which catches typos in sweeps.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from synthmed.core.errors import PipelineError

T = TypeVar("T")
PARAMS_FILE = "params.yaml"
CPU_THREADS = 2  # cpu.threads: auto on a CPU-only host; the committed results' count, so they reproduce


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run from the repository root, where params.yaml lives")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise PipelineError(f"{path}: not valid YAML{where} ({problem}); fix the syntax") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping of stage names to sections")
    return data


_EXPONENT_ONLY = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]: the first form that fits
        for form in typing.get_args(tp):
            try:
                return _check_type(value, form, where)
            except PipelineError:
                pass
        forms = [" or ".join(map(repr, typing.get_args(f))) if typing.get_origin(f) is Literal else f"an {f.__name__}"
                 for f in typing.get_args(tp)]
        raise PipelineError(f"{where} = {value!r} is not supported; use {' or '.join(forms)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise PipelineError(f"{where} = {value!r} is not supported; use one of: {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise PipelineError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where} must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_ONLY.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-7 (no dot) as a string; `dvc exp run -S` writes such values
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (
        isinstance(value, bool) and tp is not bool
    )):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise PipelineError(f"{where} must be {name}, got {value!r}")


def _build(cls: type[T], section: Any, key: str, path: Path) -> T:
    """Validate a mapping against dataclass ``cls``; nested dataclass fields recurse."""
    if not isinstance(section, dict):
        raise PipelineError(f"{path}: section '{key}:' is missing or not a mapping; restore it from the repository's params.yaml")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = getattr(cls, "MOVED", {})  # old key -> its new place, e.g. block_out_channels -> unet.block_out_channels
    for name in section:
        if name in moved and name not in fields:
            raise PipelineError(f"{path}: '{key}.{name}' is now '{key}.{moved[name]}'; move it there (and rename it "
                                "in -S overrides and profiles)")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise PipelineError(f"{path}: unknown key '{key}.{name}'{hint}")
    values = {}
    for name, field in fields.items():
        if name not in section:
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue
            raise PipelineError(f"{path}: key '{key}.{name}' is missing; add it (see docs/params.md)")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, section[name], f"{key}.{name}", path)
        else:
            values[name] = _check_type(section[name], tp, f"{path}: {key}.{name}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{path}: {key}: {exc}") from None


def require_at_least_one(params: Any, *names: str) -> None:
    """For __post_init__ of params dataclasses: counts that must be positive (a ValueError becomes
    a one-line params error naming the section)."""
    for name in names:
        if getattr(params, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(params, name)}")


def require_non_negative(params: Any, *names: str) -> None:
    for name in names:
        if getattr(params, name) < 0:
            raise ValueError(f"{name} must be 0 or more, got {getattr(params, name)}")


def require_probability(params: Any, *names: str) -> None:
    """Rates in [0, 1): dropout shares, EMA decays."""
    for name in names:
        if not 0 <= getattr(params, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(params, name)}")


def require_fractions(params: Any, name: str) -> None:
    """For __post_init__: a non-empty list of shares in (0, 1]."""
    values = getattr(params, name)
    if not values or not all(0 < f <= 1 for f in values):
        raise ValueError(f"{name} must be in (0, 1], got {values}")


def seed_of(data: dict, path: str | Path) -> int:
    """The shared seed of params.yaml's contents ``data``."""
    seed = data.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise PipelineError(f"{path}: top-level 'seed' must be an integer (e.g. seed: 42)")
    return seed


def load_params(stage: str, cls: type[T], path: str | Path = PARAMS_FILE) -> tuple[T, int]:
    """Return (validated params of ``stage``, shared seed) from params.yaml."""
    path = Path(path)
    data = _read_yaml(path)
    return _build(cls, data.get(stage), stage, path), seed_of(data, path)


def as_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


@dataclasses.dataclass
class CPUParams:
    """Top-level `cpu:` of params.yaml, shared by every stage like `seed`."""

    mode: Literal["strict", "native"]  # strict: the same bytes on any x86-64 CPU; native: this CPU's fastest kernels
    # intra-op threads; reductions are split by it, so strict runs must agree on it. auto: every core this
    # process may use on a CUDA host (the CPU only feeds the GPU there), CPU_THREADS on a CPU-only one
    threads: int | Literal["auto"]

    def __post_init__(self):
        if self.threads != "auto":
            require_at_least_one(self, "threads")

    def thread_count(self) -> int:
        if self.threads != "auto":
            return self.threads
        torch = sys.modules.get("torch")  # a stage without tensors never loads it, and the count is moot there
        return len(os.sched_getaffinity(0)) if torch is not None and torch.cuda.is_available() else CPU_THREADS


def apply_cpu_params(path: str | Path = PARAMS_FILE, *, pin: bool = True) -> CPUParams:
    """Pin the thread count and, in strict mode, the CPU kernels (see synthmed/core/reproducibility.py)
    before the stage creates any tensor; restarts the process once if a kernel was chosen already.
    ``pin=False`` only validates the section (a stage run inside another process leaves its settings)."""
    from synthmed.core import reproducibility

    p = _build(CPUParams, _read_yaml(Path(path)).get("cpu"), "cpu", Path(path))
    if not pin:
        return p
    threads = p.thread_count()
    if p.mode == "native":
        reproducibility.pin_cpu(threads, strict=False)
        return p
    try:
        reproducibility.pin_cpu(threads)
    except reproducibility.StrictCPUError:
        reproducibility.reexec(threads)  # never returns
    return p
