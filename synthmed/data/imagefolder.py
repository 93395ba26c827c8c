"""Image–text folders: the ImageFolder convention (metadata.csv / metadata.jsonl) and ImageCLEF.

Readers turn their metadata into `Row`s; `rows_to_samples` then checks them,
decodes every image once (in parallel) and merges the captions of an image.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image

from synthmed.data.decode import IMAGE_EXTENSIONS, DecodeOptions, decode_files, decode_mask
from synthmed.data.problems import Problems, where
from synthmed.data.sample import Sample
from synthmed.data.spill import PixelSpill
from synthmed.core.errors import PipelineError
from synthmed.core.io import MANIFEST, atomic_path, sha256_bytes
from synthmed.core.progress import progress
from synthmed.viz import save_pixels

METADATA = MANIFEST  # the ImageFolder convention's manifest
METADATA_JSONL = "metadata.jsonl"
REQUIRED = ("file_name", "text")
MASKS = "masks"  # the label maps' subfolder of a written dataset
SHARD_ABOVE = 10_000  # images; a larger dataset is written in subfolders (see shard_file_names)
OPTIONAL = ("label", "group", "split", "masks")  # masks: a label map per image (segment scores against it)
_OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}


@dataclass
class Row:
    line: int  # 1-based line in the metadata file (the CSV header is line 1)
    file_name: str
    texts: list[str]
    meta: dict[str, str] = field(default_factory=dict)  # label / group / split when given


def _decode_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PipelineError(f"{path}, row {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); "
                            "re-save the file as UTF-8") from None


def read_csv_rows(path: Path, delimiter: str = ",", columns: dict[str, str] | None = None) -> list[Row]:
    """CSV metadata -> rows; ``columns`` renames the file's columns to file_name/text."""
    text = _decode_text(path)
    header = text.splitlines()[0] if text.strip() else ""
    names = [c.strip() for c in header.split(delimiter)]
    columns = columns or {}
    # no text column: an image collection without captions (label-free; train_ldm.condition: image)
    wanted = list(columns) or ["file_name"]
    missing = [c for c in wanted if c not in names]
    if missing:
        found = [d for d in [",", *_OTHER_DELIMITERS] if d != delimiter and all(c in header.split(d) for c in wanted)]
        if found:
            name = _OTHER_DELIMITERS.get(found[0], "comma")
            raise PipelineError(f"{path}, row 1: the file is {name}-separated ({found[0]!r}) but {delimiter!r} is "
                                f"expected; re-save it with {delimiter!r} as the delimiter")
        raise PipelineError(f"{path}, row 1: missing column(s) {', '.join(missing)} (found: {', '.join(names)}); "
                            f"the header must include {', '.join(wanted)}")
    try:
        df = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: {str(exc).strip()}; quote captions that contain {delimiter!r}") from None
    df = df.rename(columns=columns)
    extra = [c for c in OPTIONAL if c in df.columns]
    texts = df["text"].tolist() if "text" in df.columns else [""] * len(df)
    return [  # column by column: a dict per row would double the peak of a large table
        Row(i + 2, name, [text], {c: v for c, v in zip(extra, values) if v != ""})
        for i, (name, text, *values) in enumerate(zip(df["file_name"].tolist(), texts, *(df[c].tolist() for c in extra)))
    ]


