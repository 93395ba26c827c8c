"""dvc.yaml declares, for every stage, each synthmed module the stage runs: else DVC would not rerun
the stage after a fix in that module (and resume fingerprints, which hash the same deps, would miss it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from synthmed.core.provenance import stage_code_paths
from tests.conftest import REPO_ROOT

SPEC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    path = REPO_ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports, at any depth of the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from synthmed.core import store`
    return {m for m in found if m.split(".")[0] in ("synthmed", "stages") and module_file(m)}


def closure(stage: str) -> set[Path]:
    """Every project source file a stage executes: its module and what it imports, transitively,
    with the packages' __init__ files that carry code."""
    todo, seen = [f"stages.{stage}"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents' __init__ run first
        todo += imported_modules(module_file(name))
    files = {module_file(m) for m in seen}
    return {f.relative_to(REPO_ROOT) for f in files if f.name != "__init__.py" or f.read_text().strip()}


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


@pytest.mark.parametrize("stage", list(SPEC))
def test_every_module_a_stage_runs_is_a_dvc_dependency(stage, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    deps = stage_code_paths(stage)
    missing = sorted(str(f) for f in closure(stage) if not covered(f, deps))
    assert not missing, f"dvc.yaml: stage {stage} runs these modules but does not depend on them: {missing}"
    stale = sorted(str(d) for d in deps if not (REPO_ROOT / d).exists())
    assert not stale, f"dvc.yaml: stage {stage} depends on paths that do not exist: {stale}"
