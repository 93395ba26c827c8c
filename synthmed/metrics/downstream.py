"""The downstream classifier: a small CNN, the same training rule for every training set, scored on real test.

The rule: up to ``steps`` minibatch steps (drawn with replacement, so 3 images or 3,000 get the same
budget) with random shifts, blur and intensity jitter, cosine learning rate, and, when real validation images
are given, the weights of the step that scored best on them (early stopping by selection). A run may start
from another run's weights (``init``: synthetic pretraining, then real fine-tuning by the same rule).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from synthmed.data.dataset import to_model_range
from synthmed.data.disk_array import rows_per_batch
from synthmed.core.config import require_at_least_one, require_non_negative
from synthmed.core.runtime import device_of, pick_device


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks, global average pooling, a linear head.

    Pooling comes before the ReLU (the same function: max commutes with a monotone map, and a quarter of
    the ReLU work), and the tensors are channels-last: 1.7x faster per training step on a 2-core CPU
    (`benchmarks/train.py --levers`). Only stride-1 3x3 convolutions: the layout's CPU backward of a 1x1
    stride-2 convolution corrupts memory in torch 2.13 (see synthmed/vlp/model.py), this network's
    layers were checked under MALLOC_CHECK_=3 at 16-64 px, 1 and 3 channels, batches of 2-32."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16):
        super().__init__()
        layers, c = [], in_channels
        for w in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.MaxPool2d(2), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3)))


@dataclass
class ClassifierConfig:
    steps: int  # the same budget for every training set size, so arms compare data, not compute
    lr: float
    batch_size: int
    augment: bool = True  # random shifts (up to 1/16 of the side), brightness/contrast jitter and blur
    blur_sigma: float = 0.0  # augment: Gaussian blur of each image, sigma uniform in [0, blur_sigma] pixels
    val_every: int = 0  # steps between scores on real val; the best-scoring weights are kept. 0 = last step

    def __post_init__(self):  # evaluate.classifier in params.yaml
        require_at_least_one(self, "steps", "batch_size")
        require_non_negative(self, "val_every", "blur_sigma")


def _augment(x: torch.Tensor, g: torch.Generator, blur_sigma: float = 0.0) -> torch.Tensor:
    """Shift each image by up to size/16 pixels (background fill), blur it (sigma uniform in [0, blur_sigma]) and
    jitter its brightness and contrast. No flips: left/right and plane orientation can carry the label."""
    n, _, h, w = x.shape
    pad = max(1, h // 16)
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy, dx = torch.randint(2 * pad + 1, (2, n), generator=g).tolist()
    shifted = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if blur_sigma > 0:
        shifted = _blur(shifted, (torch.rand(n, generator=g) * blur_sigma).to(x.device))
    # drawn on the CPU (``g`` is a CPU generator: the same draws on any device), then moved
    scale = (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)).to(x.device)
    offset = (0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)).to(x.device)
    return ((shifted + 1) * scale - 1 + offset).clamp(-1, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image [n, c, h, w] with its own sigma (pixels; 0 leaves it as it is)."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    d = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (d / sigma.clamp_min(1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return F.conv2d(y, k[:, None, None, :], groups=n * c).reshape(n, c, h, w)


def train_classifier(images, labels: torch.Tensor, n_classes: int, cfg: ClassifierConfig,
                     seed: int, val: tuple | None = None, init: dict | None = None) -> SmallCNN:
    """Train by the module's rule on uint8 ``images`` (a tensor, DiskArray or Rows: each step reads its batch);
    ``val``: real (uint8 images, labels) that pick the kept weights; ``init``: a SmallCNN state dict of the same
    shape to start from (fine-tuning: a fresh optimizer and learning-rate schedule, the same step budget)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = pick_device()
    model = SmallCNN(images.shape[1], n_classes)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    select = val is not None and cfg.val_every > 0 and len(val[1]) > 0
    best, best_state = None, None
    for step in range(1, cfg.steps + 1):
        model.train()
        idx = torch.randint(len(labels), (max(2, cfg.batch_size),), generator=g)  # BatchNorm needs two samples
        x = to_model_range(images[idx].to(device))
        batch = _augment(x, g, cfg.blur_sigma) if cfg.augment else x
        loss = F.cross_entropy(model(batch), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if select and (step % cfg.val_every == 0 or step == cfg.steps):
            model.eval()
            s = score_classifier(model, *val)
            key = (s["bacc"], -s["loss"])  # ties on a small val split go to the lower loss
            if best is None or key > best:
                best, best_state = key, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, images, blur_sigma: float = 0.0) -> np.ndarray:
    """Class probabilities; ``blur_sigma``: of the images blurred that much (pixels) first."""
    n, device = rows_per_batch(images.shape), device_of(model)
    probs = []
    for i in range(0, len(images), n):
        x = to_model_range(images[i : i + n].to(device))
        if blur_sigma > 0:
            x = _blur(x, torch.full((len(x),), blur_sigma, device=device))
        probs.append(model(x).softmax(-1).cpu())
    return torch.cat(probs).numpy()


def score_classifier(model: SmallCNN, images, labels: torch.Tensor, blur_sigma: float = 0.0) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC over the classes present in the labels."""
    probs, y = predict(model, images, blur_sigma), labels.numpy()
    pred = probs.argmax(1)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in np.unique(y) if 0 < (y == c).sum() < len(y)]
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]  # balanced accuracy over present classes
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {"auc": float(np.mean(aucs)) if aucs else float("nan"), "acc": float((pred == y).mean()),
            "bacc": float(np.mean(recalls)), "loss": loss}
