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

from synthmed.core.config import require_at_least_one
from synthmed.diffusion.prompts import PLAN_COLUMNS, expand, file_prompts, heldout_prompts, template_prompts
from synthmed.core.io import read_table, write_csv
from synthmed.core.stage import Stage, run_stage


@dataclass
class PromptsParams:
    source: Literal["heldout", "file", "templates"]
    splits: list[str]  # heldout: the splits whose captions are prompts (each image keeps its split)
    file: str  # file: .txt (one prompt per line) or .csv with a text/prompt column, optional label and split
    templates: dict[str, list[str]]  # templates: label -> captions
    images_per_prompt: int

    def __post_init__(self):
        require_at_least_one(self, "images_per_prompt")


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    if p.source == "heldout":
        metadata = stage.dep("ingest/dataset/metadata.csv")
        prompts, inputs = heldout_prompts(read_table(metadata), p.splits, metadata), [metadata]
    elif p.source == "file":
        prompts, inputs = file_prompts(p.file), [p.file]
    else:
        prompts, inputs = template_prompts(p.templates), []
    plan = expand(prompts, p.images_per_prompt, seed)
    write_csv(stage.out_path("plan.csv"), plan[PLAN_COLUMNS].astype(str))  # seeds as text: 63-bit values stay exact
    stage.write_provenance(inputs)
    stage.write_metrics({"prompts": int(plan["prompt_index"].nunique()), "images": len(plan)}, headline=["images"])
    print(f"prompts: {plan['prompt_index'].nunique()} prompts x {p.images_per_prompt} -> {len(plan)} images "
          f"({p.source})")


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, PromptsParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