def read_jsonl_rows(path: Path, problems: Problems) -> list[Row]:
    rows = []
    for line_no, line in enumerate(_decode_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            problems.report("malformed_row", f"{where(path, line_no)}: not a JSON object ({exc}); fix the line",
                            file=path, row=line_no)
            continue
        if "file_name" not in rec:
            problems.report("missing_field", f"{where(path, line_no)}: missing file_name; "
                            "every line needs one", file=path, row=line_no)
            continue
        texts = rec.get("text", "")
        texts = texts if isinstance(texts, list) else [texts]
        rows.append(Row(line_no, str(rec["file_name"]), [str(t) for t in texts],
                        {c: str(rec[c]) for c in OPTIONAL if rec.get(c) not in (None, "")}))
    return rows


def read_metadata(folder: str | Path) -> pd.DataFrame:
    """The metadata.csv of a dataset this pipeline wrote (one row per image–caption pair)."""
    return next(metadata_chunks(folder, rows=None))


def metadata_chunks(folder: str | Path, rows: int | None = 50_000) -> Iterator[pd.DataFrame]:
    """read_metadata ``rows`` rows at a time (None: all at once), for a stage whose memory must not grow with
    the number of captions."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise PipelineError(f"{path}: not found; an ImageFolder needs a metadata.csv with columns file_name,text")
    frames = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=rows)
    for df in [frames] if rows is None else frames:
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}; "
                                "the header must include file_name,text")
        yield df


def _normalise(name: str) -> str:
    return PurePosixPath(name.strip().replace("\\", "/")).as_posix()


def rows_to_samples(root: Path, rows: list[Row], meta: Path, opts: DecodeOptions, problems: Problems,
                    workers: int = 0, default_group: str = "image") -> list[Sample]:
    """Check rows, decode each referenced image once, merge captions per image. A collection without any
    caption is valid (label-free: it trains an image-conditioned model); one with some is checked for
    empty ones."""
    by_image: dict[str, list[Row]] = {}
    seen_pairs: dict[tuple[str, str], int] = {}
    captionless = all(not str(t).strip() for row in rows for t in row.texts)
    for row in rows:
        name = _normalise(row.file_name)
        at = where(meta, row.line)
        if not name or name.startswith("../") or PurePosixPath(name).is_absolute():
            problems.report("bad_file_name", f"{at}: file_name {row.file_name!r} must be a path inside {root}",
                            file=meta, row=row.line)
            continue
        texts = [t.strip() for t in row.texts]
        if captionless:
            texts = [""]
        elif not texts or any(not t for t in texts):
            problems.report("empty_caption", f"{at}: empty caption for '{name}'; write a caption or drop the row",
                            file=meta, row=row.line)
            continue
        dup = next((seen_pairs[(name, t)] for t in texts if (name, t) in seen_pairs), None)
        if dup is not None:
            problems.report("duplicate_row", f"{at}: duplicate of row {dup} (same file_name '{name}' and caption); "
                            "remove one of them", file=meta, row=row.line)
            continue
        first = by_image.get(name, [None])[0]
        if first is not None and first.meta != row.meta:
            problems.report("conflicting_rows", f"{at}: '{name}' has label/group/split {row.meta} but row "
                            f"{first.line} says {first.meta}; make them agree", file=meta, row=row.line)
            continue
        seen_pairs.update({(name, t): row.line for t in texts})
        by_image.setdefault(name, []).append(Row(row.line, name, texts, row.meta))

    names = list(by_image)
    spill = PixelSpill()
    samples, used = [], set()
    # closed on the first problem under on_error: fail, which cancels the decoding not yet started
    with contextlib.closing(decode_files([root / n for n in names], opts, workers)) as decoded:
        for name, result in zip(names, decoded):
            rows_of = by_image[name]
            if result.pixels is None:
                line = rows_of[0].line
                problems.report(result.reason, f"{where(meta, line)}: image '{name}': {result.detail}; "
                                f"fix or replace {root / name}, or drop its rows", file=meta, row=line)
                continue
            out = PurePosixPath(name).with_suffix(".png").as_posix().replace("/", "__")
            if out in used:  # a.jpg and a.png would both become a.png
                out = f"{PurePosixPath(out).stem}_{result.source_sha256[:8]}.png"
            used.add(out)
            m = rows_of[0].meta
            mask = None
            if m.get("masks"):
                got = decode_mask(root / _normalise(m["masks"]), root / name, opts)
                if got.pixels is None:
                    line = rows_of[0].line
                    problems.report(got.reason, f"{where(meta, line)}: mask '{m['masks']}' of '{name}': {got.detail}; "
                                    "fix the mask or the masks column, or drop the row", file=meta, row=line)
                    continue
                mask = spill.put(got.pixels)
            samples.append(Sample(
                file_name=out, pixels=spill.put(result.pixels), captions=[t for r in rows_of for t in r.texts],
                group=m.get("group") or (name if default_group == "image" else ""),
                label=m.get("label", ""), split=m.get("split", ""), source=str(root / name),
                source_sha256=result.source_sha256, mask=mask,
            ))
    return samples


def read_imagefolder(folder: str | Path, opts: DecodeOptions, problems: Problems, workers: int = 0) -> list[Sample]:
    """Hugging Face ImageFolder: images plus metadata.csv or metadata.jsonl."""
    folder = Path(folder)
    csv_path, jsonl_path = folder / METADATA, folder / METADATA_JSONL
    if csv_path.is_file() and jsonl_path.is_file():
        raise PipelineError(f"{folder}: both metadata.csv and metadata.jsonl exist; keep one")
    if csv_path.is_file():
        meta, rows = csv_path, read_csv_rows(csv_path)
    elif jsonl_path.is_file():
        meta, rows = jsonl_path, read_jsonl_rows(jsonl_path, problems)
    else:
        raise PipelineError(f"{csv_path}: not found; an ImageFolder needs metadata.csv (file_name,text) "
                            "or metadata.jsonl")
    if not rows:
        raise PipelineError(f"{meta}: no rows; the dataset is empty")
    return rows_to_samples(folder, rows, meta, opts, problems, workers)


def read_imageclef(folder: str | Path, opts: DecodeOptions, problems: Problems, workers: int = 0) -> list[Sample]:
    """ImageCLEFmed MEDVQA-GI: prompt-gt.csv (`Filename;Prompt`) next to images/.

    Filenames often lack their extension; the group is the image, so all prompts
    of one image stay in one split.
    """
    folder = Path(folder)
    meta = folder / "prompt-gt.csv"
    images = folder / "images"
    if not meta.is_file():
        raise PipelineError(f"{meta}: not found; the ImageCLEF layout is prompt-gt.csv next to images/")
    rows = read_csv_rows(meta, delimiter=";", columns={"Filename": "file_name", "Prompt": "text"})
    if not rows:
        raise PipelineError(f"{meta}: no rows; the dataset is empty")
    for row in rows:
        name = row.file_name.strip()
        if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
            row.file_name = next((name + ext for ext in (".jpg", ".jpeg", ".png") if (images / (name + ext)).is_file()),
                                 name + ".jpg")
    return rows_to_samples(images, rows, meta, opts, problems, workers)


def shard_file_names(samples: list[Sample]) -> None:
    """Above SHARD_ABOVE images, put each file in one of 256 subfolders, ``<2 hex digits of the sha256 of its
    name>/<name>`` (about 1,600 files each at 400,000 images): one huge directory is slow to list, copy and
    check (DVC, rsync, file browsers). The ImageFolder convention takes such relative paths in file_name.
    Smaller datasets keep their flat names, so their outputs and hashes do not change."""
    if len(samples) > SHARD_ABOVE:
        for s in samples:
            s.file_name = f"{sha256_bytes(s.file_name.encode())[:2]}/{s.file_name}"


def write_imagefolder(folder: str | Path, samples: list[Sample]) -> pd.DataFrame:
    """Atomically write samples as PNGs (volumes, ``file_name`` ending in .npy: NumPy files) plus
    metadata.csv (one row per image-caption pair); a ``file_name`` may name a subfolder (shard_file_names)."""
    with atomic_path(folder, is_dir=True) as tmp:
        for sub in sorted({PurePosixPath(s.file_name).parent for s in samples} - {PurePosixPath(".")}):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        digests, masks = [], [f"{MASKS}/{s.file_name}" if s.mask is not None else "" for s in samples]
        for s, mask in progress(list(zip(samples, masks)), desc="write"):
            path = tmp / s.file_name
            save_pixels(s.array(), path)
            digests.append(sha256_bytes(path.read_bytes()))
            if mask:
                (tmp / mask).parent.mkdir(parents=True, exist_ok=True)
                save_pixels(s.mask_array(), tmp / mask)
        # one row per caption, column by column (a dict per row would double the peak of a large table)
        image = np.repeat(np.arange(len(samples)), [len(s.captions) for s in samples])
        per_image = {"label": [s.label for s in samples], "group": [s.group for s in samples],
                     "split": [s.split for s in samples], "sha256": digests,
                     **({"masks": masks} if any(masks) else {})}  # the column only where there are masks
        df = pd.DataFrame({"file_name": np.asarray([s.file_name for s in samples], dtype=object)[image],
                           "text": [c for s in samples for c in s.captions],
                           **{k: np.asarray(v, dtype=object)[image] for k, v in per_image.items()}})
        df.to_csv(tmp / METADATA, index=False)
    return df


def decode_pixels(path: Path, data: bytes | None = None) -> np.ndarray:
    """uint8 (C, H, W) of an image file; (1, D, H, W) of a volume (.npy); from ``data`` when its bytes are read."""
    source = io.BytesIO(data) if data is not None else path
    if path.suffix == ".npy":
        return np.load(source, allow_pickle=False)[None]
    with Image.open(source) as im:
        a = np.asarray(im)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_images(folder: str | Path, file_names: list[str]) -> np.ndarray:
    """Stack images of an ImageFolder as uint8 (N, C, H, W); volumes (.npy) as (N, 1, D, H, W)."""
    return np.stack([decode_pixels(Path(folder) / name) for name in file_names])
