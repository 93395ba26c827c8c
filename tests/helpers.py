"""Small fixtures-as-functions shared by tests: tiny image folders and models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_imagefolder(root: Path, rows: list[tuple[str, str]], size: int = 24, **extra_columns) -> Path:
    """Images with a distinct pattern each plus metadata.csv; extra_columns: name -> list of values."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, _ in rows:
        path = root / name
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    df = pd.DataFrame({"file_name": [r[0] for r in rows], "text": [r[1] for r in rows], **extra_columns})
    df.to_csv(root / "metadata.csv", index=False)
    return root
