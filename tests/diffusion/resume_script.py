"""Run by test_resume.py in a subprocess: tiny LDM training with checkpoints.

argv: checkpoint_dir output_file
"""

import sys

import torch

from synthmed.diffusion.train import LatentPairs, LDMTrainConfig, make_noise_scheduler, train_ldm
from tests.diffusion.test_train import tiny_unet

if __name__ == "__main__":
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = LatentPairs(
        latent_mean=torch.randn(6, 4, 8, 8, generator=g), latent_std=torch.rand(6, 4, 8, 8, generator=g) * 0.1,
        scaling_factor=0.8, image_index=torch.arange(6), caption_index=torch.arange(1, 7),
        text_emb=torch.randn(7, 5, 384, generator=g), text_mask=torch.ones(7, 5, dtype=torch.long), uncond_index=0,
    )
    cfg = LDMTrainConfig(steps=60, batch_size=4, grad_accum_steps=1, mixed_precision="no", lr=1e-3, weight_decay=0.01, context_dropout=0.1,
                         sample_posterior=True, grad_clip=1.0, warmup_steps=5, ema_decay=0.9, min_snr_gamma=5.0,
                         checkpoint_every=10, keep_checkpoints=2)
    unet = tiny_unet()
    log, ema = train_ldm(unet, make_noise_scheduler(1000), data, cfg, torch.Generator().manual_seed(1),
                         checkpoint_dir=sys.argv[1], fingerprint="run-a")
    ema.copy_to(unet.parameters())
    torch.save({"weights": unet.state_dict(), "log": log}, sys.argv[2])
