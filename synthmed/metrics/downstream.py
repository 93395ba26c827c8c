"""The downstream classifier: a small CNN trained for a fixed number of steps, scored on real test."""

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
    steps: int  # the same budget for every training set size, so arms compare data, not compute
    lr: float
    batch_size: int


def _prep(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def train_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, cfg: ClassifierConfig,
                     seed: int) -> SmallCNN:
    """Minibatches drawn with replacement, so 3 images or 3,000 get the same number of steps."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    x, y = _prep(images), labels
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(x), (max(2, cfg.batch_size),), generator=g)  # BatchNorm needs two samples
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallCNN, images: torch.Tensor) -> np.ndarray:
    return torch.cat([model(_prep(images[i : i + 256])).softmax(-1) for i in range(0, len(images), 256)]).numpy()


def score_classifier(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro one-vs-rest AUC over the classes present in the labels."""
    probs, y = predict(model, images), labels.numpy()
    pred = probs.argmax(1)
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in np.unique(y) if 0 < (y == c).sum() < len(y)]
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]  # balanced accuracy over present classes
    return {"auc": float(np.mean(aucs)) if aucs else float("nan"), "acc": float((pred == y).mean()),
            "bacc": float(np.mean(recalls))}
