"""Decoded images parked on disk until ingest writes them, so that its memory holds metadata, not pixels.

A reader decodes every image before the split is known (splits are assigned over all groups at once), and
20,000 images at 256 px RGB are 3.9 GB of pixels. `PixelSpill.put` appends an image to an unlinked temporary
file beside the output and returns a `Spilled` handle; `Spilled.read` reads it back (`os.pread`: nothing
stays mapped). The file vanishes when the last handle does, killed process included.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np


class PixelSpill:
    def __init__(self, folder: str = ".") -> None:
        # the working directory, not /tmp: the dataset is written there anyway, and /tmp may be memory (tmpfs)
        self.file = tempfile.TemporaryFile(dir=folder, buffering=0)
        self.end = 0

    def put(self, pixels: np.ndarray) -> Spilled:
        data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        os.pwrite(self.file.fileno(), data, self.end)
        self.end += len(data)
        return Spilled(self, self.end - len(data), tuple(pixels.shape))


@dataclass(frozen=True)
class Spilled:
    spill: PixelSpill
    offset: int
    shape: tuple[int, ...]

    def read(self) -> np.ndarray:
        size = int(np.prod(self.shape))
        data = os.pread(self.spill.file.fileno(), size, self.offset)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape)
