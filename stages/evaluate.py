"""DVC stage `evaluate`: fidelity, privacy (memorization audit) and downstream usefulness.

Synthetic images from `fidelity_split` captions are compared with the real images of that
split; synthetic images from `augment_splits` captions (never the test split) are the pool
that augments the classifier. Images from a prompt file without a split column or from
templates may come from test captions: they serve fidelity only. Every image is embedded once (feature cache keyed by pixel sha256, in the local store).

An image-conditioned model's images come in generation modes (metadata `mode`: reconstruction,
interpolation): each mode is scored on its own, the first one's figures under the plain names (as a text
model's), the others' with the mode appended (`fd_effnet_interpolation`, augmentation arm `1x_interpolation`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from synthmed.config import (as_dict, load_params, require_at_least_one, require_fractions, require_inputs,
                             require_non_negative, run_stage)
from synthmed.data.dataset import image_rows, mode_mask, modes_of, split_frame, split_mask
from synthmed.data.imagefolder import read_metadata
from synthmed.errors import PipelineError
from synthmed.io import atomic_path, write_metrics
from synthmed.metrics import augmentation as aug
from synthmed.metrics.downstream import ClassifierConfig
from synthmed.metrics.feature_cache import FeatureCache
from synthmed.metrics.features import load_effnet_lite0
from synthmed.metrics.fidelity import fidelity_with_reference, frechet_distance, per_label_prdc
from synthmed.metrics.privacy import PixelSpace, closest_pairs, gate, memorization_table
from synthmed.metrics.volumes import PlaneFeatures, nearest_volume_metrics, plane_frechet
from synthmed import store
from synthmed.provenance import seed_everything, write_provenance
from synthmed.runtime import pick_device
from synthmed.viz import image_grid, save_png, to_array

REAL = "data/ingest/dataset"
SYNTH = "data/generate/dataset"
OUT = "data/evaluate"



@dataclass
class PrivacyParams:
    fail_on_violation: bool  # stop the stage when too many synthetic images are near copies
    max_fraction_below_p1: float  # gate: share of synthetic images below the reference's 1st percentile
    pixel_resolution: int  # pixel-space distances at this side (area-averaged down from larger images); 0 = native

    def __post_init__(self):
        require_non_negative(self, "pixel_resolution")


@dataclass
class ClassifierParams:
    steps: int
    lr: float
    batch_size: int
    augment: bool
    val_every: int  # 0 = keep the last step's weights

    def __post_init__(self):
        require_at_least_one(self, "steps", "batch_size")
        require_non_negative(self, "val_every")


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


def inception_metrics(path: str, real_test, synth_fid) -> dict[str, float]:
    from synthmed.metrics.inception import PoolAndLogits, inception_score, load_fid_inception

    cache = FeatureCache(store.cache_dir("features") / "fid_inception.pt", PoolAndLogits(load_fid_inception(path)).to(pick_device()))
    f_test, f_syn = cache(real_test), cache(synth_fid)
    cache.save()
    is_mean, is_std = inception_score(f_syn[:, 2048:])
    return {"fid_inception": frechet_distance(f_test[:, :2048], f_syn[:, :2048]), "is_inception": is_mean,
            "is_inception_std": is_std}


def privacy(feat: dict, images: dict, rows: dict, p: PrivacyParams) -> tuple[dict, str | None]:
    """Memorization table and the closest pairs figure, per generation mode; the gate's message when armed
    and exceeded in any mode."""
    space = {k: {"feature": feat[k], "pixel": PixelSpace(images[k], p.pixel_resolution)} for k in ("train", "test")}
    tables, summary, verdicts = [], {"mem_pixel_side": space["train"]["pixel"].side}, []
    for mode, suffix in modes_of(rows["synth"]).items():
        sel = mode_mask(rows["synth"], mode)
        synth = {"feature": feat["synth"][sel], "pixel": PixelSpace(images["synth"].subset(sel), p.pixel_resolution)}
        table, mode_summary = memorization_table(synth, space["train"], space["test"], rows["synth"][sel],
                                                 rows["train"]["file_name"])
        tables.append(table.assign(mode=mode) if suffix or "mode" in rows["synth"] else table)
        summary.update({k + suffix: v for k, v in mode_summary.items()})
        verdicts.append(gate(mode_summary, p.max_fraction_below_p1) if p.fail_on_violation else None)
    table = pd.concat(tables, ignore_index=True)
    with atomic_path(f"{OUT}/memorization.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    tiles, captions = [], []
    synth_row = {name: i for i, name in enumerate(rows["synth"]["file_name"])}
    for i, j, d in closest_pairs(table, rows["train"]["file_name"].tolist()):
        tiles += [to_array(images["synth"][synth_row[table["file_name"].iloc[i]]]), to_array(images["train"][j])]
        captions += [f"synthetic, d={d:.2f}", "nearest train image" + (" (not its source)" if "mode" in table else "")]
    save_png(image_grid(tiles, captions, ncol=8, caption_lines=2), f"{OUT}/closest_pairs.png")
    verdict = next((v for v in verdicts if v), None)
    return summary, verdict and f"{verdict}; see {OUT}/memorization.csv and {OUT}/closest_pairs.png"


def downstream(images: dict, rows: dict, p: EvaluateParams, seed: int) -> dict:
    """The augmentation study (one set of synthetic arms per generation mode) and prompt adherence; for
    unlabelled data or volumes, empty tables and a figure that says why (DVC declares them as outputs, and
    every input kind runs the whole DAG)."""
    classes = sorted(set(rows["train"]["label"]) - {""})
    volumes = images["train"].ndim == 5
    if len(classes) >= 2 and not volumes:
        sets = {k: (images[k], aug.encode(rows[k]["label"], classes)) for k in ("train", "val", "pool", "test", "synth")}
        if not (sets["test"][1] >= 0).any():
            raise PipelineError(f"{REAL}/metadata.csv: no {p.fidelity_split} image has a label seen in train; the "
                                "classifier cannot be scored (check the labels or evaluate.fidelity_split)")
        modes = modes_of(rows["synth"])
        pools = {m: aug.subset(sets["pool"], mode_mask(rows["pool"], m)) for m in modes}
        a, cfg = p.augmentation, ClassifierConfig(**as_dict(p.classifier))
        study = aug.run_study(sets["train"], pools, sets["test"], len(classes), a.fractions, a.ratios, a.arms,
                              a.seeds, cfg, seed, val=sets["val"])
        metrics = dict(study.flat)
        for mode, suffix in modes.items():
            synth = aug.subset(sets["synth"], mode_mask(rows["synth"], mode))
            adherence = aug.prompt_adherence(study, sets["train"], synth, sets["test"], len(classes), cfg, seed,
                                             val=sets["val"])
            metrics.update({k + suffix: v for k, v in adherence.items()})
        runs, table, note = study.runs, study.table, ""
    else:  # e.g. ImageCLEF prompts carry no label: there is no classification task to score
        note = ("no downstream classifier: the classifier is 2-D and these are volumes" if volumes else
                f"no downstream classifier: {len(classes)} label(s) in the train split (it needs 2 or more)")
        print(f"evaluate: {note}")
        runs, table, metrics = pd.DataFrame(columns=aug.RUN_COLUMNS), pd.DataFrame(), {}
    with atomic_path(f"{OUT}/augmentation_runs.csv") as tmp:
        runs.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(f"{OUT}/augmentation.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    aug.plot(table, f"{OUT}/augmentation.png", empty_note=note)
    return metrics


def fidelity(feat: dict, rows: dict, fid_mask, p: EvaluateParams, seed: int) -> dict:
    """FD/KID/PRDC per generation mode against the real images of the fidelity split (the real-vs-real
    reference once: it depends on the set size alone, the same for every mode of a plan)."""
    metrics, per_label = {}, []
    for mode, suffix in modes_of(rows["synth"]).items():
        sel = fid_mask & mode_mask(rows["synth"], mode)
        if not sel.any():
            continue
        try:
            out = fidelity_with_reference(feat["test"], feat["synth"][sel], feat["train"], p.kid_subset_size,
                                          p.kid_subsets, p.prdc_k, seed)
        except ValueError as exc:
            raise PipelineError(f"params.yaml: evaluate: {exc}; lower evaluate.prdc_k or raise "
                                "prompts.images_per_prompt") from None
        metrics.update({k + suffix: v for k, v in out.items() if not (suffix and ("real_" in k or k.startswith("kid_sub")
                                                                                 or k == "n_real_reference"))})
        metrics[f"n_synthetic_fidelity{suffix}"] = int(sel.sum())
        per_label.append(per_label_prdc(feat["test"], rows["test"]["label"], feat["synth"][sel],
                                        rows["synth"]["label"][sel], p.prdc_k).assign(mode=mode))
    with atomic_path(f"{OUT}/per_label.csv") as tmp:
        frame = pd.concat(per_label, ignore_index=True)
        (frame if "mode" in rows["synth"] else frame.drop(columns="mode")).to_csv(tmp, index=False, float_format="%.6g")
    return metrics


def headline(p: EvaluateParams) -> list[str]:
    """The figures `dvc exp show` compares: fidelity beside its real-vs-real scale, privacy, adherence and the
    augmentation gain where synthetic data should matter most (least real data, most synthetic); an image-
    conditioned model's interpolations' beside them, and how close its images are to their own sources."""
    cell = f"{aug.regime_name(min(p.augmentation.fractions))}_{aug.ratio_name(max(p.augmentation.ratios))}"
    plain = ["fd_effnet", "fd_effnet_real_train_vs_test", "kid_effnet", "kid_effnet_real_train_vs_test", "precision",
             "recall", "mem_frac_below_p1_feature", "adherence_acc", f"aug_gain_auc_{cell}", f"aug_gain_auc_{cell}_p_holm"]
    mode = "_interpolation"
    return plain + ["volume_ssim", "volume_ssim_real_test_vs_train", "mem_source_frac_below_p1_feature"] + [
        f"fd_effnet{mode}", f"kid_effnet{mode}", f"precision{mode}", f"recall{mode}", f"aug_gain_auc_{cell}{mode}"]


def main() -> None:
    p, seed = load_params("evaluate", EvaluateParams)
    if p.fidelity_split in p.augment_splits:
        raise PipelineError("params.yaml: evaluate.augment_splits must not contain evaluate.fidelity_split "
                            "(synthetic images from test captions would leak into classifier training)")
    require_inputs("evaluate", REAL, f"{SYNTH}/metadata.csv")
    seed_everything(seed)
    real = read_metadata(REAL)
    # real val picks each classifier's weights, unless it is the split they are scored on (or there is none)
    has_val = p.fidelity_split != "val" and (real["split"] == "val").any()
    rows = {"train": split_frame(REAL, ["train"]), "val": split_frame(REAL, ["val"]) if has_val else real[:0],
            "test": split_frame(REAL, [p.fidelity_split]),
            "synth": read_metadata(SYNTH).drop_duplicates("file_name").reset_index(drop=True)}
    # images without a split (prompt file without a split column, templates) serve fidelity only
    fid_mask = split_mask(rows["synth"], [p.fidelity_split], unsplit=True)
    pool_mask = split_mask(rows["synth"], p.augment_splits)
    if not fid_mask.any():
        raise PipelineError(f"{SYNTH}/metadata.csv: no synthetic images from {p.fidelity_split} captions; add "
                            f"{p.fidelity_split} to prompts.splits or set evaluate.fidelity_split")
    rows["pool"] = rows["synth"][pool_mask]
    # uint8 images on disk (decoded once into the local store), read a batch at a time by every metric
    images = {k: image_rows(REAL, rows[k]) for k in ("train", "test")}
    images["val"] = image_rows(REAL, rows["val"]) if has_val else images["train"].subset([])
    images["synth"] = image_rows(SYNTH, rows["synth"])
    images["pool"] = images["synth"].subset(pool_mask)

    volumes = images["train"].ndim == 5  # a volume is seen by the 2-D extractor through its central planes
    extractor, name = load_effnet_lite0(), "effnet_lite0"
    if volumes:
        extractor, name = PlaneFeatures(extractor), "effnet_lite0_planes"
    cache = FeatureCache(store.cache_dir("features") / f"{name}.pt", extractor.to(pick_device()))
    feat = {"train": cache(images["train"]), "test": cache(images["test"]), "synth": cache(images["synth"])}
    cache.save()
    metrics = {"n_real_train": len(rows["train"]), "n_real_test": len(rows["test"]), "n_synthetic": len(rows["synth"]),
               **fidelity(feat, rows, fid_mask, p, seed)}
    if volumes:
        metrics.update(plane_frechet(feat["test"], feat["synth"][fid_mask]))
        metrics.update(nearest_volume_metrics(images["synth"].subset(fid_mask), images["train"], images["test"]))
    if p.inception_weights and not volumes:
        first = fid_mask & mode_mask(rows["synth"], next(iter(modes_of(rows["synth"]))))
        metrics.update(inception_metrics(p.inception_weights, images["test"], images["synth"].subset(first)))
    mem, violation = privacy(feat, images, rows, p.privacy)
    if violation:  # an armed gate stops before the downstream study: on real data that takes hours
        raise PipelineError(f"{violation}; the pairs are in {OUT}/memorization.csv and {OUT}/closest_pairs.png")
    metrics.update(mem)
    metrics.update(downstream(images, rows, p, seed))
    write_provenance(f"{OUT}/provenance.json", stage="evaluate", params=as_dict(p), seed=seed, inputs=[REAL, SYNTH])
    write_metrics("evaluate", metrics, headline=headline(p))
    print(f"evaluate: {cache.computed} new images embedded; " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("aug_") and not k.endswith("_std")))


if __name__ == "__main__":
    sys.exit(run_stage(main))
