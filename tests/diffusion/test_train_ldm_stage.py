"""What the train_ldm stage reports and ships."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from synthmed.diffusion.model_card import save_model, summary_line
from synthmed.diffusion.loop import train_loss_metrics
from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.loop import train_ldm
from synthmed.diffusion.schedulers import make_noise_scheduler
from tests.helpers import PLAIN, tiny_unet, tiny_vae, toy_latent_pairs


def test_reported_training_loss_is_named_for_what_it_averages():
    log = [{"step": i, "loss": 1.0 if i < 50 else 0.5} for i in range(149)] + [{"step": 149, "loss": 0.25}]
    metrics = train_loss_metrics(log)
    mean = (99 * 0.5 + 0.25) / 100
    assert metrics == {"train_loss_last100_mean": mean}  # never a bare "final_loss"
    line = summary_line(900, 300, log, {**metrics, "val_loss_ema": 0.3, "val_loss_raw": 0.4})
    assert "last-step loss 0.2500" in line and f"mean of last 100 steps {mean:.4f}" in line
    assert "final loss" not in line
    assert train_loss_metrics(log[:10]) == {"train_loss_last100_mean": 1.0}  # a short run: all its steps


def test_saved_model_carries_the_ema_weights(tmp_path):
    unet, sched = tiny_unet(), make_noise_scheduler(1000)
    cfg = LDMTrainConfig(steps=5, batch_size=4, lr=1e-2, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **{**PLAIN, "ema_decay": 0.7})
    _, ema = train_ldm(unet, sched, toy_latent_pairs(), cfg, torch.Generator().manual_seed(0))
    raw = [p.detach().clone() for p in unet.parameters()]
    pipe = SynthMedPipeline(unet, tiny_vae().eval(), DDIMScheduler.from_config(sched.config), text_max_length=8)
    save_model(pipe, ema, "# card\n", tmp_path / "model")

    saved = list(UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet").parameters())
    assert len(saved) == len(ema.shadow_params) == len(raw)
    assert all(torch.equal(s, e) for s, e in zip(saved, ema.shadow_params))
    assert not all(torch.equal(s, r) for s, r in zip(saved, raw))
    assert (tmp_path / "model" / "README.md").read_text() == "# card\n"
