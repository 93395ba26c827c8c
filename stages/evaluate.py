"""DVC stage `evaluate`: fidelity (FD/KID on EfficientNet-Lite0 features) and downstream gain."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from synthmed.config import load_params, require_inputs, run_stage
from synthmed.data.dataset import split_images
from synthmed.errors import PipelineError
from synthmed.io import write_json
from synthmed.metrics.downstream import ClassifierConfig, compare_real_vs_augmented
from synthmed.metrics.features import load_effnet_lite0
from synthmed.metrics.fidelity import extract_features, frechet_distance, kernel_distance
from synthmed.provenance import derive_seed, seed_everything
from synthmed.runtime import pick_device

REAL = "data/ingest/dataset"
SYNTH = "data/generate/dataset"


@dataclass
class EvaluateParams:
    fidelity_split: str
    augment_splits: list[str]
    kid_subset_size: int
    kid_subsets: int
    classifier_epochs: int
    classifier_lr: float
    classifier_batch_size: int
    classifier_seeds: int


def fidelity(real_train, real_test, synth, p: EvaluateParams, seed: int) -> dict[str, float]:
    extractor = load_effnet_lite0().to(pick_device())
    f_train, f_test, f_syn = (extract_features(extractor, x) for x in (real_train, real_test, synth))
    out = {"fd_effnet": frechet_distance(f_test, f_syn),
           "fd_effnet_real_train_vs_test": frechet_distance(f_test, f_train)}
    for name, fake in (("kid_effnet", f_syn), ("kid_effnet_real_train_vs_test", f_train)):
        mean, std, size = kernel_distance(f_test, fake, p.kid_subset_size, p.kid_subsets, seed)
        out[name], out[f"{name}_std"] = mean, std
    out["kid_subset_size"] = size
    return out


def downstream(train_rows, real_train, test_rows, real_test, classes, p: EvaluateParams, seed: int) -> dict:
    """Classifier on real train vs real train + synthetic (from augment_splits captions)."""
    aug_rows, synth_aug = split_images(SYNTH, p.augment_splits)
    code = {c: i for i, c in enumerate(classes)}
    # Unlabelled images, and classes unseen in real train, cannot be scored: left out.
    keep = {name: rows["label"].isin(code).to_numpy(copy=True)
            for name, rows in (("train", train_rows), ("test", test_rows), ("aug", aug_rows))}
    as_y = lambda rows: torch.tensor([code[c] for c in rows["label"]])  # noqa: E731
    cfg = ClassifierConfig(p.classifier_epochs, p.classifier_lr, p.classifier_batch_size)
    seeds = [derive_seed(seed, "classifier", i) % 2**31 for i in range(p.classifier_seeds)]
    out = compare_real_vs_augmented(
        real_train[keep["train"]], as_y(train_rows[keep["train"]]), synth_aug[keep["aug"]],
        as_y(aug_rows[keep["aug"]]), real_test[keep["test"]], as_y(test_rows[keep["test"]]), len(classes), cfg, seeds)
    return {**out, "n_synthetic_augment": int(keep["aug"].sum())}


def main() -> None:
    p, seed = load_params("evaluate", EvaluateParams)
    require_inputs("evaluate", REAL, SYNTH)
    if p.fidelity_split in p.augment_splits:
        raise PipelineError("params.yaml: evaluate.augment_splits must not contain evaluate.fidelity_split "
                            "(synthetic images from test captions would leak into classifier training)")
    seed_everything(seed)
    train_rows, real_train = split_images(REAL, ["train"])
    test_rows, real_test = split_images(REAL, [p.fidelity_split])
    fid_rows, synth_fid = split_images(SYNTH, [p.fidelity_split])
    metrics = {"n_real_train": len(real_train), "n_real_test": len(real_test), "n_synthetic_fidelity": len(synth_fid)}
    metrics.update(fidelity(real_train, real_test, synth_fid, p, seed))

    classes = sorted(set(train_rows["label"]) - {""})
    if len(classes) >= 2:
        metrics.update(downstream(train_rows, real_train, test_rows, real_test, classes, p, seed))
    else:  # e.g. ImageCLEF prompts carry no label: there is no classification task to score
        print(f"evaluate: no downstream classifier ({len(classes)} label(s) in the train split; it needs 2+)")
    write_json("metrics/evaluate.json", metrics)
    print("evaluate: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_std")))


if __name__ == "__main__":
    run_stage(main)
