"""Downstream utility: does adding synthetic images help a classifier on real test data?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, width: int = 16):
        super().__init__()
        layers, c = [], in_channels
        for w in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@dataclass
class ClassifierConfig:
    epochs: int
    lr: float
    batch_size: int


def _prep(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def train_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, cfg: ClassifierConfig,
                     seed: int) -> SmallCNN:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    x, y = _prep(images), labels
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def score_classifier(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """Accuracy and macro one-vs-rest AUC over the classes present in the test labels."""
    probs = torch.cat([model(_prep(images[i : i + 256])).softmax(-1) for i in range(0, len(images), 256)]).numpy()
    y = labels.numpy()
    acc = float((probs.argmax(1) == y).mean())
    present = np.unique(y)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
    return {"acc": acc, "auc": float(np.mean(aucs)) if aucs else float("nan")}


def compare_real_vs_augmented(real_x, real_y, synth_x, synth_y, test_x, test_y, n_classes: int,
                              cfg: ClassifierConfig, seeds: list[int]) -> dict[str, float]:
    """Train on real vs real+synthetic with the same seeds; mean/std of each score and the gain."""
    runs = {"real": [], "aug": []}
    aug_x, aug_y = torch.cat([real_x, synth_x]), torch.cat([real_y, synth_y])
    for seed in seeds:
        for name, (x, y) in {"real": (real_x, real_y), "aug": (aug_x, aug_y)}.items():
            runs[name].append(score_classifier(train_classifier(x, y, n_classes, cfg, seed), test_x, test_y, n_classes))
    out = {}
    for name, scores in runs.items():
        for key in ("acc", "auc"):
            values = np.array([s[key] for s in scores])
            out[f"clf_{name}_{key}"] = float(values.mean())
            out[f"clf_{name}_{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    for key in ("acc", "auc"):
        gains = np.array([a[key] - r[key] for a, r in zip(runs["aug"], runs["real"])])
        out[f"clf_gain_{key}"] = float(gains.mean())
    return out
