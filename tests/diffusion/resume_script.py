"""Run by test_resume.py (the killed run in a subprocess, the others in-process): tiny LDM training with checkpoints, on the default recipe's
random paths: UNet dropout, self-conditioning, augmented views, context dropout, posterior sampling,
EMA, and validation (on the EMA and the raw weights) every 10 steps.

argv: checkpoint_dir output_file [lora | invertible3d] (or train() with them): with `lora`, only a LoRA adapter on the UNet trains
(train_lora); with `invertible3d`, volumes through a volume VAE train the invertible backbone (its dropout masks
replayed when activations are recomputed)
"""

import sys

import pandas as pd
import torch

from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.latents import build_latent_pairs
from synthmed.diffusion.loop import train_ldm, trained_parameters, validation_losses
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.models.lora import LoraParams, add_lora
from synthmed.models.unet import build_unet
from synthmed.text.encoder import TextEncoder
from tests.helpers import tiny_vae, tiny_volume_vae

def train(checkpoint_dir: str, output_file: str, *mode: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    volumes = list(mode) == ["invertible3d"]
    shape = (8, 8, 8) if volumes else (16, 16)
    images = (torch.rand(6, 1, *shape, generator=g) * 200 + 20).to(torch.uint8)
    names = [f"img{i}.png" for i in range(6)]
    pairs = pd.DataFrame({"file_name": names + names[:3], "text": [f"caption {i}" for i in range(9)]})
    vae, encoder = (tiny_volume_vae() if volumes else tiny_vae()).eval(), TextEncoder(max_length=8)
    # as in the stage: the augmentation draws come from the training generator, before training
    train_g = torch.Generator().manual_seed(1)
    data = build_latent_pairs(vae, encoder, pairs, images, names, augment_copies=2, brightness=0.1, contrast=0.1,
                              generator=train_g)
    val = build_latent_pairs(vae, encoder, pairs.iloc[:4], images, names)
    cfg = LDMTrainConfig(steps=30, batch_size=4, grad_accum_steps=1, mixed_precision="no", lr=1e-3, weight_decay=0.01,
                         context_dropout=0.2, sample_posterior=True, grad_clip=1.0, warmup_steps=5, ema_decay=0.9,
                         min_snr_gamma=5.0, checkpoint_every=5, keep_checkpoints=2)
    torch.manual_seed(0)
    unet = build_unet(sample_size=data.latent_mean.shape[-1], in_channels=data.latent_mean.shape[1], block_out_channels=[16, 32],
                      layers_per_block=1, cross_attention_dim=encoder.hidden_size, attention_head_dim=4,
                      norm_num_groups=8, dropout=0.1, self_condition=True, dims=3 if volumes else 2,
                      backbone="invertible" if volumes else "standard")
    if list(mode) == ["lora"]:
        add_lora(unet, LoraParams(rank=2, alpha=4, dropout=0.1), "the tiny UNet")
    sched = make_noise_scheduler(1000)
    log, ema = train_ldm(unet, sched, data, cfg, train_g, checkpoint_dir=checkpoint_dir, fingerprint="run-a", every=10,
                         on_every=lambda step, model, ema: validation_losses(model, ema, sched, val, 5.0))
    raw = {k: v.clone() for k, v in unet.state_dict().items()}
    ema.copy_to(trained_parameters(unet))
    torch.save({"weights": unet.state_dict(), "raw": raw, "log": log}, output_file)


if __name__ == "__main__":
    train(*sys.argv[1:])
