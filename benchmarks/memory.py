"""Peak training-step memory of ConditionalUNet: standard, standard + gradient checkpointing, invertible.

Each (backbone, depth) runs in a fresh subprocess (`--one`) so allocator caches and the peak of one
measurement cannot leak into another. The step measured is the second one (after a warm-up that creates
the AdamW state): forward, MSE loss, backward, optimizer.step, zero_grad.

- CUDA: max_memory_allocated - memory_allocated before the step.
- CPU: growth of the process RSS over its value just before the step, sampled every ~1 ms by a thread,
  and ru_maxrss growth. The children run with a fixed glibc mmap threshold so that freed tensors go back to
  the OS and RSS follows the live tensors instead of the malloc cache.

Prints one JSON document on stdout (progress on stderr):

    .venv/bin/python benchmarks/memory.py [--dims 3] [--depths 1,2,4,8] [--quick] [--device cuda] [--amp bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = ("standard", "checkpointed", "invertible")
ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RSSSampler:
    """Max RSS over a window, polled by a daemon thread (torch kernels release the GIL, so it keeps up)."""

    def __init__(self, interval_s: float = 0.001):
        import psutil
        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> RSSSampler:
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure_one(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from synthmed.models.cond_unet import ConditionalUNet, parameter_count

    torch.manual_seed(0)
    device = torch.device(args.device)
    channels = tuple(int(c) for c in args.channels.split(","))
    model = ConditionalUNet(dims=args.dims, sample_size=args.size, in_channels=4, block_out_channels=channels,
                            layers_per_block=args.depth, cross_attention_dim=args.ctx_dim,
                            attention_levels=(1,) if len(channels) > 1 else (0,), attention_head_dim=2,
                            norm_num_groups=8, backbone="standard" if args.variant != "invertible" else "invertible",
                            invertible_attention=args.invertible_attention and args.variant == "invertible")
    # nn.Module.to: ModelMixin.to also imports diffusers' hooks (and peft / transformers where installed).
    torch.nn.Module.to(model, device).train()
    if args.variant == "checkpointed":
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (args.batch, 4, *([args.size] * args.dims))
    x = torch.randn(shape, device=device)
    target = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    tokens = torch.randn(args.batch, 8, args.ctx_dim, device=device)

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step() -> float:
        start = time.perf_counter()
        with amp:
            pred = model(x, t, tokens).sample
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()  # warm-up: AdamW state, allocator pools, lazy inits
    row: dict = {"variant": args.variant, "depth": args.depth, "params": parameter_count(model)}
    mb = 2 ** 20
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        times = [step()]
        row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / mb
    else:
        with RSSSampler() as rss:
            times = [step()]
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        row["peak_mb"] = (rss.peak - rss.baseline) / mb
        row["ru_maxrss_growth_mb"] = (maxrss - rss.baseline) / mb
        row["rss_before_step_mb"] = rss.baseline / mb
    times += [step() for _ in range(args.steps - 1)]
    row["step_s"] = statistics.median(times)
    return row


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares MB per extra block (layers_per_block)."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(d for d, _ in points)
    my = statistics.fmean(p for _, p in points)
    den = sum((d - mx) ** 2 for d, _ in points)
    return sum((d - mx) * (p - my) for d, p in points) / den if den else None


def child_cmd(args: argparse.Namespace, variant: str, depth: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--variant", variant, "--depth", str(depth),
           "--dims", str(args.dims), "--size", str(args.size), "--batch", str(args.batch),
           "--channels", args.channels, "--device", args.device, "--steps", str(args.steps),
           "--ctx-dim", str(args.ctx_dim), "--threads", str(args.threads), "--amp", args.amp]
    return cmd + (["--invertible-attention"] if args.invertible_attention else [])


def run_all(args: argparse.Namespace) -> dict:
    import torch

    depths = [int(d) for d in args.depths.split(",")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           # A fixed threshold turns off glibc's adaptive one: large blocks are mmapped and unmapped on free.
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    for depth in depths:
        for variant in VARIANTS:
            log(f"[memory] dims={args.dims} size={args.size} depth={depth} {variant} ...")
            proc = subprocess.run(child_cmd(args, variant, depth), capture_output=True, text=True, env=env,
                                  cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"child failed ({variant}, depth {depth}):\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            log(f"[memory]   peak {row['peak_mb']:.1f} MB, step {row['step_s']:.2f} s")
            rows.append(row)
    peak = {(r["variant"], r["depth"]): r["peak_mb"] for r in rows}
    ratios = []
    for d in depths:
        ckpt = peak[("checkpointed", d)]
        ratios.append({"depth": d,
                       "invertible_over_checkpointed": peak[("invertible", d)] / ckpt if ckpt > 0 else None,
                       "standard_over_checkpointed": peak[("standard", d)] / ckpt if ckpt > 0 else None})
    device = args.device
    if device == "cuda":
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = f"cpu ({os.cpu_count()} cores visible, {args.threads} torch threads)"
    return {
        "config": {"dims": args.dims, "size": args.size, "batch": args.batch,
                   "block_out_channels": [int(c) for c in args.channels.split(",")], "depths": depths,
                   "cross_attention_dim": args.ctx_dim, "text_tokens": 8,
                   "invertible_attention": args.invertible_attention, "steps_timed": args.steps, "amp": args.amp,
                   "memory": "cuda max_memory_allocated growth" if device == "cuda"
                   else "RSS growth over the step (1 ms sampler); ru_maxrss growth alongside"},
        "device": device_name,
        "torch": torch.__version__,
        "rows": rows,
        "ratios": ratios,
        "slope_mb_per_block": {v: slope([(r["depth"], r["peak_mb"]) for r in rows if r["variant"] == v])
                               for v in VARIANTS},
        "target_met": all(r["invertible_over_checkpointed"] is not None and r["invertible_over_checkpointed"] <= 0.85
                          for r in ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, default=3, choices=(2, 3))
    ap.add_argument("--size", type=int, default=None, help="spatial size (default 32 for 3-D, 64 for 2-D)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", default=None, help="block_out_channels (default 16,32,64 / 32,64,128)")
    ap.add_argument("--depths", default="1,2,4,8", help="layers_per_block values")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (median); the first is the measured one")
    ap.add_argument("--ctx-dim", type=int, default=384, help="cross_attention_dim (text token width)")
    ap.add_argument("--invertible-attention", action="store_true")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--amp", default="no", choices=("no", "bf16"), help="bf16 autocast around the forward pass")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in each child")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and two depths (a smoke run, seconds)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size = args.size or (8 if args.dims == 3 else 16)
        args.channels = args.channels or "8,16"
        args.depths = "1,2"
        args.batch, args.steps, args.ctx_dim = 1, 1, 32
    args.size = args.size or (32 if args.dims == 3 else 64)
    args.channels = args.channels or ("16,32,64" if args.dims == 3 else "32,64,128")

    import torch
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("[memory] CUDA not available, measuring on CPU")
        args.device = "cpu"
    if args.one:
        print(json.dumps(measure_one(args)))
    else:
        print(json.dumps(run_all(args), indent=2))


if __name__ == "__main__":
    main()
