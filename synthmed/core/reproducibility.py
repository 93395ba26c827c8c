"""Strict CPU mode: bit-identical CPU results across x86-64 machines (opt-in).

Why CPU runs differ between machines (torch 2.13 CPU wheel: MKL 2024.2 for fp32 GEMM incl.
attention, oneDNN 3.12 for convolutions, ATen's own vectorised kernels, OpenMP threads), and
the knob that pins each (benchmarks/strict_cpu.py shows each one changes the bits):

- ATen picks AVX512/AVX2/scalar kernels by CPU (vector width changes the summation order of
  reductions, norms, softmax)        -> ``ATEN_CPU_CAPABILITY=avx2``
- oneDNN JITs convolutions for the best ISA it finds      -> ``ONEDNN_MAX_CPU_ISA=AVX2``
- MKL picks a GEMM code path by CPU. Its ISA branches (``MKL_CBWR=AVX2`` ...) are honoured on
  Intel CPUs only and silently become AUTO on AMD (MKL's docs; MKL_VERBOSE and the bits agree
  here; ``MKL_ENABLE_INSTRUCTIONS`` changes nothing either), so COMPATIBLE (SSE2) is the one
  branch that is the same on every x86-64 CPU; STRICT makes GEMM independent of the thread
  count                              -> ``MKL_CBWR=COMPATIBLE,STRICT``
- the thread count splits reductions (ATen, oneDNN weight gradients) and even picks conv
  backends, and defaults to the CPUs a process may use -> a fixed ``torch.set_num_threads(n)``;
  ``n`` is part of what must match between machines and goes in the provenance record.
- NNPACK (no-grad convs when oneDNN declines) sizes its tiles from the cache sizes -> off
  (unused by our models today: no effect on bits or time, kept off as insurance).

Not needed: ``torch.use_deterministic_algorithms`` / ``torch.backends.mkldnn.deterministic``
(no effect on these CPU bits; runs already repeat on one machine), interop threads (they only
schedule independent ops), ``torch.backends.mkldnn.enabled=False`` (changes bits, 1.4-2.5x
slower). Cost on the 2-core EPYC: ATen/oneDNN at AVX2 are free; MKL's SSE2 branch makes UNet
training ~1.3x and DDIM sampling ~1.4x slower. ``cross_vendor=False`` keeps MKL's own branch
(``AUTO,STRICT``: free, but only reproducible between CPUs where MKL picks the same path).

All of these are read lazily -- ATen's at the first tensor op (even ``torch.randn``), oneDNN's
and MKL's at the first GEMM -- not at ``import torch``. So :func:`pin_cpu` works in a process
that has already imported torch/diffusers, if it runs before any tensor is created (model
construction counts). It verifies each knob and raises :class:`StrictCPUError` when one came
too late; the caller then restarts with the env set from the start (:func:`reexec`).

Not covered: numpy/OpenBLAS SIMD dispatch (``NPY_DISABLE_CPU_FEATURES``, ``OPENBLAS_CORETYPE``,
read at import, and torch imports numpy), the glibc/torch/wheel versions (pinned elsewhere),
and GPUs: CUDA kernels are a separate matter (cuBLAS/cuDNN determinism flags, same GPU model);
nothing here affects them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile

# ISA pins. AVX2 (+FMA) is the common level of x86-64 CPUs since Haswell / Zen 1; a CPU without
# it cannot run the AVX2 kernels, and pin_cpu then reports the mismatch instead of guessing.
STRICT_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
}
_SAME_VENDOR_MKL = "AUTO,STRICT"
_REEXEC_MARK = "SYNTHMED_STRICT_CPU_REEXEC"


class StrictCPUError(RuntimeError):
    """A strict-CPU knob did not take effect (usually: a kernel ran before pin_cpu)."""


def strict_env(threads: int, *, cross_vendor: bool = True) -> dict[str, str]:
    """STRICT_ENV plus the thread counts, for subprocesses or a re-exec.

    The thread variables only matter for child processes (libgomp reads OMP_NUM_THREADS
    at import); in this process pin_cpu sets the count with torch.set_num_threads.
    """
    env = {**STRICT_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if not cross_vendor:
        env["MKL_CBWR"] = _SAME_VENDOR_MKL
    return env


def pin_cpu(threads: int, *, strict: bool = True, cross_vendor: bool = True) -> dict:
    """Pin the thread count and, with ``strict``, the CPU kernels; return a provenance record.

    Call before any tensor exists. Without ``strict`` only the thread count is fixed (what
    differs between machines of one CPU model). ``cross_vendor=False``: see the module docstring.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    env = (strict_env(threads, cross_vendor=cross_vendor) if strict
           else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    os.environ.update(env)
    if "torch" not in sys.modules:  # a stage without tensors: torch, if it ever loads, reads the env set here
        return {"strict_cpu": strict, "threads": threads, "env": env}
    import torch

    torch.set_num_threads(threads)
    record = {"strict_cpu": strict, "threads": torch.get_num_threads(), "env": env}
    if not strict:
        return record
    torch.backends.nnpack.set_flags(False)
    record.update(
        aten_capability=torch.backends.cpu.get_cpu_capability(),
        # bf16 support as oneDNN reports it needs an AVX-512 ISA: True means oneDNN was
        # initialised before the pin (or ONEDNN_MAX_CPU_ISA was ignored).
        onednn_above_avx2=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        mkl_cnr=_mkl_cnr_mode(),
        nnpack=bool(torch._C._get_nnpack_enabled()),
    )
    problems = []
    if record["aten_capability"] != "AVX2":
        problems.append(f"ATen kernels are {record['aten_capability']}, not AVX2")
    if record["onednn_above_avx2"]:
        problems.append("oneDNN uses an ISA above AVX2")
    if record["mkl_cnr"] not in (None, env["MKL_CBWR"]):
        problems.append(f"MKL CNR mode is {record['mkl_cnr']}")
    if record["threads"] != threads:
        problems.append(f"{record['threads']} threads, not {threads}")
    if problems:
        raise StrictCPUError(
            "strict CPU mode not in effect: " + "; ".join(problems)
            + ". Call pin_cpu() before any tensor op, or restart with strict_env() set (reexec())."
        )
    return record


def cpu_mode() -> str:
    """This process's CPU numerics as the run fingerprint records them: strict kernels (with MKL's branch) or native
    ones, ATen's vector ISA and whether oneDNN runs bf16 (the VAE's autocast on "auto"). Not the thread count: it
    moves rounding only, and a stage run inside another process (the shard workers of a test, a notebook) keeps that
    process's count where `dvc repro` pins params.yaml's; the provenance record has it."""
    import torch

    mkl = os.environ.get("MKL_CBWR", "")
    strict = (os.environ.get("ATEN_CPU_CAPABILITY") == STRICT_ENV["ATEN_CPU_CAPABILITY"]
              and mkl in (STRICT_ENV["MKL_CBWR"], _SAME_VENDOR_MKL))
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return (f"{f'strict (MKL {mkl})' if strict else 'native'}, {torch.backends.cpu.get_cpu_capability()}, "
            f"bf16 {'yes' if bf16 else 'no'}")


def needs_reexec(threads: int, *, cross_vendor: bool = True) -> bool:
    """Try pin_cpu(threads); True when the process must restart with strict_env() set."""
    try:
        pin_cpu(threads, cross_vendor=cross_vendor)
    except StrictCPUError:
        return True
    return False


def reexec(threads: int, *, cross_vendor: bool = True) -> None:
    """Restart this Python command with strict_env(threads) set from the start (never returns).

    Refuses to loop: if the restarted process still fails, pin_cpu's error stands.
    """
    if os.environ.get(_REEXEC_MARK):
        raise StrictCPUError("strict CPU mode still not in effect after a re-exec")
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, **strict_env(threads, cross_vendor=cross_vendor), _REEXEC_MARK: "1"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _mkl_cnr_mode() -> str | None:
    """The CNR mode MKL reports in its verbose line for a tiny GEMM (None if not parseable).

    MKL offers no exported query in the torch wheel; its verbose output goes to fd 1 from C,
    so fd 1 is redirected for the duration of one 2x2 matmul.
    """
    import torch

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile(mode="w+") as tmp:
            os.dup2(tmp.fileno(), 1)
            try:
                with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                    torch.ones(2, 2) @ torch.ones(2, 2)
            finally:
                ctypes.CDLL(None).fflush(None)
                os.dup2(saved, 1)
            tmp.seek(0)
            text = tmp.read()
    finally:
        os.close(saved)
    for word in text.split():
        if word.startswith("CNR:"):
            return word[4:]
    return None
