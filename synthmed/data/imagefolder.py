"""ImageFolder datasets: images plus metadata.csv (file_name,text[,label,group,split])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from synthmed.data.sample import Sample
from synthmed.data.transforms import prepare
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, sha256_bytes

METADATA = "metadata.csv"
REQUIRED = ("file_name", "text")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def read_metadata(folder: str | Path) -> pd.DataFrame:
    path = Path(folder) / METADATA
    if not path.is_file():
        raise PipelineError(f"{path}: not found; an ImageFolder needs a metadata.csv with columns file_name,text")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise PipelineError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)}); "
            "the header must include file_name,text"
        )
    return df


def read_imagefolder(folder: str | Path, *, resolution: int, crop: str = "pad", channels: int = 1) -> list[Sample]:
    """Read and preprocess every image in an ImageFolder; rows of one image merge their captions."""
    folder = Path(folder)
    df = read_metadata(folder)
    meta = folder / METADATA
    samples: dict[str, Sample] = {}
    for row_no, row in enumerate(df.itertuples(index=False), start=2):  # row 1 is the header
        name, text = row.file_name.strip(), row.text.strip()
        where = f"{meta}, row {row_no}"
        if not text:
            raise PipelineError(f"{where}: empty caption for '{name}'; write a caption or drop the row")
        if name in samples:
            samples[name].captions.append(text)
            continue
        path = folder / name
        if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            raise PipelineError(f"{where}: '{name}' has an unsupported extension; use one of {sorted(IMAGE_EXTENSIONS)}")
        if not path.is_file():
            raise PipelineError(f"{where}: image '{name}' not found in {folder}; fix file_name or add the file")
        data = path.read_bytes()
        try:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                pixels = np.asarray(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise PipelineError(f"{where}: cannot decode image '{name}' ({exc}); replace or remove it") from None
        samples[name] = Sample(
            file_name=Path(name).with_suffix(".png").as_posix().replace("/", "__"),
            pixels=prepare(pixels, resolution, crop),
            captions=[text],
            group=getattr(row, "group", "") or name,
            label=getattr(row, "label", ""),
            split=getattr(row, "split", ""),
            source=str(path),
            source_sha256=sha256_bytes(data),
        )
    if not samples:
        raise PipelineError(f"{meta}: no rows; the dataset is empty")
    return list(samples.values())


def write_imagefolder(folder: str | Path, samples: list[Sample], columns: dict[str, list] | None = None) -> pd.DataFrame:
    """Atomically write samples as PNGs plus metadata.csv (one row per image-caption pair)."""
    rows = []
    with atomic_path(folder, is_dir=True) as tmp:
        for s in samples:
            png = tmp / s.file_name
            Image.fromarray(s.pixels).save(png, format="PNG", optimize=False)
            digest = sha256_bytes(png.read_bytes())
            for caption in s.captions:
                rows.append(
                    {"file_name": s.file_name, "text": caption, "label": s.label, "group": s.group,
                     "split": s.split, "sha256": digest, **s.extra}
                )
        df = pd.DataFrame(rows)
        df.to_csv(tmp / METADATA, index=False)
    return df


def load_images(folder: str | Path, file_names: list[str]) -> np.ndarray:
    """Stack images of an ImageFolder as uint8 (N, C, H, W)."""
    arrays = []
    for name in file_names:
        with Image.open(Path(folder) / name) as im:
            a = np.asarray(im)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(arrays)
