"""Contrastive pretraining of the dual encoder on one corpus of (image, caption) pairs.

Every arm (real, synthetic, real + synthetic) trains for the same number of steps from
the same seed: the model's initialisation and the batch-drawing generator depend on the
seed only, so arms differ in their data alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from synthmed.data.dataset import to_model_range
from synthmed.core.progress import progress
from synthmed.core.runtime import pick_device
from synthmed.vlp.model import DualEncoder, info_nce
from synthmed.vlp.text import TextTower


@dataclass
class VLPConfig:
    steps: int
    batch_size: int
    lr: float
    width: int  # image ResNet base width
    depth: int  # basic blocks per ResNet stage
    embed_dim: int
    text_trainable_layers: int  # 0 = frozen text encoder (pooled features computed once)


def distinct_pairs(caption_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the batch's pairs to keep: the first pair of each caption and of each image. A repeated
    caption or image would stand as its own negative in InfoNCE."""
    caps, imgs = caption_ids.tolist(), image_ids.tolist()
    return torch.tensor([i for i in range(len(caps)) if caps[i] not in caps[:i] and imgs[i] not in imgs[:i]])


def pretrain(images: torch.Tensor, captions: list[str], tower: TextTower, cfg: VLPConfig, seed: int,
             desc: str = "vlp", image_of=None) -> tuple[DualEncoder, TextTower, list[float]]:
    """Train a fresh dual encoder on pairs (images[image_of[i]], captions[i]) of uint8 images [N, C, H, W];
    without image_of, pair i is image i.

    Returns the model, the text tower it was trained with (a tuned copy when
    text_trainable_layers > 0, so every arm starts from the same text weights) and the loss log.
    """
    tuned = cfg.text_trainable_layers > 0
    if tuned:
        tower = copy.deepcopy(tower)
    torch.manual_seed(seed)
    device = pick_device()
    model = DualEncoder(images.shape[1], tower.out_features, cfg.width, cfg.depth, cfg.embed_dim).to(device)
    tower.to(device)
    g = torch.Generator().manual_seed(seed)
    unique = sorted(set(captions))
    row = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([row[c] for c in captions])
    image_ids = torch.arange(len(captions)) if image_of is None else torch.as_tensor(image_of, dtype=torch.long)
    if tuned:
        tokens = {k: v.to(device) for k, v in tower.tokenize(unique).items()}
        tower.model.train()
    else:
        cached = tower.pooled(unique).to(device)
    params = list(model.parameters()) + [p for p in tower.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    log = []
    model.train()
    for _ in progress(range(cfg.steps), desc=desc):
        pair = torch.randint(len(captions), (cfg.batch_size,), generator=g)
        keep = distinct_pairs(caption_ids[pair], image_ids[pair])
        cap, img = caption_ids[pair][keep], image_ids[pair][keep]
        feats = tower(tokens["input_ids"][cap], tokens["attention_mask"][cap]) if tuned else cached[cap]
        loss = info_nce(model.embed_images(to_model_range(images[img].to(device))), model.embed_texts(feats),
                        model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_temperature()
        log.append(loss.item())
    tower.model.eval()
    return model.eval(), tower, log
