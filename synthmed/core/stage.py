"""A DVC stage as its code sees it, and the one way every stage runs.

`Stage` holds what a stage knows about itself: its name, its validated params section, the shared seed, and
its data inputs and outputs *as dvc.yaml declares them*, so that none of these is written twice. A stage
asks it for an input (`stage.dep("ingest/dataset")`, which also stops with one line when the upstream
artifact is missing) and for where to write (`stage.out_path("model")`, which must be a declared output),
and takes its run fingerprint, provenance and metrics from it.

`run_stage` is every stage's entry point: `--help`, data-parallel restarts, CPU pinning, params, the one-line
errors and the wall-time log.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any, Callable

import yaml

from synthmed.core.config import PARAMS_FILE, _build, _read_yaml, apply_cpu_params, as_dict, seed_of
from synthmed.core.errors import PipelineError

DVC_YAML = "dvc.yaml"
CODE_ROOTS = ("synthmed", "stages")
_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


def dvc_yaml_path() -> Path:
    """The working directory's dvc.yaml (DVC runs stages from the repository root), else the one beside this code
    (a stage run from elsewhere, e.g. a test's scratch folder)."""
    here = Path(DVC_YAML)
    return here if here.is_file() else Path(__file__).resolve().parents[2] / DVC_YAML


def _stages(path: Path) -> dict:
    return _parsed(path.resolve(), path.stat().st_mtime_ns) if path.is_file() else {}


@cache
def _parsed(path: Path, mtime_ns: int) -> dict:
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})


def stage_names(path: str | Path | None = None) -> list[str]:
    """The stages in dvc.yaml's order (the order they run in)."""
    return list(_stages(Path(path or dvc_yaml_path())))


def stage_entries(stage: str, key: str, path: str | Path | None = None) -> list[str] | None:
    """The paths under ``key`` (deps, outs, plots, metrics) of ``stage`` in dvc.yaml; None without an entry."""
    spec = _stages(Path(path or dvc_yaml_path())).get(stage)
    if spec is None:
        return None
    return [e if isinstance(e, str) else next(iter(e)) for e in spec.get(key) or []]


def is_code(dep: str | Path) -> bool:
    return bool(Path(dep).parts) and Path(dep).parts[0] in CODE_ROOTS


@dataclasses.dataclass
class Stage:
    """One stage as its code sees it (see the module's docstring); `run_stage` hands it to the stage's main."""
    name: str
    params: Any  # the stage's params dataclass (None for a stage without a section)
    seed: int
    inputs: list[str]  # its data deps from dvc.yaml, ${section.key} filled in from params.yaml, empty ones dropped
    outputs: list[str]  # its outs, plots and metrics from dvc.yaml
    # the components of each fingerprint this stage computed (for its run folder's run.json), and the folders it holds
    _records: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _runs: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    @classmethod
    def load(cls, name: str, params_cls: type | None, path: str | Path = PARAMS_FILE) -> "Stage":
        """The stage ``name`` of dvc.yaml with its params validated against ``params_cls``."""
        path = Path(path)
        everything = _read_yaml(path)  # read once: the section, the seed and the templated deps come from it
        params = None if params_cls is None else _build(params_cls, everything.get(name), name, path)
        seed = seed_of(everything, path)

        def filled(entry: str) -> str:
            return _TEMPLATE.sub(lambda m: str(_lookup(everything, m.group(1))), entry)

        deps = [filled(d) for d in stage_entries(name, "deps") or [] if not is_code(d)]
        outs = [o for key in ("outs", "plots", "metrics") for o in stage_entries(name, key) or []]
        return cls(name, params, seed, [d for d in deps if d and d != "."], outs)

    @property
    def out(self) -> Path:
        """The stage's own folder, data/<name>."""
        return Path("data") / self.name

    def dep(self, key: str) -> str:
        """The input ``data/<key>`` (e.g. "ingest/dataset"; or a path as dvc.yaml spells it), which dvc.yaml must
        list; one line naming the stage to run when it is missing."""
        path = key if key in self.inputs else f"data/{key}"
        if path not in self.inputs:
            raise PipelineError(f"dvc.yaml: stage {self.name} does not list {path} in its deps; add it")
        if not Path(path).exists():
            raise PipelineError(f"{path}: missing upstream artifact; run `dvc repro {self.name}` to build it first")
        return path

    def out_path(self, name: str) -> str:
        """data/<stage>/<name>, which must be (inside) one of the stage's declared outputs."""
        path = f"{self.out}/{name}"
        if not any(path == o or path.startswith(o.rstrip("/") + "/") for o in self.outputs):
            raise PipelineError(f"dvc.yaml: stage {self.name} does not declare {path} as an output; add it")
        return path

    def fingerprint(self, inputs: list[str] | None = None, **extra) -> str:
        """The run fingerprint that resume state is keyed by: params, seed, input hashes, code, and the device,
        precision, processes, CPU mode and package versions (synthmed.core.provenance.run_record)."""
        from synthmed.core.provenance import fingerprint_of, run_record

        record = run_record(self.name, params=self.params_dict(), seed=self.seed,
                            inputs=self.inputs if inputs is None else inputs, **extra)
        fingerprint = fingerprint_of(record)
        self._records[fingerprint] = record
        return fingerprint

    def run_dir(self, fingerprint: str, *, shared: bool = False) -> Path:
        """The run's resume-state folder in the local store, held by this process until the stage ends (a second
        process of the same run stops with one line); the stage's abandoned runs are removed, with one line saying
        what changed. ``shared``: one of several workers dividing the run (generate --shard i/N)."""
        from synthmed.core import store

        self._runs.add(fingerprint)
        return store.open_run(self.name, fingerprint, self._records.get(fingerprint), shared=shared)

    def finish_run(self, fingerprint: str) -> None:
        """Drop the run's resume state (checkpoints, caches of encodings) once its outputs are written."""
        from synthmed.core import store

        self._runs.discard(fingerprint)
        store.finish_run(self.name, fingerprint)

    def close(self) -> None:
        """Let go of the run folders this stage holds (its end does; so does the end of the process)."""
        from synthmed.core import store

        for fingerprint in self._runs:
            store.close_run(self.name, fingerprint)
        self._runs.clear()

    def params_dict(self) -> dict:
        return as_dict(self.params) if self.params is not None else {}

    def write_provenance(self, inputs: list[str] | None = None, **params) -> None:
        """<out>/provenance.json: params (plus ``params``: facts decided at run time), seed, input hashes, code."""
        from synthmed.core.provenance import write_provenance

        write_provenance(self.out_path("provenance.json"), stage=self.name, params={**self.params_dict(), **params},
                         seed=self.seed, inputs=self.inputs if inputs is None else inputs)

    def write_metrics(self, metrics: dict, headline: list[str]) -> None:
        from synthmed.core.io import write_metrics

        write_metrics(self.name, metrics, headline)


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = node.get(part, "") if isinstance(node, dict) else ""
    return node


