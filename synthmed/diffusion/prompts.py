"""What to generate: one row per image, each with a seed of its own.

Prompts come from the captions of held-out images, from a user's prompt file or
from per-label templates. Image k of prompt i gets the seed
derive_seed(global seed, "generate", i, k), so any image can be regenerated alone.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from synthmed.core.errors import PipelineError
from synthmed.core.io import read_table
from synthmed.core.provenance import derive_seed

PROMPT_COLUMNS = ("text", "prompt", "Prompt", "caption")
SPLITS = ("train", "val", "test")
PLAN_COLUMNS = ["prompt_index", "sample_index", "text", "label", "split", "source_file_name", "seed"]


def heldout_prompts(metadata: pd.DataFrame, splits: list[str], source: str) -> pd.DataFrame:
    """Every caption of the images in ``splits``, from the ingest metadata (each image's split is kept).

    Not from the paraphrase table: its `replace_*` strategies drop original captions, which would
    shrink the synthetic pool and confound the comparison of caption strategies.
    """
    src = metadata[metadata["split"].isin(splits)].drop_duplicates(["file_name", "text"])
    if src.empty:
        raise PipelineError(f"{source}: no captions in split(s) {splits}; check prompts.splits")
    return pd.DataFrame({"text": src["text"].to_numpy(), "label": src["label"].to_numpy(),
                         "split": src["split"].to_numpy(), "source_file_name": src["file_name"].to_numpy()})


def file_prompts(path: str | Path) -> pd.DataFrame:
    """A .txt file (one prompt per line) or a .csv/.tsv with a text/prompt column, an optional label and an
    optional split: the split whose captions they are. Without one, evaluation uses the images for
    fidelity only, never for training a downstream model (they may be test captions)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: prompt file not found; set prompts.file to a .txt or .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 (byte offset {exc.start}); re-save the file as UTF-8") from None
    if path.suffix.lower() == ".txt":
        rows = pd.DataFrame({"text": [line.strip() for line in text.splitlines()], "label": "", "split": ""})
        rows["line"] = range(1, len(rows) + 1)
        rows = rows[rows["text"] != ""]  # blank lines separate nothing; skip them
    else:
        header = text.splitlines()[0] if text.strip() else ""
        delimiter = max([",", ";", "\t"], key=header.count)  # ImageCLEF's prompt files are ;-separated
        df = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL,
                         skip_blank_lines=False)  # keep them, so that row numbers are file lines
        column = next((c for c in PROMPT_COLUMNS if c in df.columns), None)
        if column is None:
            raise PipelineError(f"{path}, row 1: no prompt column (found: {', '.join(df.columns)}); "
                                f"name it one of: {', '.join(PROMPT_COLUMNS)}")
        blank = pd.Series("", index=df.index)
        rows = pd.DataFrame({"text": df[column].str.strip(), "label": df.get("label", blank),
                             "split": df.get("split", blank).str.strip()})
        rows["line"] = range(2, len(rows) + 2)
        rows = rows[(df != "").any(axis=1).to_numpy()]  # blank lines
    empty = rows[rows["text"] == ""]
    if len(rows) == 0 or len(empty) == len(rows):
        raise PipelineError(f"{path}: no prompts in the file; add one prompt per row")
    if len(empty):
        raise PipelineError(f"{path}, row {empty['line'].iloc[0]}: empty prompt; remove the row or write a prompt")
    unknown = rows[~rows["split"].isin(["", *SPLITS])]
    if len(unknown):
        raise PipelineError(f"{path}, row {unknown['line'].iloc[0]}: split '{unknown['split'].iloc[0]}' is not one of "
                            f"{', '.join(SPLITS)}; fix it or leave it empty (fidelity only)")
    return rows.drop(columns="line").assign(source_file_name="")


def template_prompts(templates: dict[str, list[str]]) -> pd.DataFrame:
    """label -> captions, e.g. {"axial_superior": ["Superior axial T1 brain MRI slice"]}."""
    rows = [{"text": t, "label": label} for label, texts in templates.items() for t in texts]
    if not rows:
        raise PipelineError("params.yaml: prompts.templates is empty; add label: [caption, ...] entries")
    return pd.DataFrame(rows).assign(split="", source_file_name="")


