"""What one training step of a params profile's models costs on this machine, and what it will cost at the
profile's batch: parameters, FLOPs per image, peak memory and step time. Prints one JSON document.

    .venv/bin/python benchmarks/profile_cost.py [--profile profiles/gpu-256.yaml] [--models vae unet lora]
        [--batches 1 2] [--device cpu|cuda] [--steps 3]

Models: `vae` (train_vae's autoencoder, its reconstruction + KL step), `unet` (train_ldm's UNet, its diffusion
loss with the EMA update), `lora` (train_lora's base UNet, frozen, with the profile's LoRA adapter; a
Stable Diffusion 1.5-shaped UNet built from its config, random weights, when the profile's base is
stable-diffusion). Every (model, batch) runs in a fresh subprocess so that one peak never leaks into another.
The step is the trainer's: bf16 autocast on CUDA (a LoRA base held in bf16), fp32 on the CPU; AdamW.

Memory: CUDA `max_memory_allocated` over the process (weights, gradients, optimizer and EMA state,
activations); CPU the process's peak RSS above its RSS before the model was built. With two or more batch
sizes the peak is fitted as fixed + per-image x batch and extrapolated to the profile's batch (`peak_gb_at_profile`):
on the CPU that is an fp32 upper bound for a GPU's bf16 autocast, whose activations are smaller. The GPU step
time estimated from the CPU is FLOPs / (the GPU's dense bf16 peak x `--utilisation`), a planning figure only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
GPU_PEAK_TFLOPS = {"A100": 312, "H100": 989}  # dense bf16 tensor-core peaks (NVIDIA's data sheets, SXM)
SD15 = dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            attention_head_dim=8)  # Stable Diffusion 1.5's UNet (860 M parameters); the other fields are diffusers' defaults


def profile_params(profile: str) -> dict:
    import yaml

    from synthmed.profiles import merged, read_overlay

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merged(base, read_overlay(profile), profile) if profile else base


def build(model: str, p: dict, device):
    """(trainable module, step(batch) -> None, the profile's batch size)."""
    import torch

    from synthmed.diffusion.loss import diffusion_loss
    from synthmed.diffusion.schedulers import make_noise_scheduler

    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    res, channels = p["ingest"]["resolution"], p["ingest"]["channels"]
    if model == "vae":
        from synthmed.models.autoencoder import VAETrainConfig, _Reconstruction, _recon_loss, build_autoencoder

        v = p["train_vae"]
        vae = build_autoencoder(in_channels=channels, sample_size=res, **v["model"]).to(device)
        cfg = VAETrainConfig(**{k: v[k] for k in VAETrainConfig.__dataclass_fields__})
        forward, opt, g = _Reconstruction(vae), torch.optim.AdamW(vae.parameters(), lr=v["lr"]), torch.Generator()

        def step(b: int) -> None:
            x = torch.rand(b, channels, res, res, device=device) * 2 - 1
            with autocast:
                recon, moments = forward(x, g, b, slice(0, b))
            loss = _recon_loss(recon.float(), x, cfg) + cfg.kl_weight * forward.posterior(moments).kl().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return vae, step, profile_batch(model, p)

    if model == "unet":
        from diffusers.training_utils import EMAModel

        from synthmed.models.unet import UNetParams, downsampling, unet_for_training

        v, t = p["train_vae"]["model"], p["train_ldm"]
        u = UNetParams(**t["unet"])
        side = res // downsampling(v["block_out_channels"]) // u.latent_patch
        latents = torch.empty(1, v["latent_channels"] * u.latent_patch ** 2, side, side)
        ctx_len, ctx_dim = t["text_max_length"], text_width(t["text_encoder"])
        net = unet_for_training(u, latents, {"cross_attention_dim": ctx_dim}).to(device)
        c = latents.shape[1]
        lr, ema_decay, sched_args = t["lr"], t["ema_decay"], (t["num_train_timesteps"], t["prediction_type"],
                                                             t["beta_schedule"])
    else:
        from peft import LoraConfig
        from diffusers import UNet2DConditionModel

        t = p["train_lora"]
        if t["base"] != "stable-diffusion":
            raise SystemExit(f"--models lora measures a Stable Diffusion 1.5-shaped base; the profile's "
                             f"train_lora.base is {t['base']!r}")
        net = UNet2DConditionModel(**SD15)
        if t["resolution"]:
            net.register_to_config(sample_size=t["resolution"] // 8)
        net.requires_grad_(False)
        net.to(device, dtype=torch.bfloat16 if cuda else torch.float32)
        net.add_adapter(LoraConfig(r=t["rank"], lora_alpha=t["alpha"], lora_dropout=t["lora_dropout"],
                                   init_lora_weights="gaussian", target_modules=list(t["target_modules"])))
        for x in net.parameters():
            if x.requires_grad:
                x.data = x.data.float()
        side, c, ctx_len, ctx_dim = net.config.sample_size, 4, 77, SD15["cross_attention_dim"]
        lr, ema_decay, sched_args = t["lr"], t["ema_decay"], (1000, "epsilon", "scaled_linear")
        from diffusers.training_utils import EMAModel
    params = [x for x in net.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=True)
    ema = EMAModel(params, decay=ema_decay, foreach=True) if ema_decay > 0 else None
    scheduler = make_noise_scheduler(*sched_args)

    def step(b: int) -> None:
        z0 = torch.randn(b, c, side, side)  # on the CPU, as the trainer draws them
        cond = {"encoder_hidden_states": torch.randn(b, ctx_len, ctx_dim, device=device),
                "encoder_attention_mask": torch.ones(b, ctx_len, dtype=torch.long, device=device)}
        with autocast:
            loss = diffusion_loss(net, scheduler, z0, torch.randn_like(z0),
                                  torch.randint(scheduler.config.num_train_timesteps, (b,)), cond,
                                  use_prev=torch.arange(b) % 2 == 0).mean()  # the trainer's: half the images
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)

    return net, step, profile_batch(model, p)


def profile_batch(model: str, p: dict) -> int:
    return p[{"vae": "train_vae", "unet": "train_ldm", "lora": "train_lora"}[model]]["batch_size"]


def text_width(name: str) -> int:
    """The hidden size of the offline text encoder (its config alone)."""
    from synthmed.text.encoder import TextEncoder

    return TextEncoder(name, 8).hidden_size


def one(args) -> dict:
    """One (model, batch) in this process."""
    import psutil
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from memory import RSSSampler
    from synthmed.core.provenance import seed_everything

    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() if device.type == "cuda" else min(os.cpu_count(), 2))
    seed_everything(0)
    p = profile_params(args.profile)
    before = psutil.Process().memory_info().rss
    net, step, full = build(args.model, p, device)
    row = {"model": args.model, "batch": args.batch, "profile_batch": full,
           "parameters": sum(x.numel() for x in net.parameters()),
           "trainable": sum(x.numel() for x in net.parameters() if x.requires_grad)}
    if args.flops:
        with FlopCounterMode(display=False) as counter:
            step(2)  # two images: one with the self-conditioning pass, one without (the trainer's average)
        row["train_flops_per_image"] = counter.get_total_flops() / 2

    def timed() -> float:
        start = time.perf_counter()
        step(args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        times = [timed() for _ in range(args.steps)]
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        with RSSSampler() as rss:
            times = [timed() for _ in range(args.steps)]
        row["peak_gb"] = (rss.peak - before) / 2**30
    row["step_s"] = statistics.median(times[1:] or times)  # the first step builds the AdamW state
    return row


def fit(rows: list[dict]) -> dict:
    """Peak memory as fixed + per-image x batch (least squares), extrapolated to the profile's batch; the step
    time per image at the largest batch measured."""
    out = {k: rows[0][k] for k in ("parameters", "trainable", "profile_batch")}
    out["train_flops_per_image"] = next((r["train_flops_per_image"] for r in rows if "train_flops_per_image" in r), None)
    out["measured"] = [{k: r[k] for k in ("batch", "peak_gb", "step_s")} for r in rows]
    if len(rows) >= 2:
        xs, ys = [r["batch"] for r in rows], [r["peak_gb"] for r in rows]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        per = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out["peak_gb_fixed"], out["peak_gb_per_image"] = my - per * mx, per
        out["peak_gb_at_profile"] = my + per * (out["profile_batch"] - mx)
    last = max(rows, key=lambda r: r["batch"])
    out["step_s_at_profile_here"] = last["step_s"] / last["batch"] * out["profile_batch"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(ROOT / "profiles/gpu-256.yaml"), help="a params overlay ('' = params.yaml)")
    ap.add_argument("--models", nargs="+", default=["vae", "unet"], choices=["vae", "unet", "lora"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--profile-batches", action="store_true",
                    help="measure at half and all of each model's batch in the profile (on a GPU) instead")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch (the first is not counted)")
    ap.add_argument("--utilisation", type=float, default=0.25, help="of the GPU's bf16 peak, for the estimate")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    import torch

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # RSS follows live tensors
    report = {"profile": args.profile, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "models": {}}
    for model in args.models:
        rows = []
        batches = args.batches
        if args.profile_batches:
            full = profile_batch(model, profile_params(args.profile))
            batches = sorted({max(full // 2, 1), full})
        for k, batch in enumerate(batches):
            cmd = [sys.executable, __file__, "--one", "--model", model, "--batch", str(batch), "--profile", args.profile,
                   "--device", args.device, "--steps", str(args.steps)] + (["--flops"] if k == 0 else [])
            print(f"[profile_cost] {model} batch {batch} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"{model} at batch {batch} failed:\n{proc.stderr[-4000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"[profile_cost]   {rows[-1]}", file=sys.stderr, flush=True)
        result = fit(rows)
        flops = result["train_flops_per_image"]
        if flops and args.device == "cpu":
            result["gpu_step_s_estimate"] = {gpu: flops * result["profile_batch"] / (peak * 1e12 * args.utilisation)
                                             for gpu, peak in GPU_PEAK_TFLOPS.items()}
        report["models"][model] = result
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