# Errors of the machine that no retry fixes: one line and exit 2, like bad params.
_USER_FIXABLE_OS_ERRORS = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota)",
                           errno.EFBIG: "free disk space or raise the file-size limit (ulimit -f)",
                           errno.EROFS: "make the output folder writable", errno.EACCES: "fix its permissions",
                           errno.EPERM: "fix its permissions"}


def describe_stage(stage: str, doc: str | None) -> str:
    """The stage's docstring plus what it reads and writes, from its dvc.yaml entry."""
    lines = [(doc or f"DVC stage `{stage}`.").strip(), "", f"Reads params.yaml: `seed` and the `{stage}:` section"]
    entries = lambda key: stage_entries(stage, key) or []  # noqa: E731
    inputs = [d for d in entries("deps") if not is_code(d)]
    if inputs:
        lines += ["Reads:", *(f"  {d}" for d in inputs)]
    outputs = entries("outs") + entries("plots") + entries("metrics")
    if outputs:
        lines += ["Writes:", *(f"  {o}" for o in outputs)]
    lines += ["", f"Run it through DVC (`dvc repro {stage}`) so that its outputs are recorded."]
    return "\n".join(lines)


def run_stage(main: Callable[[Stage], None], params_cls: type | None, argv: list[str] | None = None, *,
              data_parallel: bool = False, name: str | None = None) -> int:
    """Run a stage's ``main(stage)`` and return its exit code; a PipelineError (or a disk the user must fix)
    becomes one line on stderr and exit code 2. Each stage module ends with
    ``def cli(argv=None): return run_stage(main, Params, argv)`` and ``sys.exit(cli())``; ``name`` defaults to
    the module's (`stages.ingest` -> ingest).

    ``argv`` None: the command line, and the process's CPU settings come from params.yaml (`cpu:`).
    ``argv`` given: a run inside another process (tests, notebooks), whose CPU settings stay as they are.
    ``data_parallel`` (the training stages): from the command line, with several GPUs visible or
    ``SYNTHMED_PROCESSES`` > 1, the stage restarts itself as that many processes (synthmed.core.runtime.launch_ranks),
    so `dvc repro`, `dvc exp run`, the queue and the flow all train data-parallel.
    `--help` describes the stage and exits without touching anything. The wall time goes to
    logs/timings/<stage>.json, outside every DVC output, so that cached artifacts stay identical across reruns.
    """
    module = getattr(main, "__module__", "__main__")
    if name is None:
        name = module.removeprefix("stages.") if module.startswith("stages.") else Path(sys.argv[0]).stem
    args = sys.argv[1:] if argv is None else argv
    described = any(a in ("-h", "--help") for a in args)  # reading dvc.yaml for it costs every run 0.4 s
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=describe_stage(name, getattr(sys.modules.get(module), "__doc__", None)) if described else None)
    try:
        parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or an unknown option (2)
        return exc.code if isinstance(exc.code, int) else 2
    start = time.perf_counter()
    try:
        if data_parallel and argv is None:
            from synthmed.core import runtime

            n = 1 if runtime.is_rank() else runtime.data_parallel_processes()
            if n > 1:
                return runtime.launch_ranks(name, n)
        apply_cpu_params(pin=argv is None)
        stage = Stage.load(name, params_cls)
        try:
            main(stage)
        finally:
            stage.close()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "CUDA error" not in str(exc) and "NCCL" not in str(exc):
            raise
        first = str(exc).strip().splitlines()[0]
        print(f"error: the GPU failed mid-run ({first}); check it with nvidia-smi, then rerun `dvc repro {name}` "
              "(a training stage resumes from its last checkpoint)", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _USER_FIXABLE_OS_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; {_USER_FIXABLE_OS_ERRORS[exc.errno]} and rerun "
              f"`dvc repro {name}` (a killed or failed run resumes where it stopped)", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if os.environ.get("RANK", "0") != "0":  # one of several processes: the main one reports
        return 0
    print(f"{name}: finished in {seconds:.1f} s")
    from synthmed.core.io import write_json

    write_json(Path("logs/timings") / f"{name}.json", {"stage": name, "wall_s": round(seconds, 2)})
    return 0
