"""Strict CPU mode: the knobs take effect after `import torch`, late pins are caught, and the
thread pin makes results independent of the CPUs a process gets.

Every check runs in a fresh subprocess: the knobs latch at a process's first kernel, and the
test process has long run kernels of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synthmed.core.reproducibility import STRICT_ENV, strict_env

REPO = Path(__file__).resolve().parent.parent
HAS_AVX2 = "avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="strict mode pins AVX2 kernels; this CPU has none")


def _env() -> dict[str, str]:
    """This environment minus any strict-mode variables, so the subprocess starts unpinned."""
    drop = {*STRICT_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SYNTHMED_STRICT_CPU_REEXEC"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO)}


def _python(code: str, cpus: str | None = None) -> list[str]:
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def _run(code: str) -> str:
    proc = subprocess.run(_python(code), capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_strict_env_holds_isa_and_thread_pins():
    env = strict_env(3)
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["MKL_CBWR"] == "COMPATIBLE,STRICT"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


def test_pin_cpu_rejects_zero_threads():
    from synthmed.core.reproducibility import pin_cpu

    with pytest.raises(ValueError):
        pin_cpu(0)  # raises before touching any process state


@needs_avx2
def test_pin_cpu_after_import_takes_effect():
    out = _run("""
        import json, torch
        from synthmed.core.reproducibility import pin_cpu
        print(json.dumps(pin_cpu(1)))
    """)
    record = json.loads(out.strip().splitlines()[-1])
    assert record["aten_capability"] == "AVX2"
    assert record["onednn_above_avx2"] is False
    assert record["mkl_cnr"] == "COMPATIBLE,STRICT"
    assert record["threads"] == 1 and record["nnpack"] is False
    assert record["env"]["ATEN_CPU_CAPABILITY"] == "avx2"


@needs_avx2
def test_late_pin_raises_and_reexec_recovers():
    # A kernel before pin_cpu latches the CPU's own ISA: pin_cpu must say so; reexec()
    # restarts with the env set from the start, where the same order of calls works.
    out = _run("""
        import json, torch
        from synthmed.core.reproducibility import StrictCPUError, pin_cpu, reexec
        torch.ones(4).sum()
        print(torch.backends.cpu.get_cpu_capability(), flush=True)
        try:
            record = pin_cpu(1)
        except StrictCPUError:
            print("too late", flush=True)
            reexec(1)
        print(json.dumps(record))
    """)
    lines = out.strip().splitlines()
    if lines[0] != "AVX2":  # on an AVX2-only CPU the early kernel is AVX2 already: nothing is late
        assert lines[1:3] == ["too late", "AVX2"]  # the restarted process had the pin from the start
    assert json.loads(lines[-1])["aten_capability"] == "AVX2"


_STEP = """
    import hashlib, torch
    from synthmed.core.reproducibility import pin_cpu
    pin_cpu(2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(),
                              torch.nn.Conv2d(32, 8, 1), torch.nn.Flatten(), torch.nn.Linear(8 * 32 * 32, 64))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(16, 8, 32, 32)
    for _ in range(3):
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().numpy().tobytes())
    print(h.hexdigest(), torch.get_num_threads())
"""


@needs_avx2
@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2, reason="needs taskset and 2 CPUs")
def test_strict_bits_same_on_one_and_two_cpus():
    # Stands in for machines with different core counts: same pinned thread count, one CPU
    # or two underneath. The claim is bit-identity, so the hashes are compared exactly.
    procs = [subprocess.Popen(_python(_STEP, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for cpus in ("0", "0,1")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out.split())
    (hash_one, threads_one), (hash_two, threads_two) = outs
    assert threads_one == threads_two == "2"
    assert hash_one == hash_two
