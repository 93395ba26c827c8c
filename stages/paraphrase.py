"""DVC stage `paraphrase`: augment captions; write the (image, caption) pair table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from synthmed.config import as_dict, load_params, require_inputs, run_stage
from synthmed.data.imagefolder import read_metadata
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, write_json
from synthmed.provenance import write_provenance
from synthmed.text.paraphrase import augment_pairs, make_paraphraser

DATASET = "data/ingest/dataset"
OUT = "data/paraphrase"


@dataclass
class ParaphraseParams:
    backend: Literal["rule", "none", "openai"]
    n_per_caption: int
    strategy: Literal["add", "replace_some", "replace_all"]
    p_replace: float
    splits: list[str]  # which splits get paraphrases; others keep their originals only


def main() -> None:
    p, seed = load_params("paraphrase", ParaphraseParams)
    require_inputs("paraphrase", DATASET)
    pairs = read_metadata(DATASET)
    paraphraser = make_paraphraser(p.backend, seed)
    print(f"paraphrase: backend={paraphraser.name}")
    eligible = pairs["split"].isin(p.splits)
    unique = sorted(pairs.loc[eligible, "text"].unique())
    paraphrases = paraphraser.paraphrase(unique, p.n_per_caption)
    augmented = augment_pairs(pairs[eligible], paraphrases, paraphraser.name, p.strategy, p.p_replace, seed)
    rest = pairs[~eligible].assign(caption_source="original")
    out = pd.concat([augmented, rest], ignore_index=True)
    if out.empty:
        raise PipelineError(f"{DATASET}/metadata.csv: no pairs left after paraphrasing; check paraphrase.splits")
    columns = ["file_name", "text", "caption_source", "split", "label", "group"]
    with atomic_path(f"{OUT}/pairs.csv") as tmp:
        out[columns].to_csv(tmp, index=False)
    write_provenance(f"{OUT}/provenance.json", stage="paraphrase", params=as_dict(p), seed=seed,
                     inputs=[f"{DATASET}/metadata.csv"])
    n_para = sum(len(v) for v in paraphrases.values())
    write_json("metrics/paraphrase.json", {
        "unique_captions_before": int(pairs["text"].nunique()),
        "unique_captions_after": int(out["text"].nunique()),
        "paraphrases_per_caption": n_para / max(len(unique), 1),
        "pairs": len(out),
    })
    print(f"paraphrase: {len(unique)} unique captions -> {n_para} paraphrases; {len(out)} pairs")


if __name__ == "__main__":
    run_stage(main)
