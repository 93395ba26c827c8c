"""The unit every reader yields: one preprocessed image with its captions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthmed.data.spill import Spilled


@dataclass
class Sample:
    file_name: str  # name inside the output ImageFolder, e.g. "axial_z+012.png"
    pixels: np.ndarray | Spilled  # uint8, (H, W) or (H, W, 3), already at the target resolution
    captions: list[str]
    group: str  # leakage unit: splits never cut a group
    label: str = ""
    split: str = ""  # empty: assigned by the splitter
    source: str = ""  # where it came from (path or generator description)
    source_sha256: str = ""
    mask: np.ndarray | Spilled | None = None  # uint8 class indices, the pixels' shape (masks column; the demo's tissues)

    def array(self) -> np.ndarray:
        """The pixels, read back from disk where the reader spilled them."""
        return self.pixels.read() if isinstance(self.pixels, Spilled) else self.pixels

    def mask_array(self) -> np.ndarray | None:
        return self.mask.read() if isinstance(self.mask, Spilled) else self.mask