def expand(prompts: pd.DataFrame, images_per_prompt: int, seed: int) -> pd.DataFrame:
    """One row per image to generate: prompt_index, sample_index, seed, file_name."""
    plan = prompts.loc[prompts.index.repeat(images_per_prompt)].reset_index(drop=True)
    plan.insert(0, "prompt_index", plan.index // images_per_prompt)
    plan.insert(1, "sample_index", plan.index % images_per_prompt)
    plan["seed"] = [derive_seed(seed, "generate", i, k) for i, k in zip(plan["prompt_index"], plan["sample_index"])]
    return plan


IMAGE_MODES = ("reconstruction", "interpolation")


@dataclass
class ImageModesParams:
    """generate.image: what an image-conditioned model renders (the plan's modes)."""
    modes: list[Literal["reconstruction", "interpolation"]]
    fractions: list[float]  # interpolation: r, the partner's share of the embedding, in turn
    interpolation: Literal["slerp", "lerp"]

    def __post_init__(self):
        if not self.modes or set(self.modes) - set(IMAGE_MODES):
            raise ValueError(f"generate.image.modes must list some of {', '.join(IMAGE_MODES)}, got {self.modes}")
        if not self.fractions or not all(0 <= r <= 1 for r in self.fractions):
            raise ValueError(f"generate.image.fractions must be in [0, 1], got {self.fractions}")


def image_plan(plan: pd.DataFrame, modes: list[str], fractions: list[float], seed: int, where: str) -> pd.DataFrame:
    """The plan of an image-conditioned model (DiNO-Diffusion): each row's source image stands in for its
    caption. ``reconstruction``: variants of the source (its embedding; `images_per_prompt` per source);
    ``interpolation``: as many images between the source and a partner of the same label and split, at
    the fractions ``r`` (the partner's share) in turn. Every row keeps its source's label and split."""
    plan = plan.drop_duplicates(["source_file_name", "sample_index"]).reset_index(drop=True)
    if (plan["source_file_name"] == "").any():
        raise PipelineError(f"{where}: rows without a source image; an image-conditioned model generates from "
                            "real images: set prompts.source: heldout")
    parts = []
    if "reconstruction" in modes:
        parts.append(plan.assign(mode="reconstruction", partner_file_name="", r=""))
    if "interpolation" in modes:
        sources = plan.drop_duplicates("source_file_name")
        group = {k: g["source_file_name"].tolist() for k, g in sources.groupby(["split", "label"], sort=False)}
        partners = []
        for row in plan.itertuples():
            pool = [f for f in group[(row.split, row.label)] if f != row.source_file_name]
            if not pool:
                raise PipelineError(f"{where}: label '{row.label}' has one source image in split '{row.split}' "
                                    f"({row.source_file_name}); interpolation needs two of the same label and split: "
                                    "add images, or drop interpolation from generate.image.modes")
            rng = np.random.default_rng(derive_seed(seed, "partner", row.prompt_index, row.sample_index))
            partners.append(pool[int(rng.integers(len(pool)))])
        parts.append(plan.assign(
            mode="interpolation", partner_file_name=partners,
            r=[fractions[i % len(fractions)] for i in range(len(plan))],
            seed=[derive_seed(seed, "interpolation", i, k) for i, k in zip(plan["prompt_index"], plan["sample_index"])]))
    return pd.concat(parts, ignore_index=True)


def read_plan(path: str) -> pd.DataFrame:
    """The plan prompts wrote, its 63-bit seeds exact; one line when the file is not one."""
    plan = read_table(path)
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing or plan.empty:
        raise PipelineError(f"{path}: not a generation plan (missing {missing or 'rows'}); rerun `dvc repro prompts`")
    plan["seed"] = plan["seed"].astype("int64")  # 63-bit seeds, exact
    return plan


def finish_plan(plan: pd.DataFrame, p) -> pd.DataFrame:
    """Each row's image index and the sampler settings (``p``: generate's params), which the metadata records."""
    plan = plan.assign(image_index=range(len(plan)))
    return plan.assign(scheduler=p.scheduler, num_inference_steps=p.num_inference_steps,
                       guidance_scale=p.guidance_scale)
