"""The VLP study's data: (image, caption) pairs for pretraining, and the labelled real sets it is scored on.

An image may carry several captions (ImageCLEF: ~10 prompts per image). Every caption is a pair for
pretraining, and every caption of a test image is a positive for retrieval: keeping only the first
one would leave, on such data, a handful of distinct candidates and a meaningless recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from synthmed.data.dataset import image_rows, split_mask
from synthmed.data.disk_array import Rows
from synthmed.data.imagefolder import read_metadata
from synthmed.core.errors import PipelineError


@dataclass
class Pairs:
    images: Rows  # uint8 [N_images, C, H, W], one per distinct image, on disk (read a batch at a time)
    image_of: np.ndarray  # [N_pairs]: the image row of each pair
    captions: list[str]  # [N_pairs]
    files: pd.DataFrame  # one row per distinct image (file_name, label, split, ...)

    def __len__(self) -> int:
        return len(self.captions)

    def __add__(self, other: Pairs) -> Pairs:
        return Pairs(self.images + other.images,
                     np.concatenate([self.image_of, other.image_of + len(self.images)]),
                     self.captions + other.captions, pd.concat([self.files, other.files], ignore_index=True))


def pairs_of(folder: str, rows: pd.DataFrame) -> Pairs:
    """Every (image, caption) row of ``rows`` (metadata rows of ``folder``), each image loaded once."""
    rows = rows.drop_duplicates(["file_name", "text"]).reset_index(drop=True)
    files = rows.drop_duplicates("file_name").reset_index(drop=True)
    index = {name: i for i, name in enumerate(files["file_name"])}
    return Pairs(image_rows(folder, files), rows["file_name"].map(index).to_numpy(), rows["text"].tolist(), files)


def split_rows(folder: str, splits: list[str], what: str) -> pd.DataFrame:
    """The metadata rows of the images in ``splits`` (synthetic images without a split are never used:
    they may come from test captions)."""
    rows = read_metadata(folder)
    rows = rows[split_mask(rows, splits)]
    if rows.empty:
        raise PipelineError(f"{folder}/metadata.csv: no {what} images in split(s) {', '.join(splits)}; "
                            "check prompts.splits and the evaluate_vlp splits")
    return rows


def split_pairs(folder: str, splits: list[str], what: str) -> Pairs:
    return pairs_of(folder, split_rows(folder, splits, what))


@dataclass
class ScoringSet:
    """The real test images with every caption of theirs, plus labels for the linear probe and zero-shot."""

    test: Pairs
    positives: sparse.csr_matrix  # bool [test images, distinct captions]: caption j describes image i
    candidates: list[str]  # the distinct test captions, the retrieval candidates
    classes: list[str] = field(default_factory=list)  # 2+ labels seen in train, else empty (retrieval only)
    probe_x: Rows | None = None  # labelled real train images and their class indices
    probe_y: np.ndarray | None = None
    test_y: np.ndarray | None = None  # class index per test image
    zs_labels: list[str] = field(default_factory=list)  # classes with a zero-shot caption
    notes: list[str] = field(default_factory=list)  # what was left out and why, for the log and the report


def positives_of(pairs: Pairs) -> tuple[sparse.csr_matrix, list[str]]:
    candidates = sorted(set(pairs.captions))
    col = {c: j for j, c in enumerate(candidates)}
    cols = [col[c] for c in pairs.captions]
    # sparse: a test split of 40,000 images with a report each would be 1.6 GB dense
    positives = sparse.csr_matrix((np.ones(len(cols), dtype=bool), (pairs.image_of, cols)),
                                  shape=(len(pairs.images), len(candidates)))
    return positives, candidates


def scoring_set(folder: str, train: Pairs, test_split: str, templates: dict[str, str]) -> ScoringSet:
    """The test split's pairs, restricted to labels seen in train when the data is labelled."""
    classes = sorted(set(train.files["label"]) - {""})
    rows = split_rows(folder, [test_split], "real")
    notes = []
    if len(classes) < 2:
        test = pairs_of(folder, rows)
        notes.append(f"linear probe and zero-shot skipped: {len(classes)} label(s) in the train split (they need "
                     "2 or more); retrieval only")
        positives, candidates = positives_of(test)
        return ScoringSet(test, positives, candidates, notes=notes)
    code = {c: i for i, c in enumerate(classes)}
    rows = rows[rows["label"].isin(code)]
    if rows.empty:
        raise PipelineError(f"{folder}/metadata.csv: no {test_split} image has a label seen in train; "
                            "check the labels or evaluate_vlp.test_split")
    test = pairs_of(folder, rows)
    labelled = train.files["label"].isin(code).to_numpy(copy=True)
    zs = [c for c in classes if c in templates]
    if not zs:
        notes.append(f"zero-shot skipped: none of the {len(classes)} train labels ({', '.join(classes[:5])}"
                     f"{', ...' if len(classes) > 5 else ''}) has a caption in evaluate_vlp.zero_shot_templates; "
                     "add `label: caption` entries")
    elif len(zs) < len(classes):
        missing = [c for c in classes if c not in templates]
        notes.append(f"zero-shot over {len(zs)} of {len(classes)} labels; no caption in "
                     f"evaluate_vlp.zero_shot_templates for: {', '.join(missing)}")
    positives, candidates = positives_of(test)
    return ScoringSet(test, positives, candidates, classes, train.images.subset(labelled),
                      train.files["label"][labelled].map(code).to_numpy(), test.files["label"].map(code).to_numpy(),
                      zs, notes)
