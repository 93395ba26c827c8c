"""Zero-shot segmentation from a trained diffusion UNet's self-attention (DiNO-Diffusion's third protocol,
after DiffSeg): record the maps (attention.py), merge them into segments (merge.py), score the segments
against real masks beside two intensity baselines (score.py)."""
