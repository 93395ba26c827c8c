"""Typed, validated access to one stage's section of params.yaml.

Each stage declares its params as a dataclass; every field must be present in
params.yaml (so `dvc exp run -S stage.key=value` always has a key to set) and of
the declared type. Unknown keys are rejected, which catches typos in sweeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import os
import re
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml

from synthmed.errors import PipelineError

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
        raise PipelineError(f"{path}: section '{key}:' is missing or not a mapping; restore it from the README")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in section:
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise PipelineError(f"{path}: unknown key '{key}.{name}'{hint}")
    values = {}
    for name, field in fields.items():
        if name not in section:
            if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                continue
            raise PipelineError(f"{path}: key '{key}.{name}' is missing; add it (see README, 'Params')")
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


def load_params(stage: str, cls: type[T], path: str | Path = PARAMS_FILE) -> tuple[T, int]:
    """Return (validated params of ``stage``, shared seed) from params.yaml."""
    path = Path(path)
    data = _read_yaml(path)
    seed = data.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise PipelineError(f"{path}: top-level 'seed' must be an integer (e.g. seed: 42)")
    return _build(cls, data.get(stage), stage, path), seed


def as_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


# Errors of the machine that no retry fixes: one line and exit 2, like bad params.
_USER_FIXABLE_OS_ERRORS = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
                           errno.EROFS: "make the output folder writable", errno.EACCES: "fix its permissions",
                           errno.EPERM: "fix its permissions"}


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
    """Pin the thread count and, in strict mode, the CPU kernels (see synthmed/reproducibility.py)
    before the stage creates any tensor; restarts the process once if a kernel was chosen already.
    ``pin=False`` only validates the section (a stage run inside another process leaves its settings)."""
    from synthmed import reproducibility

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


def describe_stage(stage: str, doc: str | None, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """The stage's docstring plus what it reads and writes, from its dvc.yaml entry."""
    from synthmed.provenance import is_code, stage_entries

    lines = [(doc or f"DVC stage `{stage}`.").strip(), "", f"Reads params.yaml: `seed` and the `{stage}:` section"]
    entries = lambda key: stage_entries(stage, key, dvc_yaml) or []  # noqa: E731
    inputs = [d for d in entries("deps") if not is_code(d)]
    if inputs:
        lines += ["Reads:", *(f"  {d}" for d in inputs)]
    outputs = entries("outs") + entries("plots") + entries("metrics")
    if outputs:
        lines += ["Writes:", *(f"  {o}" for o in outputs)]
    lines += ["", f"Run it through DVC (`dvc repro {stage}`) so that its outputs are recorded."]
    return "\n".join(lines)


def run_stage(main: Callable[[], None], argv: list[str] | None = None, *, stage: str | None = None,
              data_parallel: bool = False) -> int:
    """Run a stage's main() and return its exit code; a PipelineError (or a disk the user must fix)
    becomes one line on stderr and exit code 2. Stages end with `sys.exit(run_stage(main))`.

    ``argv`` None: the command line, and the process's CPU settings come from params.yaml (`cpu:`).
    ``argv`` given: a run inside another process (tests, notebooks), whose CPU settings stay as they are.
    ``data_parallel`` (the training stages): from the command line, with several GPUs visible or
    ``SYNTHMED_PROCESSES`` > 1, the stage restarts itself as that many processes (synthmed.runtime.launch_ranks),
    so `dvc repro`, `dvc exp run`, the queue and the flow all train data-parallel.
    `--help` describes the stage and exits without touching anything. The wall time goes to
    logs/timings/<stage>.json, outside every DVC output, so that cached artifacts stay identical
    across reruns.
    """
    module = getattr(main, "__module__", "__main__")
    if stage is None:  # `python -m stages.ingest` -> "ingest"
        stage = module.removeprefix("stages.") if module.startswith("stages.") else Path(sys.argv[0]).stem
    doc = getattr(sys.modules.get(module), "__doc__", None)
    args = sys.argv[1:] if argv is None else argv
    described = any(a in ("-h", "--help") for a in args)  # reading dvc.yaml for it costs every run 0.4 s
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}",
                                     description=describe_stage(stage, doc) if described else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or an unknown option (2)
        return exc.code if isinstance(exc.code, int) else 2
    start = time.perf_counter()
    try:
        if data_parallel and argv is None:
            from synthmed import runtime

            n = 1 if runtime.is_rank() else runtime.data_parallel_processes()
            if n > 1:
                return runtime.launch_ranks(stage, n)
        apply_cpu_params(pin=argv is None)
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "CUDA error" not in str(exc) and "NCCL" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        print(f"error: the GPU failed mid-run ({first}); check it with nvidia-smi, then rerun `dvc repro {stage}` "
              "(a training stage resumes from its last checkpoint)", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _USER_FIXABLE_OS_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; {_USER_FIXABLE_OS_ERRORS[exc.errno]} and rerun "
              f"`dvc repro {stage}` (a killed or failed run resumes where it stopped)", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if os.environ.get("RANK", "0") != "0":  # one of several processes: the main one reports
        return 0
    print(f"{stage}: finished in {seconds:.1f} s")
    from synthmed.io import write_json

    write_json(Path("logs/timings") / f"{stage}.json", {"stage": stage, "wall_s": round(seconds, 2)})
    return 0


def require_inputs(stage: str, *paths: str | Path) -> None:
    """Stop with one line if an upstream artifact is missing."""
    for path in paths:
        if not Path(path).exists():
            raise PipelineError(f"{path}: missing upstream artifact; run `dvc repro {stage}` to build it first")
