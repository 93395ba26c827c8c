"""Training throughput and trainer overhead at the demo config; prints JSON.

- overhead: our LDM training step (batch drawing, min-SNR weighting, clipping, LR schedule,
  EMA, logging) against a bare forward/backward/optimizer step of the same UNet on a fixed
  batch, measured in the same process. Target ratio <= 1.15.
- images per second for the VAE and the LDM trainers (the LDM with and without self-conditioning,
  whose gradient-free first pass on half the batch is part of the recipe, not overhead).
- peak memory per LDM step with and without gradient checkpointing (each in its own process:
  peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA).
- `--levers`: speed levers as ratios against the current default, measured in one run with the
  variants interleaved round by round (so that a busy neighbour slows all of them alike): UNet
  attention heads (diffusers' `attention_head_dim` is the number of heads), bf16 autocast and
  channels_last for the UNet and the VAE step, attention only below the full latent resolution, fused
  AdamW + foreach EMA for the LDM update, and the layouts of the evaluation models (classifier, VLP).
- `--compile`: torch.compile of the UNet in the training loop, its compile time and steady-state speed-up.
- `--shapes`: UNet shapes around the default (narrower, wider, deeper, more attention): parameters and seconds per
  self-conditioned training step, as ratios to the default, so that a recipe search can give each the same minutes.

    .venv/bin/python benchmarks/train.py [--steps 30] [--levers | --shapes | --compile]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers.training_utils import EMAModel  # noqa: E402

from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.latents import LatentPairs
from synthmed.diffusion.loop import train_ldm
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.models.autoencoder import VAETrainConfig, build_autoencoder, train_autoencoder  # noqa: E402
from synthmed.metrics.downstream import SmallCNN  # noqa: E402
from synthmed.models.unet import build_unet, downsampling  # noqa: E402
from synthmed.core.runtime import pick_device  # noqa: E402
from synthmed.vlp.model import DualEncoder, info_nce  # noqa: E402

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
# the demo's latent grid as the UNet sees it: 64 px images through the params.yaml VAE, packed
PATCH = PARAMS["train_ldm"]["unet"]["latent_patch"]
LATENT = PARAMS["ingest"]["resolution"] // downsampling(PARAMS["train_vae"]["model"]["block_out_channels"]) // PATCH
LATENT_CHANNELS = PARAMS["train_vae"]["model"]["latent_channels"] * PATCH**2


def demo_unet(latent: int, device, checkpointing: bool = False, self_condition: bool = False,
              heads: int | None = None, levels: list[int] | None = None, **shape):
    """The params.yaml UNet; ``heads`` overrides its attention_head_dim (diffusers' number of heads),
    ``levels`` its attention_levels, ``shape`` any other train_ldm.unet key (block_out_channels, ...)."""
    p = {**PARAMS["train_ldm"]["unet"], **shape}
    unet = build_unet(sample_size=latent, in_channels=LATENT_CHANNELS, block_out_channels=p["block_out_channels"],
                      layers_per_block=p["layers_per_block"], cross_attention_dim=384,
                      attention_head_dim=heads or p["attention_head_dim"], norm_num_groups=p["norm_num_groups"],
                      dropout=p["dropout"], self_condition=self_condition,
                      attention_levels=p["attention_levels"] if levels is None else levels,
                      pooled_condition=p["pooled_condition"]).to(device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def demo_vae(device="cpu"):
    return build_autoencoder(in_channels=1, sample_size=PARAMS["ingest"]["resolution"],
                             **PARAMS["train_vae"]["model"]).to(device)


def fake_data(n: int, latent: int, g) -> LatentPairs:
    return LatentPairs(latent_mean=torch.randn(n, LATENT_CHANNELS, latent, latent, generator=g),
                       latent_std=torch.rand(n, LATENT_CHANNELS, latent, latent, generator=g) * 0.1,
                       scaling_factor=1.0,
                       image_index=torch.arange(n), caption_index=torch.arange(1, n + 1),
                       text_emb=torch.randn(n + 1, 48, 384, generator=g),
                       text_mask=torch.ones(n + 1, 48, dtype=torch.long), uncond_index=0)


def ldm_cfg(steps: int) -> LDMTrainConfig:
    p = {k: PARAMS["train_ldm"][k] for k in LDMTrainConfig.__dataclass_fields__}
    return LDMTrainConfig(**{**p, "steps": steps, "checkpoint_every": 0})


def bare_steps(unet, data: LatentPairs, batch: int, steps: int, device) -> float:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    z = data.latent_mean[:batch].to(device)
    t = torch.randint(1000, (batch,)).to(device)
    emb, mask = data.text_emb[1 : batch + 1].to(device), data.text_mask[1 : batch + 1].to(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.mse_loss(unet(z, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def activation_mb(checkpointing: bool, data: LatentPairs, batch: int, device) -> float:
    """Memory autograd keeps for the backward pass of one LDM step (saved tensors, de-duplicated).

    Unlike process RSS this isolates what gradient checkpointing trades away; on CUDA the
    peak allocated memory of the step is measured as well by the caller.
    """
    unet = demo_unet(LATENT, device, checkpointing).train()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    z = data.latent_mean[:batch].to(device)
    t = torch.randint(1000, (batch,)).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = unet(z, t, encoder_hidden_states=data.text_emb[1 : batch + 1].to(device),
                   encoder_attention_mask=data.text_mask[1 : batch + 1].to(device)).sample
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    out.float().mean().backward()
    return sum(v for k, v in seen.items() if k not in params) / 2**20


def interleaved(steps: dict, rounds: int = 3, per_round: int = 4) -> dict[str, float]:
    """Best seconds per call of each step function, the variants taking turns round by round."""
    for fn in steps.values():
        fn(), fn()  # warm-up: oneDNN picks and caches its kernels on the first calls
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - start) / per_round)
    return {name: min(t) for name, t in times.items()}


def unet_step(heads: int | None, bf16: bool, channels_last: bool, data: LatentPairs, batch: int,
              levels: list[int] | None = None, self_condition: bool = False, **shape):
    """One training step of the params.yaml UNet with the given overrides (``shape``: train_ldm.unet keys), as a
    closure; ``self_condition``: the input carries the previous estimate's channels, as the demo trains."""
    torch.manual_seed(0)
    unet = demo_unet(LATENT, "cpu", heads=heads, levels=levels, self_condition=self_condition, **shape)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    z, t = data.latent_mean[:batch].contiguous(memory_format=fmt), torch.randint(1000, (batch,))
    x = torch.cat([z, z], 1).contiguous(memory_format=fmt) if self_condition else z
    emb, mask = data.text_emb[1 : batch + 1], data.text_mask[1 : batch + 1]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
        loss = F.mse_loss(out.float(), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def vae_step(bf16: bool, channels_last: bool, batch: int):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    vae = demo_vae().to(memory_format=fmt)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = (torch.rand(batch, 1, 64, 64) * 2 - 1).contiguous(memory_format=fmt)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        loss = (recon.float() - x).abs().mean() + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def update_step(fast: bool):
    """The optimizer + EMA update of the UNet after a backward pass: torch's per-parameter loops, or fused
    AdamW with the foreach EMA update (what train_ldm uses)."""
    torch.manual_seed(0)
    unet = demo_unet(LATENT, "cpu", self_condition=True)
    for p in unet.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fast or None)
    ema = EMAModel(unet.parameters(), decay=0.995, foreach=fast)

    def step():
        opt.step()
        ema.step(unet.parameters())
    return step


def classifier_step(fast: bool, batch: int = 32):
    """One training step of the evaluate stage's classifier: as it is, or in its former layout (ReLU before
    the pooling, contiguous tensors)."""
    torch.manual_seed(0)
    model = SmallCNN(1, 9)
    if not fast:
        layers = list(model.features)
        for i in range(0, len(layers), 4):  # conv, bn, pool, relu -> conv, bn, relu, pool
            layers[i + 2], layers[i + 3] = layers[i + 3], layers[i + 2]
        model.features = torch.nn.Sequential(*layers).to(memory_format=torch.contiguous_format)
        model.forward = lambda x: model.head(model.features(x).mean(dim=(2, 3)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 1, 64, 64) * 2 - 1, torch.randint(9, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def vlp_step(channels_last: bool, batch: int = 64):
    """One training step of the evaluate_vlp dual encoder (frozen text features), its image tower contiguous
    (as it is) or channels-last (not adopted: see synthmed/vlp/model.py)."""
    torch.manual_seed(0)
    model = DualEncoder(1, 384, 16, 1, 128)
    if channels_last:
        model.image = model.image.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, text = torch.rand(batch, 1, 64, 64) * 2 - 1, torch.randn(batch, 384)

    def step():
        loss = info_nce(model.embed_images(x), model.embed_texts(text), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def compiled(data: LatentPairs, batch: int, steps: int) -> dict:
    """torch.compile of the UNet in the real training loop: compile seconds and steady-state speed-up."""
    out = {}
    for name in ("eager", "compiled"):
        unet = demo_unet(LATENT, "cpu", self_condition=True)
        if name == "compiled":
            unet.compile()
        start = time.perf_counter()
        train_ldm(unet, make_noise_scheduler(1000), data, ldm_cfg(3), torch.Generator().manual_seed(0))
        first = time.perf_counter() - start
        start = time.perf_counter()
        train_ldm(unet, make_noise_scheduler(1000), data, ldm_cfg(steps), torch.Generator().manual_seed(0))
        out[name] = {"first_3_steps_s": round(first, 1), "s_per_step": round((time.perf_counter() - start) / steps, 4)}
    out["speedup"] = round(out["eager"]["s_per_step"] / out["compiled"]["s_per_step"], 2)
    out["steps_to_repay_compile"] = (round((out["compiled"]["first_3_steps_s"] - out["eager"]["first_3_steps_s"])
                                           / (out["eager"]["s_per_step"] - out["compiled"]["s_per_step"]))
                                     if out["speedup"] > 1 else None)
    return out


SHAPES = {"default": {}, "narrow [32, 32, 64]": {"block_out_channels": [32, 32, 64]},
          "wide [64, 128, 128]": {"block_out_channels": [64, 128, 128]}, "layers_per_block 2": {"layers_per_block": 2},
          "attention_levels [1, 2]": {"attention_levels": [1, 2]}, "pooled condition": {"pooled_condition": True}}


def shapes(data: LatentPairs, batch: int) -> dict:
    """UNet shapes around the default: parameters and seconds per training step (self-conditioned input, as the
    demo trains), so that a recipe search can give each the default's minutes (its steps = default steps / ratio)."""
    times = interleaved({name: unet_step(None, False, False, data, batch, self_condition=True, **shape)
                         for name, shape in SHAPES.items()})
    params = {name: sum(q.numel() for q in demo_unet(LATENT, "cpu", self_condition=True, **shape).parameters())
              for name, shape in SHAPES.items()}
    return {name: {"params_m": round(params[name] / 1e6, 2), "s": round(v, 4),
                   "time_ratio": round(v / times["default"], 2)} for name, v in times.items()}


def levers(data: LatentPairs, batch: int) -> dict:
    """Seconds per step of each variant and its speed-up over the params.yaml default (fp32, contiguous)."""
    heads = PARAMS["train_ldm"]["unet"]["attention_head_dim"]
    unet = interleaved({
        f"heads_{heads}_fp32": unet_step(heads, False, False, data, batch),
        **{f"heads_{h}_fp32": unet_step(h, False, False, data, batch) for h in (8, 4, 2, 1) if h != heads},
        f"heads_{heads}_bf16_autocast": unet_step(heads, True, False, data, batch),
        f"heads_{heads}_channels_last": unet_step(heads, False, True, data, batch),
        **{f"heads_{h}_attention_levels_1": unet_step(h, False, False, data, batch, levels=[1]) for h in (heads, 2)},
    })
    vae = interleaved({"fp32": vae_step(False, False, PARAMS["train_vae"]["batch_size"]),
                       "bf16_autocast": vae_step(True, False, PARAMS["train_vae"]["batch_size"]),
                       "channels_last": vae_step(False, True, PARAMS["train_vae"]["batch_size"])})
    pairs = {"ldm_update": interleaved({"loops": update_step(False), "fused_adamw_foreach_ema": update_step(True)}),
             "classifier_step": interleaved({"relu_pool_contiguous": classifier_step(False),
                                             "pool_relu_channels_last": classifier_step(True)}),
             "vlp_step": interleaved({"contiguous": vlp_step(False), "channels_last": vlp_step(True)})}
    base_u, base_v = unet[f"heads_{heads}_fp32"], vae["fp32"]
    return {"unet_step": {k: {"s": round(v, 4), "speedup": round(base_u / v, 2)} for k, v in unet.items()},
            "vae_step": {k: {"s": round(v, 4), "speedup": round(base_v / v, 2)} for k, v in vae.items()},
            **{name: {"before_s": round(before, 4), "after_s": round(after, 4), "speedup": round(before / after, 2)}
               for name, (before, after) in ((n, tuple(t.values())) for n, t in pairs.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--levers", action="store_true", help="only the speed levers, as ratios (CPU)")
    ap.add_argument("--compile", action="store_true", help="only torch.compile of the UNet (minutes of compiling)")
    ap.add_argument("--shapes", action="store_true", help="only UNet shapes: parameters and time per step")
    args = ap.parse_args()
    device = pick_device()
    g = torch.Generator().manual_seed(0)
    batch = PARAMS["train_ldm"]["batch_size"]
    data = fake_data(256, LATENT, g)
    if args.compile:
        print(json.dumps({"benchmark": "train_compile", "device": device.type, "threads": torch.get_num_threads(),
                          "ldm_batch": batch, **compiled(data, batch, args.steps)}, indent=2))
        return
    if args.shapes:
        print(json.dumps({"benchmark": "train_shapes", "device": device.type, "threads": torch.get_num_threads(),
                          "ldm_batch": batch, "unet_step": shapes(data, batch)}, indent=2))
        return
    if args.levers:
        print(json.dumps({"benchmark": "train_levers", "device": device.type, "threads": torch.get_num_threads(),
                          "ldm_batch": batch, **levers(data, batch)}, indent=2))
        return

    unet = demo_unet(LATENT, device)
    bare_steps(unet, data, batch, 3, device)  # warm-up
    bare = bare_steps(unet, data, batch, args.steps, device)
    unet = demo_unet(LATENT, device)
    train_ldm(unet, make_noise_scheduler(1000), data, ldm_cfg(3), g)  # warm-up
    start = time.perf_counter()
    train_ldm(unet, make_noise_scheduler(1000), data, ldm_cfg(args.steps), g)
    ours = (time.perf_counter() - start) / args.steps
    unet = demo_unet(LATENT, device, self_condition=True)
    start = time.perf_counter()
    train_ldm(unet, make_noise_scheduler(1000), data, ldm_cfg(args.steps), g)
    self_cond = (time.perf_counter() - start) / args.steps

    v = PARAMS["train_vae"]
    vae = demo_vae(device)
    images = torch.rand(256, 1, 64, 64, generator=g) * 2 - 1
    vcfg = VAETrainConfig(**{**{k: v[k] for k in VAETrainConfig.__dataclass_fields__}, "steps": args.steps,
                             "checkpoint_every": 0})
    start = time.perf_counter()
    train_autoencoder(vae, images, vcfg, g)
    vae_step = (time.perf_counter() - start) / args.steps

    print(json.dumps({
        "benchmark": "train", "device": device.type, "threads": torch.get_num_threads(), "steps": args.steps,
        "ldm_batch": batch, "ldm_step_s": round(ours, 4), "bare_step_s": round(bare, 4),
        "trainer_overhead_ratio": round(ours / bare, 3), "target_ratio": 1.15,
        "ldm_images_per_s": round(batch / ours, 1),
        "ldm_images_per_s_self_condition": round(batch / self_cond, 1),
        "vae_batch": v["batch_size"], "vae_step_s": round(vae_step, 4),
        "vae_images_per_s": round(v["batch_size"] / vae_step, 1),
        "ldm_activation_mb": round(activation_mb(False, data, batch, device), 2),
        "ldm_activation_mb_grad_checkpointing": round(activation_mb(True, data, batch, device), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
