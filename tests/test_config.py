from dataclasses import dataclass
from typing import Literal

import pytest

from synthmed.core.config import load_params
from synthmed.core.errors import PipelineError


@dataclass
class Inner:
    depth: int


@dataclass
class P:
    lr: float
    steps: int
    mode: Literal["a", "b"]
    sizes: list[int]
    inner: Inner


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


GOOD = "seed: 3\nstage:\n  lr: 1\n  steps: 10\n  mode: a\n  sizes: [1, 2]\n  inner: {depth: 2}\n"


def test_valid_section_is_typed(tmp_path):
    p, seed = load_params("stage", P, write(tmp_path, GOOD))
    assert seed == 3 and p.lr == 1.0 and isinstance(p.lr, float) and p.sizes == [1, 2]
    assert p.inner == Inner(depth=2)


@pytest.mark.parametrize("written, value", [("1e-07", 1e-7), ("'2E+3'", 2000.0), (".5e1", 5.0)])
def test_an_exponent_without_a_dot_is_a_float(tmp_path, written, value):
    p, _ = load_params("stage", P, write(tmp_path, GOOD.replace("lr: 1", f"lr: {written}")))
    assert p.lr == value


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("  steps: 10\n", ""), "key 'stage.steps' is missing"),
        (GOOD.replace("steps: 10", "stepz: 10"), "unknown key 'stage.stepz'; did you mean 'steps'?"),
        (GOOD.replace("steps: 10", "steps: ten"), "stage.steps must be int"),
        (GOOD.replace("lr: 1", "lr: 1e"), "stage.lr must be float"),
        (GOOD.replace("steps: 10", "steps: 1e3"), "stage.steps must be int"),
        (GOOD.replace("mode: a", "mode: c"), "stage.mode = 'c' is not supported; use one of: a, b"),
        (GOOD.replace("sizes: [1, 2]", "sizes: 3"), "stage.sizes must be a list"),
        (GOOD.replace("seed: 3", "seed: x"), "'seed' must be an integer"),
        ("seed: 1\n", "section 'stage:' is missing"),
        (GOOD.replace("{depth: 2}", "{deep: 2}"), "unknown key 'stage.inner.deep'; did you mean 'depth'?"),
        (GOOD.replace("{depth: 2}", "{depth: x}"), "stage.inner.depth must be int"),
        ("seed: [1\n", "not valid YAML"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as err:
        load_params("stage", P, path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(PipelineError, match="params.yaml: not found"):
        load_params("stage", P, tmp_path / "params.yaml")


@pytest.mark.parametrize("threads, expected", [("auto", 2), (3, 3)])
def test_cpu_threads_auto_is_the_committed_count_without_a_gpu(tmp_path, threads, expected):
    from synthmed.core.config import CPU_THREADS, _build
    from synthmed.core.config import CPUParams

    p = _build(CPUParams, {"mode": "native", "threads": threads}, "cpu", tmp_path / "params.yaml")
    assert p.thread_count() == (CPU_THREADS if threads == "auto" else expected)  # this machine has no GPU


@pytest.mark.parametrize("threads", ["many", 0, True])
def test_cpu_threads_must_be_a_count_or_auto(tmp_path, threads):
    from synthmed.core.config import CPUParams, _build

    with pytest.raises(PipelineError, match="cpu.threads"):
        _build(CPUParams, {"mode": "native", "threads": threads}, "cpu", tmp_path / "params.yaml")
