"""DVC stage `evaluate_vlp`: does pretraining a dual encoder on synthetic pairs match real pairs?

Arms: `real` (real train images with their captions), `synth` (synthetic images with the
captions they were generated from: train/val captions, never test), `real_synth` (both).
Every arm trains for the same steps from the same seeds; each model is then scored on the
real test split by linear probing (with 1 %, 10 %, 100 % of the labelled real train images),
zero-shot classification (one caption per label) and image<->text retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from synthmed.config import as_dict, load_params, require_at_least_one, require_fractions, require_inputs, run_stage
from synthmed.data.dataset import images_of, split_frame, split_mask
from synthmed.data.imagefolder import read_metadata
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, write_metrics, write_text
from synthmed.metrics.augmentation import regime_name, stratified_subset
from synthmed.metrics.stats import summarise_arms
from synthmed.provenance import derive_seed, seed_everything, write_provenance
from synthmed.text.encoder import TextEncoder
from synthmed.vlp.evaluation import image_features, linear_probe, retrieval_recall, zero_shot
from synthmed.vlp.text import TextTower
from synthmed.vlp.train import VLPConfig, pretrain

REAL = "data/ingest/dataset"
SYNTH = "data/generate/dataset"
OUT = "data/evaluate_vlp"


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

    def __post_init__(self):
        require_at_least_one(self, "seeds", "steps", "batch_size", "width", "depth", "embed_dim")
        require_fractions(self, "probe_fractions")


def corpora(p: EvaluateVLPParams, real: tuple[torch.Tensor, list[str]]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Each arm's (images, captions); ``real`` is the real train split's."""
    out = {"real": real}
    if set(p.arms) - {"real"}:
        synth_rows = read_metadata(SYNTH).drop_duplicates("file_name")
        synth_rows = synth_rows[split_mask(synth_rows, p.synthetic_splits)]
        if synth_rows.empty:
            raise PipelineError(f"{SYNTH}/metadata.csv: no synthetic images from {p.synthetic_splits} captions; "
                                "add them to prompts.splits or set evaluate_vlp.arms: [real]")
        synth = (images_of(SYNTH, synth_rows), synth_rows["text"].tolist())
        out.update(synth=synth, real_synth=(torch.cat([out["real"][0], synth[0]]), out["real"][1] + synth[1]))
    return {name: out[name] for name in p.arms}


def evaluate_model(model, tower, p: EvaluateVLPParams, data: dict, rep: int, seed: int) -> dict[str, float]:
    out = {}
    probe = p.probe_fractions if data["train_y"] is not None else []  # unlabelled data: retrieval only
    if probe:
        feats_train = image_features(model, data["train_x"], projected=False)
        feats_test = image_features(model, data["test_x"], projected=False)
    for f in probe:
        rng = np.random.default_rng(derive_seed(seed, "probe", f, rep))
        idx = stratified_subset(data["train_y"], f, rng)
        scores = linear_probe(feats_train[idx], data["train_y"][idx], feats_test, data["test_y"])
        out.update({f"probe_{k}_{regime_name(f)}": v for k, v in scores.items()})
    img_emb = image_features(model, data["test_x"], projected=True)
    with torch.no_grad():
        if data["zs_labels"]:
            class_emb = model.embed_texts(tower.pooled([p.zero_shot_templates[c] for c in data["zs_labels"]]))
            zs = data["zs_mask"]
            out.update({f"zeroshot_{k}": v for k, v in zero_shot(img_emb[zs], class_emb, data["zs_y"]).items()})
        cap_emb = model.embed_texts(tower.pooled(data["test_captions"]))
    out.update(retrieval_recall(img_emb, cap_emb, data["test_caption_index"]))
    return out


