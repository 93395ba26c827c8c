"""Deterministic image preprocessing shared by all readers."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Window ``array`` to [low, high] and map it to 0..255."""
    scaled = (np.asarray(array, dtype=np.float64) - low) / max(high - low, 1e-12)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def square(array: np.ndarray, mode: str = "pad") -> np.ndarray:
    """Centre-pad with zeros (keeps the whole field of view) or centre-crop to a square."""
    h, w = array.shape[:2]
    if h == w:
        return array
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return array[top : top + s, left : left + s]
    s = max(h, w)
    out = np.zeros((s, s) + array.shape[2:], dtype=array.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = array
    return out


def resize(array: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of a square uint8 image to ``size`` x ``size``."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.LANCZOS))


def prepare(array: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    return resize(square(array, mode), size)


def prepare_mask(labels: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """A label map (uint8 class indices) through the same square and resize as its image, by nearest
    neighbour: classes are never blended."""
    sq = square(np.asarray(labels, dtype=np.uint8), mode)
    if sq.shape[0] == size:
        return sq
    return np.asarray(Image.fromarray(sq).resize((size, size), Image.Resampling.NEAREST))
