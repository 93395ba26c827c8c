"""Pictures people look at: image grids with captions, loss curves."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from synthmed.core.io import atomic_path


def is_volume(a: np.ndarray) -> bool:
    """(D, H, W) greyscale volume, not an (H, W, 3|4) colour image (volumes are at least 8 voxels a side)."""
    return a.ndim == 3 and a.shape[-1] not in (3, 4)


def central_planes(volume: np.ndarray) -> np.ndarray:
    """A (D, H, W) volume shown as its three central planes side by side: axial | coronal | sagittal, each
    with superior (or anterior) up, for volumes stored RAS (ingest's orientation: axes x, y, z)."""
    x, y, z = (s // 2 for s in volume.shape)
    planes = [volume[:, :, z], volume[:, y, :], volume[x, :, :]]
    side = max(volume.shape)
    tiles = [np.pad(np.rot90(p), [(0, side - p.shape[1]), (0, side - p.shape[0])]) for p in planes]
    gap = np.zeros((side, 1), dtype=volume.dtype)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


def image_grid(images: list[np.ndarray], captions: list[str] | None = None, ncol: int = 8,
               scale: int = 2, caption_lines: int = 4) -> Image.Image:
    """Tile uint8 images (H, W[, 3]) in rows of ``ncol``; optional wrapped captions beneath. A volume
    (D, H, W) becomes a tile of its three central planes."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    images = [central_planes(a) if is_volume(a) else a for a in images]
    h, w = images[0].shape[:2]
    tw, th = w * scale, h * scale
    font = ImageFont.load_default()
    line_h = 11
    cap_h = caption_lines * line_h + 4 if captions else 0
    width_chars = max(8, tw // 6)
    ncol = min(ncol, len(images))
    nrow = -(-len(images) // ncol)
    canvas = Image.new("RGB", (ncol * tw, nrow * (th + cap_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        x, y = c * tw, r * (th + cap_h)
        tile = Image.fromarray(img).convert("RGB").resize((tw, th), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], width_chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x + 2, y + th + 2 + j * line_h), line, fill="black", font=font)
    return canvas


def save_pixels(pixels: np.ndarray, path: Path) -> None:
    """The one image writer: uint8 pixels losslessly, by ``path``'s suffix: a volume (D, H, W) as .npy, an image
    as PNG. Dataset files go through it inside an atomic folder, figures through save_png."""
    if path.suffix == ".npy":
        # np.save's bytes are a function of dtype, shape and values: same voxels, same hash
        np.save(path, np.ascontiguousarray(pixels, dtype=np.uint8), allow_pickle=False)
    else:
        Image.fromarray(pixels).save(path, format="PNG", optimize=False)


def save_png(image, path: str | Path) -> None:
    """A picture (a PIL image or uint8 pixels) as PNG at ``path``, atomically."""
    with atomic_path(path) as tmp:
        save_pixels(np.asarray(image), tmp)


def save_figure(fig, path: str | Path | None = None) -> bytes | None:
    """A matplotlib figure as PNG (110 dpi) at ``path``, atomically, or as bytes without one; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        if path is None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            return buf.getvalue()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        return None
    finally:
        plt.close(fig)


def to_array(image) -> np.ndarray:
    """uint8 tensor/array [C, H, W] -> [H, W] (C == 1) or [H, W, 3] for PIL; a volume [1, D, H, W] -> [D, H, W]."""
    a = np.asarray(image)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def load_png(path: str | Path) -> np.ndarray:
    """An image file, or a volume's .npy, as a uint8 array."""
    return np.load(path) if str(path).endswith(".npy") else np.asarray(Image.open(path))