def headline(p: EvaluateVLPParams, flat: dict) -> list[str]:
    """The figures `dvc exp show` compares: the gain of adding synthetic pairs where labels are scarcest (linear
    probe; image->text retrieval for unlabelled data), with its p-value."""
    arm = "real_synth" if "real_synth" in p.arms else "synth"
    probe = f"vlp_gain_probe_auc_{regime_name(min(p.probe_fractions))}_{arm}"
    key = probe if probe in flat else f"vlp_gain_i2t_r5_{arm}"
    return [key, f"{key}_p"]


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI per arm and metric; for arms other than `real`, the gain over `real`
    paired by seed with its p-value (flat: vlp_<metric>_<arm>, vlp_gain_<metric>_<arm>[_p])."""
    metrics = [c for c in runs.columns if c not in ("arm", "rep", "pairs")]
    return summarise_arms(runs, ["arm"], metrics, "vlp", lambda grp: {"pairs": int(grp["pairs"].iloc[0])})


def report(table: pd.DataFrame, p: EvaluateVLPParams) -> str:
    def cell(arm, col):
        r = table[(table["arm"] == arm)].iloc[0]
        return f"{r[col]:.3f} ± {r[col + '_ci95']:.3f}"

    fracs = [f for f in map(regime_name, p.probe_fractions) if f"probe_auc_{f}" in table.columns]
    lines = ["# Vision-language pretraining: real vs synthetic pairs", "",
             f"Mean ± 95 % CI over {p.seeds} seeds; every arm trained {p.steps} steps from the same seeds. "
             f"Scores on the real `{p.test_split}` split.", ""]
    if fracs:
        lines += ["## Linear probe (macro AUC / accuracy) by share of labelled real train images", "",
                  "| arm | " + " | ".join(fracs) + " |", "|---|" + "---|" * len(fracs)]
        lines += [f"| {arm} | " + " | ".join(f"{cell(arm, f'probe_auc_{f}')} / {cell(arm, f'probe_acc_{f}')}"
                                             for f in fracs) + " |" for arm in p.arms]
    cols = [c for c in ("zeroshot_acc", "zeroshot_auc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                        "t2i_r10") if c in table.columns]
    title = "Zero-shot classification and retrieval" if "zeroshot_acc" in cols else "Retrieval"
    lines += ["", f"## {title}", "", "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for arm in p.arms:
        lines.append(f"| {arm} | " + " | ".join(cell(arm, c) for c in cols) + " |")
    others = [a for a in p.arms if a != "real"] if "real" in p.arms else []
    gains = [f"probe_auc_{f}" for f in fracs] + [c for c in ("zeroshot_acc", "i2t_r10", "t2i_r10") if c in cols]
    if others and gains:
        lines += ["", "## Paired difference against `real` (mean ± 95 % CI, paired t-test p)", "",
                  "| arm | " + " | ".join(gains) + " |", "|---|" + "---|" * len(gains)]
        for arm in others:
            r = table[table["arm"] == arm].iloc[0]
            lines.append(f"| {arm} | " + " | ".join(
                f"{r[f'gain_{c}']:+.3f} ± {r[f'gain_{c}_ci95']:.3f} (p={r[f'gain_{c}_p']:.2f})" for c in gains) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p, seed = load_params("evaluate_vlp", EvaluateVLPParams)
    if p.test_split in p.synthetic_splits:
        raise PipelineError("params.yaml: evaluate_vlp.synthetic_splits must not contain evaluate_vlp.test_split "
                            "(pretraining on images generated from test captions would leak the test set)")
    require_inputs("evaluate_vlp", REAL, f"{SYNTH}/metadata.csv")
    seed_everything(seed)
    all_train, test_rows = split_frame(REAL, ["train"]), split_frame(REAL, [p.test_split])
    all_train_x = images_of(REAL, all_train)  # pretraining corpus of the real arm, and the probe's images
    classes = sorted(set(all_train["label"]) - {""})
    labelled = len(classes) >= 2
    code = {c: i for i, c in enumerate(classes)}
    has_label = all_train["label"].isin(code).to_numpy(copy=True)
    train_rows = all_train[has_label]
    if labelled:
        test_rows = test_rows[test_rows["label"].isin(code)].reset_index(drop=True)
        if test_rows.empty:
            raise PipelineError(f"{REAL}/metadata.csv: no {p.test_split} image has a label seen in train; "
                                "check the labels or evaluate_vlp.test_split")
    else:  # e.g. ImageCLEF: captions but no labels
        print(f"evaluate_vlp: {len(classes)} label(s) in train: retrieval only (no linear probe or zero-shot)")
    captions = sorted(set(test_rows["text"]))
    zs_labels = [c for c in classes if c in p.zero_shot_templates] if labelled else []
    zs_code = {c: i for i, c in enumerate(zs_labels)}
    data = {
        "train_x": all_train_x[has_label] if labelled else None,
        "train_y": train_rows["label"].map(code).to_numpy() if labelled else None,
        "test_x": images_of(REAL, test_rows),
        "test_y": test_rows["label"].map(code).to_numpy() if labelled else None,
        "test_captions": captions,
        "test_caption_index": test_rows["text"].map({c: i for i, c in enumerate(captions)}).to_numpy(),
        "zs_labels": zs_labels, "zs_mask": test_rows["label"].isin(zs_code).to_numpy(copy=True),
        "zs_y": test_rows["label"][test_rows["label"].isin(zs_code)].map(zs_code).to_numpy(),
    }
    tower = TextTower(TextEncoder(p.text_encoder, p.text_max_length), p.text_trainable_layers)
    rows = []
    for arm, (x, texts) in corpora(p, (all_train_x, all_train["text"].tolist())).items():
        for rep in range(p.seeds):
            model_seed = derive_seed(seed, "vlp", rep) % 2**31  # the same for every arm
            model, tuned, log = pretrain(x, texts, tower, p, model_seed, desc=f"vlp {arm} seed {rep}")
            rows.append({"arm": arm, "rep": rep, "pairs": len(x), "final_loss": float(np.mean(log[-20:])),
                         "temperature": 1 / model.logit_scale.exp().item(),
                         **evaluate_model(model, tuned, p, data, rep, seed)})
    runs = pd.DataFrame(rows)
    table, flat = summarise(runs)
    with atomic_path(f"{OUT}/runs.csv") as tmp:
        runs.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(f"{OUT}/summary.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_text(f"{OUT}/report.md", report(table, p))
    write_provenance(f"{OUT}/provenance.json", stage="evaluate_vlp", params=as_dict(p), seed=seed, inputs=[REAL, SYNTH])
    write_metrics("evaluate_vlp", flat, headline=headline(p, flat))
    print(report(table, p))


if __name__ == "__main__":
    run_stage(main)
