"""DVC stage `evaluate`: fidelity, privacy (memorization audit) and downstream usefulness.

Synthetic images from `fidelity_split` captions are compared with the real images of that
split, for reporting; those from val captions with the real val images, under `val_` names, for choosing a
recipe. Synthetic images from train captions are the augmentation pool, and each classifier cell uses only
those made from its own labelled real subset (synthmed.metrics.augmentation: no label leaves the subset, val
captions never feed a classifier). Prompt adherence is scored on images of test captions (and val's, `val_adherence_acc`), whose
images the generator never saw (train captions' apart, a diagnostic). The memorization audit's reference is every
real image that is not train. Images from a prompt file without a split column or
from templates may come from test captions: they serve fidelity only. Every image is embedded once (feature cache
keyed by pixel sha256, in the local store). An image-conditioned model's images come in generation modes, each
scored on its own (synthmed.metrics.evaluation).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from synthmed.core.config import require_at_least_one, require_non_negative
from synthmed.data.dataset import image_rows, mode_mask, modes_of, split_frame
from synthmed.data.imagefolder import read_metadata
from synthmed.core.errors import PipelineError
from synthmed.metrics import augmentation as aug
from synthmed.metrics.augmentation import AdherenceParams, AugmentationParams
from synthmed.metrics.downstream import ClassifierConfig
from synthmed.metrics.evaluation import (VAL, EvaluationSets, ImageSet, downstream, fidelity, inception_metrics,
                                         privacy)
from synthmed.metrics.feature_cache import FeatureCache
from synthmed.metrics.grid_artifacts import grid_artifacts
from synthmed.metrics.privacy import PrivacyParams
from synthmed.metrics.features import load_effnet_lite0
from synthmed.metrics.volumes import PlaneFeatures, nearest_volume_metrics, plane_frechet
from synthmed.core import store
from synthmed.core.provenance import seed_everything
from synthmed.core.runtime import pick_device
from synthmed.core.stage import Stage, run_stage


@dataclass
class EvaluateParams:
    fidelity_split: str
    kid_subset_size: int
    kid_subsets: int
    prdc_k: int
    resamples: int  # half-samples of the images behind each fidelity figure's 95 % interval (0 = none)
    inception_weights: str  # "" = skip; a local pt_inception-2015-12-05 state dict -> fid_inception, is_inception
    privacy: PrivacyParams
    classifier: ClassifierConfig
    augmentation: AugmentationParams
    adherence: AdherenceParams

    def __post_init__(self):
        require_at_least_one(self, "prdc_k", "kid_subset_size", "kid_subsets")
        require_non_negative(self, "resamples")


def headline(p: EvaluateParams) -> list[str]:
    """The figures `dvc exp show` compares: fidelity beside its real-vs-real scale, privacy, adherence, the
    augmentation gain where synthetic data should matter most (least real data, most synthetic), and the val-caption
    figures a recipe is chosen by (val_); an image-conditioned model's interpolations' beside them, and how close
    its images are to their own sources."""
    cell = f"{aug.regime_name(min(p.augmentation.fractions))}_{aug.ratio_name(max(p.augmentation.ratios))}"
    # FD is left out: at a few dozen test images in 1,280 dimensions it measures n more than the generator (see
    # docs/metrics.md); KID is unbiased at any n (its interval beside it; every figure's is in metrics/all).
    plain = ["kid_effnet", "kid_effnet_ci_low", "kid_effnet_ci_high", "kid_effnet_real_train_vs_test", "precision",
             "recall", "n_synthetic_fidelity", "grid_excess_db", "mem_frac_below_feature", "mem_frac_below_pixel",
             "adherence_acc", "adherence_acc_ci_low", "adherence_acc_ci_high", "adherence_real_test_acc",
             f"aug_gain_auc_{cell}", f"aug_gain_auc_{cell}_p_holm"]
    choose = [VAL + k for k in ("kid_effnet", "adherence_acc")]  # val captions: to choose by
    mode = "_interpolation"
    return plain + choose + ["volume_ssim", "volume_ssim_real_test_vs_train", "mem_source_frac_below_feature"] + [
        f"kid_effnet{mode}", f"precision{mode}", f"recall{mode}", f"aug_gain_auc_{cell}{mode}"]


def main(stage: Stage) -> None:
    p, seed, out = stage.params, stage.seed, str(stage.out)
    real_dir, synth_dir = stage.dep("ingest/dataset"), stage.dep("generate/dataset")
    seed_everything(seed)
    real = read_metadata(real_dir)
    synth = read_metadata(synth_dir).drop_duplicates("file_name").reset_index(drop=True)

    def real_set(splits: list[str]) -> ImageSet:  # uint8 images on disk (decoded once into the local store)
        rows = split_frame(real_dir, splits) if real["split"].isin(splits).any() else real[:0].reset_index(drop=True)
        return ImageSet(rows, image_rows(real_dir, rows))

    # real val picks each classifier's weights and carries the figures to choose by, unless it is the report split
    has_val = p.fidelity_split != "val" and (real["split"] == "val").any()
    sets = EvaluationSets(train=real_set(["train"]), val=real_set(["val"] if has_val else []),
                          test=real_set([p.fidelity_split]), held_out=real_set(["val", "test"]),
                          synth=ImageSet(synth, image_rows(synth_dir, synth)), report_split=p.fidelity_split)
    # images without a split (prompt file without a split column, templates) serve the report's fidelity only
    fid_mask = sets.synthetic_of(p.fidelity_split, unsplit=True)
    if not fid_mask.any():
        raise PipelineError(f"{synth_dir}/metadata.csv: no synthetic images from {p.fidelity_split} captions; add "
                            f"{p.fidelity_split} to prompts.splits or set evaluate.fidelity_split")

    volumes = sets.train.images.ndim == 5  # a volume is seen by the 2-D extractor through its central planes
    extractor, name = load_effnet_lite0(), "effnet_lite0"
    if volumes:
        extractor, name = PlaneFeatures(extractor), "effnet_lite0_planes"
    cache = FeatureCache(store.cache_dir("features") / f"{name}.pt", extractor.to(pick_device()))
    for x in (sets.train, sets.val, sets.test, sets.held_out, sets.synth):
        x.features = cache(x.images)
    cache.save()
    metrics = {"n_real_train": len(sets.train), "n_real_test": len(sets.test), "n_real_val": len(sets.val),
               "n_synthetic": len(sets.synth), **fidelity(sets, sets.test, fid_mask, p, seed, out)}
    val_mask = sets.synthetic_of("val")
    if len(sets.val) and val_mask.any():
        metrics.update(fidelity(sets, sets.val, val_mask, p, seed, None, prefix=VAL))
    metrics.update(grid_artifacts(sets.synth.images, sets.test.images, p.resamples, seed))  # checkerboard, measured
    if volumes:
        metrics.update(plane_frechet(sets.test.features, sets.synth.features[fid_mask]))
        metrics.update(nearest_volume_metrics(sets.synth.images.subset(fid_mask), sets.train.images, sets.test.images))
    if p.inception_weights and not volumes:
        first = fid_mask & mode_mask(synth, next(iter(modes_of(synth))))
        metrics.update(inception_metrics(p.inception_weights, sets.test.images, sets.synth.images.subset(first)))
    mem, violation = privacy(sets, p.privacy, out)
    if violation:  # an armed gate stops before the downstream study: on real data that takes hours
        raise PipelineError(violation)
    metrics.update(mem)
    metrics.update(downstream(sets, p, seed, out, real_dir))
    stage.write_provenance()
    stage.write_metrics(metrics, headline=headline(p))
    print(f"evaluate: {cache.computed} new images embedded; " + ", ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("aug_") and not k.endswith("_std")))


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, EvaluateParams, argv)


if __name__ == "__main__":
    sys.exit(cli())
