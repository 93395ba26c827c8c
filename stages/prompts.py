"""DVC stage `prompts`: the generation plan, one row per image to generate, each with its own seed.

Prompts are the captions of the images in `prompts.splits` from the ingest metadata (`heldout`;
never the paraphrase table, whose `replace_*` strategies drop originals), a prompt file (`file`, with
an optional split column) or per-label templates (`templates`). Images without a split serve fidelity only. Only the plan is `generate`'s input: editing a prompt
file that the chosen source does not read reruns this cheap stage, not the sampling.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from synthmed.config import as_dict, load_params, require_at_least_one, require_inputs, run_stage
from synthmed.diffusion.prompts import PLAN_COLUMNS, expand, file_prompts, heldout_prompts, template_prompts
from synthmed.io import atomic_path, write_metrics
from synthmed.provenance import write_provenance

METADATA = "data/ingest/dataset/metadata.csv"
OUT = "data/prompts"


@dataclass
class PromptsParams:
    source: Literal["heldout", "file", "templates"]
    splits: list[str]  # heldout: the splits whose captions are prompts (each image keeps its split)
    file: str  # file: .txt (one prompt per line) or .csv with a text/prompt column, optional label and split
    templates: dict[str, list[str]]  # templates: label -> captions
    images_per_prompt: int

    def __post_init__(self):
        require_at_least_one(self, "images_per_prompt")


def main() -> None:
    p, seed = load_params("prompts", PromptsParams)
    if p.source == "heldout":
        require_inputs("prompts", METADATA)
        metadata = pd.read_csv(METADATA, dtype=str, keep_default_na=False)
        prompts, inputs = heldout_prompts(metadata, p.splits, METADATA), [METADATA]
    elif p.source == "file":
        prompts, inputs = file_prompts(p.file), [p.file]
    else:
        prompts, inputs = template_prompts(p.templates), []
    plan = expand(prompts, p.images_per_prompt, seed)
    with atomic_path(f"{OUT}/plan.csv") as tmp:
        plan[PLAN_COLUMNS].astype(str).to_csv(tmp, index=False)  # seeds as text: 63-bit values stay exact
    write_provenance(f"{OUT}/provenance.json", stage="prompts", params=as_dict(p), seed=seed, inputs=inputs)
    write_metrics("prompts", {"prompts": int(plan["prompt_index"].nunique()), "images": len(plan)}, headline=["images"])
    print(f"prompts: {plan['prompt_index'].nunique()} prompts x {p.images_per_prompt} -> {len(plan)} images "
          f"({p.source})")


if __name__ == "__main__":
    sys.exit(run_stage(main))
