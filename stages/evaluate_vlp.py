"""DVC stage `evaluate_vlp`: does pretraining a dual encoder on synthetic pairs match real pairs?

Arms: `real` (real train images with their captions), `synth` (synthetic images with the
captions they were generated from: train/val captions, never test), `real_synth` (both).
Every arm trains for the same steps from the same seeds; each model is then scored on the
real test split by linear probing (with 1 %, 10 %, 100 % of the labelled real train images),
zero-shot classification (one caption per label) and image<->text retrieval over every caption
of the test images, beside the chance level. Unlabelled data gets retrieval only. Arms are compared
with `real` over the test items, paired (each item's seed-averaged difference; `resamples` draws for
the bootstrap interval and the sign-flip p-value), with the smallest gain this test set can detect.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from synthmed.core.config import require_at_least_one, require_fractions
from synthmed.data.dataset import first_mode
from synthmed.core.errors import PipelineError
from synthmed.core.io import write_csv, write_text
from synthmed.core.provenance import derive_seed, seed_everything
from synthmed.core.stage import Stage, run_stage
from synthmed.text.encoder import TextEncoder
from synthmed.vlp.corpus import Pairs, pairs_of, scoring_set, split_pairs, split_rows
from synthmed.vlp.evaluation import evaluate_model, retrieval_chance
from synthmed.vlp.report import headline, report, summarise
from synthmed.vlp.text import TextTower
from synthmed.vlp.train import VLPConfig, pretrain



@dataclass
class EvaluateVLPParams(VLPConfig):
    test_split: str
    synthetic_splits: list[str]  # synthetic pairs from captions of these splits (never the test split)
    arms: list[Literal["real", "synth", "real_synth"]]
    text_encoder: str
    text_max_length: int
    seeds: int
    probe_fractions: list[float]
    zero_shot_templates: dict[str, str]  # label -> caption; labels without one are left out of zero-shot
    resamples: int  # draws over the test items for each gain's bootstrap interval and sign-flip p-value

    def __post_init__(self):
        require_at_least_one(self, "seeds", "steps", "batch_size", "width", "depth", "embed_dim", "resamples")
        require_fractions(self, "probe_fractions")


def corpora(p: EvaluateVLPParams, real: Pairs, synth_dir: str) -> dict[str, Pairs]:
    """Each arm's pairs; ``real`` is the real train split's."""
    out = {"real": real}
    if set(p.arms) - {"real"}:
        rows = split_rows(synth_dir, p.synthetic_splits, "synthetic")
        rows = first_mode(rows)  # an image-conditioned model's reconstructions, which their source's caption describes
        synth = pairs_of(synth_dir, rows)
        out.update(synth=synth, real_synth=real + synth)
    return {name: out[name] for name in p.arms}


def main(stage: Stage) -> None:
    p, seed = stage.params, stage.seed
    if p.test_split in p.synthetic_splits:
        raise PipelineError("params.yaml: evaluate_vlp.synthetic_splits must not contain evaluate_vlp.test_split "
                            "(pretraining on images generated from test captions would leak the test set)")
    real_dir, synth_dir = stage.dep("ingest/dataset"), stage.dep("generate/dataset")
    seed_everything(seed)
    real = split_pairs(real_dir, ["train"], "real")
    if not any(real.captions):  # label-free data (an image-conditioned model's): no pairs to pretrain on
        write_outputs(stage, pd.DataFrame(), pd.DataFrame(), {}, "# Vision-language pretraining\n\nNot run: the "
                      "dataset has no captions, and a dual encoder learns from (image, caption) pairs.\n")
        print("evaluate_vlp: no captions in the dataset; nothing to pretrain on")
        return
    if real.images.ndim == 5:
        write_outputs(stage, pd.DataFrame(), pd.DataFrame(), {}, "# Vision-language pretraining\n\nNot run: the "
                      "dataset holds volumes, and the dual encoder's image tower is 2-D.\n")
        print("evaluate_vlp: volumes; the dual encoder is 2-D, nothing to pretrain")
        return
    data = scoring_set(real_dir, real, p.test_split, p.zero_shot_templates)
    for note in data.notes:
        print(f"evaluate_vlp: {note}")
    tower = TextTower(TextEncoder(p.text_encoder, p.text_max_length), p.text_trainable_layers)
    rows, items = [], {}
    for arm, pairs in corpora(p, real, synth_dir).items():
        for rep in range(p.seeds):
            model_seed = derive_seed(seed, "vlp", rep) % 2**31  # the same for every arm
            model, tuned, log = pretrain(pairs.images, pairs.captions, tower, p, model_seed,
                                         desc=f"vlp {arm} seed {rep}", image_of=pairs.image_of)
            scores, items[(arm, rep)] = evaluate_model(model, tuned, data, p.probe_fractions,
                                                       p.zero_shot_templates, rep, seed)
            rows.append({"arm": arm, "rep": rep, "pairs": len(pairs), "final_loss": float(np.mean(log[-20:])),
                         "temperature": 1 / model.logit_scale.exp().item(), **scores})
    runs = pd.DataFrame(rows)
    table, flat = summarise(runs, items, p.resamples, seed)
    chance = retrieval_chance(data.positives)
    flat.update({f"vlp_{k}": v for k, v in chance.items()})
    text = report(table, p.arms, p.probe_fractions, p.seeds, p.steps, p.test_split, chance, data.notes,
                  p.resamples)
    write_outputs(stage, runs, table, flat, text)
    print(text)


def write_outputs(stage: Stage, runs: pd.DataFrame, table: pd.DataFrame, flat: dict, text: str) -> None:
    write_csv(stage.out_path("runs.csv"), runs)
    write_csv(stage.out_path("summary.csv"), table)
    write_text(stage.out_path("report.md"), text)
    stage.write_provenance()
    stage.write_metrics(flat, headline=headline(stage.params.arms, stage.params.probe_fractions, flat))


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, EvaluateVLPParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
