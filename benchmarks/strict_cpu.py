"""Strict CPU mode (synthmed.core.reproducibility): which knobs change the bits, and what it costs.

Every measurement runs in its own subprocess (the knobs latch at the first kernel). Each
worker imports torch and diffusers *before* applying its settings, so a knob that changes the
bytes also shows it can be applied after import. Workloads, all seeded, fp32:

- train: AdamW steps of a tiny UNet2DConditionModel ((32, 64, 128), cross-attention 384,
  4x16x16 latents, batch 16) on latents from a no-grad AutoencoderKL encode of 64x64 images;
  hash = sha256 over all UNet parameters after the last step.
- sample: 25 DDIM steps with classifier-free guidance for 16 latents + VAE decode; hash of
  the images.
- effnet: EfficientNet-Lite0 features of 16 images (resized to 224); hash of the features.

Sections of the JSON:
- run_to_run: default settings twice -> same hash?
- knobs: each knob alone (and all strict knobs) -> hash differs from the default?
- threads: strict mode under `taskset -c 0` vs two CPUs with threads pinned to 2 (equal?),
  and default settings there, where torch takes its thread count from the CPUs (differ?).
- cost: median seconds per training step / per sampling run / per effnet batch, default vs
  strict vs strict with cross_vendor=False, runs interleaved; ratio = mode / default of the
  medians, best_ratio of the fastest step / run / batch seen (the less noisy one). Timings
  are noisy on shared cores, badly so when another job keeps a core busy (libgomp threads
  spin-wait): loadavg is reported. The knobs' own "seconds" come from single runs with
  OMP_WAIT_POLICY=PASSIVE and are rough.

    .venv/bin/python benchmarks/strict_cpu.py [--steps 30] [--repeats 3] [--quick] [--sections cost]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Knobs tried one at a time (set in os.environ after import, or a torch flag).
KNOBS: dict[str, dict] = {
    "aten_avx2": {"env": {"ATEN_CPU_CAPABILITY": "avx2"}},
    "aten_default": {"env": {"ATEN_CPU_CAPABILITY": "default"}},
    "onednn_avx2": {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}},
    "mkl_cbwr_avx2": {"env": {"MKL_CBWR": "AVX2"}},  # honoured on Intel only: AUTO on AMD
    "mkl_cbwr_auto_strict": {"env": {"MKL_CBWR": "AUTO,STRICT"}},
    "mkl_cbwr_compatible": {"env": {"MKL_CBWR": "COMPATIBLE"}},
    "mkl_cbwr_compatible_strict": {"env": {"MKL_CBWR": "COMPATIBLE,STRICT"}},
    "mkl_enable_instructions_avx2": {"env": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}},
    "threads_1": {"threads": 1},
    "mkldnn_deterministic": {"mkldnn_deterministic": True},
    "use_deterministic_algorithms": {"deterministic": True},
    "nnpack_off": {"nnpack": False},
    "mkldnn_off": {"mkldnn": False},
    "strict": {"strict": True},
    "strict_same_vendor": {"strict": True, "cross_vendor": False},  # MKL_CBWR=AUTO,STRICT
    "strict_mkldnn_off": {"strict": True, "mkldnn": False},
}


# ----------------------------------------------------------------------------- worker side


def _hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _models(torch):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64).eval()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=384, attention_head_dim=8,
        norm_num_groups=32, dropout=0.1)
    return vae, unet


def _train(torch, steps: int) -> dict:
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    vae, unet = _models(torch)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(64, 48, 384, generator=g)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        images = torch.rand(16, 3, 64, 64, generator=g) * 2 - 1
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample(generator=g) * 0.18215
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        cond = emb[torch.randint(0, 64, (16,), generator=g)]
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    return {"hash": _hash(unet.state_dict().values()), "seconds": statistics.median(times[2:] or times),
            "best": min(times[2:] or times)}


def _sample(torch, steps: int = 25, guidance: float = 3.0) -> dict:
    from diffusers import DDIMScheduler

    vae, unet = _models(torch)
    unet.eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(16, 48, 384, generator=g), torch.zeros(16, 48, 384)
    latents = torch.randn(16, 4, 16, 16, generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        images = vae.decode(latents / 0.18215).sample
    seconds = time.perf_counter() - start
    return {"hash": _hash([images]), "seconds": seconds, "best": seconds}


def _effnet(torch, repeats: int = 5) -> dict:
    sys.path.insert(0, str(REPO))
    from synthmed.metrics.features import load_effnet_lite0

    model = load_effnet_lite0()
    images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            feats = model(images)
            times.append(time.perf_counter() - start)
    return {"hash": _hash([feats]), "seconds": statistics.median(times[1:] or times), "best": min(times[1:] or times)}


def worker(spec: dict) -> dict:
    import diffusers  # noqa: F401  (imported before the knobs on purpose)
    import torch

    sys.path.insert(0, str(REPO))
    from synthmed.core.reproducibility import STRICT_ENV, pin_cpu

    record = None
    if spec.get("strict"):
        record = pin_cpu(spec.get("threads", 2), cross_vendor=spec.get("cross_vendor", True))
    else:
        os.environ.update(STRICT_ENV if spec.get("strict_isa_only") else spec.get("env", {}))
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
    if "mkldnn" in spec:
        torch.backends.mkldnn.enabled = spec["mkldnn"]
    if "nnpack" in spec:
        torch.backends.nnpack.set_flags(spec["nnpack"])
    if spec.get("mkldnn_deterministic"):
        torch.backends.mkldnn.deterministic = True
    if spec.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    run = {"train": lambda: _train(torch, spec["steps"]), "sample": lambda: _sample(torch),
           "effnet": lambda: _effnet(torch)}[spec["workload"]]
    out = run()
    out.update(pin=record, capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
               onednn_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return out


# ----------------------------------------------------------------------------- driver side


def launch(spec: dict, cpus: str | None = None, timing: bool = False) -> dict:
    """Run one worker. Runs kept for their hashes only sleep instead of spinning while they wait
    (OMP_WAIT_POLICY=PASSIVE): that changes scheduling, not arithmetic (same hashes), and keeps
    them from crawling when another job shares the cores; timing runs keep libgomp's default."""
    print(f"[strict_cpu] {spec} cpus={cpus}", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if not timing:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="processes per setting for the timings")
    ap.add_argument("--quick", action="store_true", help="fewer knobs, 1 repeat (a smoke run)")
    ap.add_argument("--sections", default="bits,threads,cost", help="comma-separated subset of bits,threads,cost")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    train = {"workload": "train", "steps": args.steps}
    knobs = {k: KNOBS[k] for k in ("aten_avx2", "onednn_avx2", "mkl_cbwr_compatible_strict", "strict")} if args.quick else KNOBS
    repeats = 1 if args.quick else args.repeats
    result: dict = {"steps": args.steps, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}

    workloads = ("train",) if args.quick else ("train", "sample", "effnet")
    sections = set(args.sections.split(","))
    if "bits" in sections:
        result["run_to_run"], result["knobs"] = {}, {}
    for workload in workloads if "bits" in sections else ():
        base = {**train, "workload": workload}
        first, second = launch(base), launch(base)
        result["run_to_run"][workload] = {"equal": first["hash"] == second["hash"], "hash": first["hash"][:16],
                                          "capability": first["capability"], "threads": first["threads"]}
        table = {}
        for name, spec in knobs.items():
            r = launch({**base, **spec})
            table[name] = {"changes_bits": r["hash"] != first["hash"], "hash": r["hash"][:16],
                           "capability": r["capability"], "onednn_bf16": r["onednn_bf16"], "threads": r["threads"],
                           "seconds": round(r["seconds"], 4), "vs_default": round(r["seconds"] / first["seconds"], 3)}
        result["knobs"][workload] = {"default_seconds": round(first["seconds"], 4), **table}

    if "threads" in sections and not (shutil.which("taskset") and (os.cpu_count() or 1) >= 2):
        result["threads"] = "skipped: needs taskset and 2 CPUs"
    elif "threads" in sections:
        threads = {}
        for label, spec in (("strict_threads2", {**train, "strict": True, "threads": 2}),
                            ("default_unpinned", train)):
            one, two = launch(spec, cpus="0"), launch(spec, cpus="0,1")
            threads[label] = {"equal": one["hash"] == two["hash"], "threads_1cpu": one["threads"],
                              "threads_2cpu": two["threads"]}
        spec = {**train, "strict_isa_only": True}  # STRICT_ENV, thread count left to torch
        one, two = launch(spec, cpus="0"), launch(spec, cpus="0,1")
        threads["strict_isa_threads_unpinned"] = {"equal": one["hash"] == two["hash"],
                                                  "threads_1cpu": one["threads"], "threads_2cpu": two["threads"]}
        result["threads"] = threads

    cost = {}
    for workload in workloads if "cost" in sections else ():
        base = {**train, "workload": workload}
        modes = {"default": {"threads": 2}, "strict": {"strict": True, "threads": 2},
                 "strict_same_vendor": {"strict": True, "threads": 2, "cross_vendor": False}}
        times: dict[str, list[float]] = {m: [] for m in modes}
        best: dict[str, list[float]] = {m: [] for m in modes}
        hashes: dict[str, set[str]] = {m: set() for m in modes}
        for _ in range(repeats):  # interleaved, so drifting load hits all alike
            for mode, spec in modes.items():
                r = launch({**base, **spec}, timing=True)
                times[mode].append(r["seconds"])
                best[mode].append(r["best"])
                hashes[mode].add(r["hash"])
        med = {m: statistics.median(t) for m, t in times.items()}
        low = {m: min(t) for m, t in best.items()}
        cost[workload] = {
            "median_s": {m: round(t, 4) for m, t in med.items()},
            "ratio": {m: round(med[m] / med["default"], 3) for m in modes if m != "default"},
            "best_s": {m: round(t, 4) for m, t in low.items()},
            "best_ratio": {m: round(low[m] / low["default"], 3) for m in modes if m != "default"},
            "runs": {m: [round(x, 4) for x in t] for m, t in times.items()},
            "repeatable": {m: len(h) == 1 for m, h in hashes.items()},
            "strict_changes_bits": hashes["default"] != hashes["strict"],
        }
    if cost:
        result["cost"] = cost
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
