"""DVC stage `evaluate`: fidelity, privacy (memorization audit) and downstream usefulness.

Synthetic images from `fidelity_split` captions are compared with the real images of that
split; synthetic images from `augment_splits` captions (never the test split) are the pool
that augments the classifier. Images from a prompt file or templates carry no split and
serve both. Every image is embedded once (feature cache keyed by pixel sha256, in the local store).
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
from synthmed.io import atomic_path, write_metrics
from synthmed.metrics import augmentation as aug
from synthmed.metrics.downstream import ClassifierConfig, predict, score_classifier, train_classifier
from synthmed.metrics.feature_cache import FeatureCache
from synthmed.metrics.features import load_effnet_lite0
from synthmed.metrics.fidelity import frechet_distance, kernel_distance
from synthmed.metrics.prdc import prdc
from synthmed.metrics.privacy import audit, pixels
from synthmed import store
from synthmed.provenance import derive_seed, seed_everything, write_provenance
from synthmed.runtime import pick_device
from synthmed.viz import image_grid, save_png, to_array

REAL = "data/ingest/dataset"
SYNTH = "data/generate/dataset"
OUT = "data/evaluate"



@dataclass
class PrivacyParams:
    fail_on_violation: bool  # stop the stage when too many synthetic images are near copies
    max_fraction_below_p1: float  # gate: share of synthetic images below the reference's 1st percentile


@dataclass
class ClassifierParams:
    steps: int
    lr: float
    batch_size: int

    def __post_init__(self):
        require_at_least_one(self, "steps", "batch_size")


@dataclass
class AugmentationParams:
    fractions: list[float]  # regimes: stratified fractions of real train
    ratios: list[float]  # real_synth arms: synthetic images per real image
    arms: list[Literal["real_synth", "synth"]]  # beside the real-only control
    seeds: int

    def __post_init__(self):
        require_at_least_one(self, "seeds")
        require_fractions(self, "fractions")
        if not all(r > 0 for r in self.ratios):
            raise ValueError(f"augmentation.ratios must be positive, got {self.ratios}")


@dataclass
class EvaluateParams:
    fidelity_split: str
    augment_splits: list[str]
    kid_subset_size: int
    kid_subsets: int
    prdc_k: int
    inception_weights: str  # "" = skip; a local pt_inception-2015-12-05 state dict -> fid_inception, is_inception
    privacy: PrivacyParams
    classifier: ClassifierParams
    augmentation: AugmentationParams

    def __post_init__(self):
        require_at_least_one(self, "prdc_k", "kid_subset_size", "kid_subsets")


def fidelity(feat: dict, p: EvaluateParams, seed: int) -> dict[str, float]:
    """FD/KID/PRDC of synthetic vs real test, each beside real train vs real test.

    The real reference is a seeded random subset of train as large as the synthetic set:
    FD and PRDC depend on sample size, so only equal sizes compare.
    """
    n = min(len(feat["synth_fid"]), len(feat["train"]))
    pick = np.sort(np.random.default_rng(derive_seed(seed, "fidelity_reference")).choice(len(feat["train"]), n,
                                                                                           replace=False))
    out = {"n_real_reference": n}
    for suffix, fake in (("", feat["synth_fid"]), ("_real_train_vs_test", feat["train"][pick])):
        out[f"fd_effnet{suffix}"] = frechet_distance(feat["test"], fake)
        mean, std, size = kernel_distance(feat["test"], fake, p.kid_subset_size, p.kid_subsets, seed)
        out[f"kid_effnet{suffix}"], out[f"kid_effnet{suffix}_std"] = mean, std
        out.setdefault("kid_subset_size", size)
        try:
            out.update({f"{k}{suffix}": v for k, v in prdc(feat["test"], fake, p.prdc_k).items()})
        except ValueError as exc:
            raise PipelineError(f"params.yaml: evaluate: {exc}; lower evaluate.prdc_k or raise "
                                "prompts.images_per_prompt") from None
    return out


def per_label_prdc(feat: dict, test_rows, fid_rows, k: int) -> pd.DataFrame:
    """PRDC per label, for labels with more than k real and synthetic images."""
    rows = []
    for label in sorted(set(test_rows["label"]) & set(fid_rows["label"]) - {""}):
        real = (test_rows["label"] == label).to_numpy(copy=True)
        fake = (fid_rows["label"] == label).to_numpy(copy=True)
        if real.sum() > k and fake.sum() > k:
            rows.append({"label": label, "n_real": int(real.sum()), "n_synthetic": int(fake.sum()),
                         **prdc(feat["test"][real], feat["synth_fid"][fake], k)})
    return pd.DataFrame(rows)


def inception_metrics(path: str, real_test, synth_fid) -> dict[str, float]:
    from synthmed.metrics.inception import PoolAndLogits, inception_score, load_fid_inception

    cache = FeatureCache(store.cache_dir("features") / "fid_inception.pt", PoolAndLogits(load_fid_inception(path)).to(pick_device()))
    f_test, f_syn = cache(real_test), cache(synth_fid)
    cache.save()
    is_mean, is_std = inception_score(f_syn[:, 2048:])
    return {"fid_inception": frechet_distance(f_test[:, :2048], f_syn[:, :2048]), "is_inception": is_mean,
            "is_inception_std": is_std}


def privacy(feat: dict, images: dict, rows: dict, p: PrivacyParams) -> tuple[dict, str | None]:
    table, summary = audit({
        "feature": (feat["synth"], feat["train"], feat["test"]),
        "pixel": (pixels(images["synth"]), pixels(images["train"]), pixels(images["test"])),
    })
    # the 8 synthetic images closest to a training image (pixel space), each beside that image
    tiles, captions = [], []
    for i, r in table.nsmallest(8, "nn_distance_pixel").iterrows():
        tiles += [to_array(images["synth"][i]), to_array(images["train"][int(r["nn_train_index_pixel"])])]
        captions += [f"synthetic, d={r['nn_distance_pixel']:.2f}", "nearest train image"]
    table.insert(0, "file_name", rows["synth"]["file_name"].to_numpy())
    table.insert(1, "text", rows["synth"]["text"].to_numpy())
    for space in ("feature", "pixel"):
        table[f"nn_train_index_{space}"] = rows["train"]["file_name"].to_numpy()[table[f"nn_train_index_{space}"]]
    table = table.rename(columns=lambda c: c.replace("nn_train_index", "nn_train_file"))
    with atomic_path(f"{OUT}/memorization.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    save_png(image_grid(tiles, captions, ncol=8, caption_lines=2), f"{OUT}/closest_pairs.png")
    summary["mem_flagged"] = int(table["flagged"].sum())
    worst = max(summary["mem_frac_below_p1_feature"], summary["mem_frac_below_p1_pixel"])
    violation = None
    if p.fail_on_violation and worst > p.max_fraction_below_p1:
        violation = (f"privacy gate: {worst:.1%} of synthetic images are closer to a training image than 99 % of "
                     f"real test images are (limit {p.max_fraction_below_p1:.1%}); see {OUT}/memorization.csv "
                     f"and {OUT}/closest_pairs.png")
    return summary, violation


def downstream(images: dict, rows: dict, classes, p: EvaluateParams, seed: int) -> dict:
    """Augmentation regimes x arms over seeds, and prompt adherence of the synthetic images."""
    code = {c: i for i, c in enumerate(classes)}
    train_y, test_y, pool_y, synth_y = (torch.tensor([code.get(c, -1) for c in rows[k]["label"]])
                                        for k in ("train", "test", "pool", "synth"))
    # Unlabelled images and classes unseen in real train cannot be scored: left out.
    tr, te, po = train_y >= 0, test_y >= 0, pool_y >= 0
    if not te.any():
        raise PipelineError(f"{REAL}/metadata.csv: no {p.fidelity_split} image has a label seen in train; the "
                            "classifier cannot be scored (check the labels or evaluate.fidelity_split)")
    real_x, real_y, test_x, test_y = images["train"][tr], train_y[tr], images["test"][te], test_y[te]
    pool_x, pool_y = images["pool"][po], pool_y[po]
    a, cfg = p.augmentation, ClassifierConfig(p.classifier.steps, p.classifier.lr, p.classifier.batch_size)
    arms = a.arms if len(pool_x) else []
    if a.arms and not arms:
        print(f"evaluate: no labelled synthetic images from {p.augment_splits} captions; real-only arm only")
    cells = aug.plan_cells(real_y.numpy(), len(pool_x), a.fractions, a.ratios, arms, a.seeds, seed)
    short = [c for c in cells if len(c.synth_idx) < c.synth_requested]
    if short:
        print(f"evaluate: {len(short)} cell(s) asked for more synthetic images than the pool has ({len(pool_x)}); "
              "they use the whole pool (n_synth in augmentation.csv). Raise prompts.images_per_prompt")
    runs = aug.run_cells(cells, real_x, real_y, pool_x, pool_y, test_x, test_y, len(classes), cfg)
    table, flat = aug.summarise(runs)
    with atomic_path(f"{OUT}/augmentation_runs.csv") as tmp:
        runs.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(f"{OUT}/augmentation.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    aug.plot(table, f"{OUT}/augmentation.png")

    # Prompt adherence: classifiers trained on all real train images label the synthetic ones.
    full = {c.rep: c.model for c in cells if c.regime == aug.regime_name(1.0) and c.arm == "real"}
    synth_x, labelled = images["synth"], synth_y >= 0
    if not labelled.any():
        return {**flat, "n_synthetic_pool": len(pool_x)}
    hits, real_acc = [], []
    for rep in range(a.seeds):
        model = full.get(rep) or train_classifier(real_x, real_y, len(classes), cfg, aug.classifier_seed(seed, rep))
        hits.append(float((predict(model, synth_x[labelled]).argmax(1) == synth_y[labelled].numpy()).mean()))
        real_acc.append(score_classifier(model, test_x, test_y)["acc"])
    return {**flat, "adherence_acc": sum(hits) / len(hits), "adherence_real_test_acc": sum(real_acc) / len(real_acc),
            "n_synthetic_pool": len(pool_x)}


def headline(p: EvaluateParams) -> list[str]:
    """The figures `dvc exp show` compares: fidelity beside its real-vs-real scale, privacy, adherence and the
    augmentation gain where synthetic data should matter most (least real data, most synthetic)."""
    cell = f"{aug.regime_name(min(p.augmentation.fractions))}_{aug.ratio_name(max(p.augmentation.ratios))}"
    return ["fd_effnet", "fd_effnet_real_train_vs_test", "kid_effnet", "kid_effnet_real_train_vs_test", "precision",
            "recall", "mem_frac_below_p1_feature", "adherence_acc", f"aug_gain_auc_{cell}", f"aug_gain_auc_{cell}_p"]


def main() -> None:
    p, seed = load_params("evaluate", EvaluateParams)
    if p.fidelity_split in p.augment_splits:
        raise PipelineError("params.yaml: evaluate.augment_splits must not contain evaluate.fidelity_split "
                            "(synthetic images from test captions would leak into classifier training)")
    require_inputs("evaluate", REAL, f"{SYNTH}/metadata.csv")
    seed_everything(seed)
    rows = {"train": split_frame(REAL, ["train"]), "test": split_frame(REAL, [p.fidelity_split]),
            "synth": read_metadata(SYNTH).drop_duplicates("file_name").reset_index(drop=True)}
    fid_mask, pool_mask = split_mask(rows["synth"], [p.fidelity_split]), split_mask(rows["synth"], p.augment_splits)
    if not fid_mask.any():
        raise PipelineError(f"{SYNTH}/metadata.csv: no synthetic images from {p.fidelity_split} captions; add "
                            f"{p.fidelity_split} to prompts.splits or set evaluate.fidelity_split")
    rows["pool"] = rows["synth"][pool_mask]
    images = {"train": images_of(REAL, rows["train"]), "test": images_of(REAL, rows["test"]),
              "synth": images_of(SYNTH, rows["synth"])}
    images["pool"] = images["synth"][pool_mask]

    cache = FeatureCache(store.cache_dir("features") / "effnet_lite0.pt", load_effnet_lite0().to(pick_device()))
    feat = {"train": cache(images["train"]), "test": cache(images["test"]), "synth": cache(images["synth"])}
    cache.save()
    feat["synth_fid"] = feat["synth"][fid_mask]
    fid_rows = rows["synth"][fid_mask].reset_index(drop=True)
    metrics = {"n_real_train": len(rows["train"]), "n_real_test": len(rows["test"]), "n_synthetic": len(rows["synth"]),
               "n_synthetic_fidelity": int(fid_mask.sum())}
    metrics.update(fidelity(feat, p, seed))
    with atomic_path(f"{OUT}/per_label.csv") as tmp:
        per_label_prdc(feat, rows["test"], fid_rows, p.prdc_k).to_csv(tmp, index=False, float_format="%.6g")
    if p.inception_weights:
        metrics.update(inception_metrics(p.inception_weights, images["test"], images["synth"][fid_mask]))
    mem, violation = privacy(feat, images, rows, p.privacy)
    metrics.update(mem)

    classes = sorted(set(rows["train"]["label"]) - {""})
    if len(classes) >= 2:
        metrics.update(downstream(images, rows, classes, p, seed))
    else:  # e.g. ImageCLEF prompts carry no label: there is no classification task to score
        print(f"evaluate: no downstream classifier ({len(classes)} label(s) in the train split; it needs 2+)")
    write_provenance(f"{OUT}/provenance.json", stage="evaluate", params=as_dict(p), seed=seed, inputs=[REAL, SYNTH])
    write_metrics("evaluate", metrics, headline=headline(p))
    print(f"evaluate: {cache.computed} new images embedded; " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("aug_") and not k.endswith("_std")))
    if violation:
        raise PipelineError(violation)


if __name__ == "__main__":
    run_stage(main)
