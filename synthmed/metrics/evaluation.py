"""The evaluate stage's studies, each per generation mode of the synthetic set (metadata `mode`: an
image-conditioned model's reconstruction and interpolation): the first mode's figures under the plain names
(as a text model's), the others' with the mode appended (`fd_effnet_interpolation`, augmentation arm
`1x_interpolation`). Fidelity (FD/KID/PRDC beside the real-vs-real reference), the memorization audit,
the augmentation study with prompt adherence, and the optional Inception figures; each writes its tables
and figures into the stage's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from synthmed.core import store
from synthmed.data.dataset import mode_mask, modes_of, split_mask
from synthmed.data.disk_array import Rows
from synthmed.core.errors import PipelineError
from synthmed.core.io import write_csv
from synthmed.metrics import augmentation as aug
from synthmed.metrics.feature_cache import FeatureCache
from synthmed.metrics.fidelity import fidelity_with_reference, frechet_distance, per_label_prdc
from synthmed.metrics.privacy import PixelSpace, closest_pairs, gate, memorization_table
from synthmed.core.runtime import pick_device
from synthmed.viz import image_grid, save_png, to_array

VAL = "val_"  # the figures of val captions against real val images, for choosing; unprefixed: the report split's


@dataclass
class ImageSet:
    """One set evaluate reads: its metadata rows, its uint8 images (on disk, read a batch at a time) and, once
    embedded, their features (one row each)."""
    rows: pd.DataFrame
    images: Rows
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, mask) -> "ImageSet":
        mask = np.asarray(mask, dtype=bool)
        return ImageSet(self.rows[mask].reset_index(drop=True), self.images.subset(mask),
                        None if self.features is None else self.features[torch.from_numpy(mask)])

    @property
    def labels(self) -> pd.Series:
        return self.rows["label"] if "label" in self.rows else pd.Series("", index=self.rows.index)

    @property
    def groups(self) -> np.ndarray:
        """Each real image's leakage unit (patient, volume, source image); an image without one is its own."""
        group = self.rows["group"].fillna("") if "group" in self.rows else pd.Series("", index=self.rows.index)
        return group.where(group != "", "image:" + self.rows["file_name"]).to_numpy()


@dataclass
class EvaluationSets:
    """Everything evaluate compares. ``test``: the real images of the report split (evaluate.fidelity_split);
    ``val``: real val images (they pick each classifier's weights, and the val_ figures are measured on them;
    empty when val is the report split or there is none); ``held_out``: every real image that is not train (the
    memorization audit's reference); ``synth``: the synthetic set, each row with the split of its caption."""
    train: ImageSet
    val: ImageSet
    test: ImageSet
    held_out: ImageSet
    synth: ImageSet
    report_split: str

    def synthetic_of(self, split: str, unsplit: bool = False) -> np.ndarray:
        """Mask of the synthetic images made from ``split``'s captions (with ``unsplit``: also those of no split,
        e.g. a prompt file's, which serve the report split's fidelity only)."""
        return split_mask(self.synth.rows, [split], unsplit)


def inception_metrics(path: str, real_test, synth_fid) -> dict[str, float]:
    from synthmed.metrics.inception import PoolAndLogits, inception_score, load_fid_inception

    cache = FeatureCache(store.cache_dir("features") / "fid_inception.pt", PoolAndLogits(load_fid_inception(path)).to(pick_device()))
    f_test, f_syn = cache(real_test), cache(synth_fid)
    cache.save()
    is_mean, is_std = inception_score(f_syn[:, 2048:])
    return {"fid_inception": frechet_distance(f_test[:, :2048], f_syn[:, :2048]), "is_inception": is_mean,
            "is_inception_std": is_std}


def privacy(sets: EvaluationSets, p, out: str) -> tuple[dict, str | None]:
    """Memorization table and the closest pairs figure (in ``out``), per generation mode; the gate's message
    when armed (``p``: evaluate.privacy) and fired in any mode. The reference is every real image that is not
    train (``sets.held_out``: val and test)."""
    def spaces(x: ImageSet) -> dict:
        return {"feature": x.features, "pixel": PixelSpace(x.images, p.pixel_resolution)}

    train, held_out = spaces(sets.train), spaces(sets.held_out)
    tables, summary, verdicts = [], {"mem_pixel_side": train["pixel"].side}, []
    synth_rows = sets.synth.rows
    for mode, suffix in modes_of(synth_rows).items():
        synth = sets.synth.subset(mode_mask(synth_rows, mode))
        table, mode_summary = memorization_table(spaces(synth), train, held_out, synth.rows,
                                                 sets.train.rows["file_name"], alpha=p.alpha, mirror=p.mirror)
        tables.append(table.assign(mode=mode) if suffix or "mode" in synth_rows else table)
        summary.update({k + suffix: v for k, v in mode_summary.items()})
        verdicts.append(gate(mode_summary, p.gate_level, p.max_excess) if p.fail_on_violation else None)
    table = pd.concat(tables, ignore_index=True)
    write_csv(f"{out}/memorization.csv", table)
    tiles, captions = [], []
    synth_row = {name: i for i, name in enumerate(synth_rows["file_name"])}
    for i, j, d in closest_pairs(table, sets.train.rows["file_name"].tolist()):
        tiles += [to_array(sets.synth.images[synth_row[table["file_name"].iloc[i]]]), to_array(sets.train.images[j])]
        captions += [f"synthetic, d={d:.2f}", "nearest train image" + (" (not its source)" if "mode" in table else "")]
    save_png(image_grid(tiles, captions, ncol=8, caption_lines=2), f"{out}/closest_pairs.png")
    verdict = next((v for v in verdicts if v), None)
    return summary, verdict and f"{verdict}; see {out}/memorization.csv and {out}/closest_pairs.png"


def downstream(sets: EvaluationSets, p, seed: int, out: str, real: str) -> dict:
    """The augmentation study (one set of synthetic arms per generation mode; each cell's synthetic images those
    made from its own real train subset, every arm with its information budget and claim: augmentation.csv) and
    prompt adherence (reported on images of test captions, val's apart to choose by, with the label each is
    taken for: adherence.csv; train captions' a diagnostic), their tables and figure in ``out`` (``p``: the evaluate params;
    ``real``: the real dataset, named in errors); for unlabelled data or volumes, empty tables and a figure
    that says why (DVC declares them as outputs, and every input kind runs the whole DAG)."""
    from synthmed.data.imagefolder import read_metadata

    classes = sorted(set(sets.train.labels) - {""})
    volumes = sets.train.images.ndim == 5
    if len(classes) >= 2 and not volumes:
        labelled = {k: (x.images, aug.encode(x.labels, classes))
                    for k, x in {"train": sets.train, "val": sets.val, "test": sets.test, "synth": sets.synth}.items()}
        if not (labelled["test"][1] >= 0).any():
            raise PipelineError(f"{real}/metadata.csv: no {p.fidelity_split} image has a label seen in train; the "
                                "classifier cannot be scored (check the labels or evaluate.fidelity_split)")
        synth_rows = sets.synth.rows
        modes = modes_of(synth_rows)
        pools = aug.synthetic_pools(synth_rows, sets.synth.images, labelled["synth"][1], sets.train.rows["file_name"],
                                    modes)
        n_generator = aug.n_generator_captions(read_metadata(real), next(iter(pools.values())).kind)
        a, cfg = p.augmentation, p.classifier
        study = aug.run_study(labelled["train"], pools, labelled["test"], len(classes), a.fractions, a.ratios, a.arms,
                              a.seeds, cfg, seed, val=labelled["val"], n_generator=n_generator)
        for line in study.table.get("claim", []):
            print(f"evaluate: {line}")
        metrics, confusions = dict(study.flat), []
        judge = replace(cfg, steps=p.adherence.steps, augment=True, blur_sigma=p.adherence.blur_sigma)
        judges = (aug.train_judges(labelled["train"], len(classes), judge, p.adherence.seeds, seed, val=labelled["val"])
                  if (labelled["synth"][1] >= 0).any() else [])
        split = synth_rows["split"] if "split" in synth_rows else pd.Series("", index=synth_rows.index)
        for mode, suffix in modes.items():
            sel = mode_mask(synth_rows, mode)
            adherence, confusion = aug.prompt_adherence(judges, aug.subset(labelled["synth"], sel), labelled["test"],
                                                        len(classes), seed, p.resamples, splits=split[sel].to_numpy(),
                                                        report_split=p.fidelity_split)
            metrics.update({k + suffix: v for k, v in adherence.items()})
            confusions.append(confusion.assign(mode=mode) if len(modes) > 1 else confusion)
        confusion = pd.concat(confusions, ignore_index=True)
        for col in ("prompt_label", "predicted_label"):
            confusion[col] = [classes[i] for i in confusion[col]]
        runs, table, note = study.runs, study.table, ""
    else:  # e.g. ImageCLEF prompts carry no label: there is no classification task to score
        note = ("no downstream classifier: the classifier is 2-D and these are volumes" if volumes else
                f"no downstream classifier: {len(classes)} label(s) in the train split (it needs 2 or more)")
        print(f"evaluate: {note}")
        runs, table, metrics = pd.DataFrame(columns=aug.RUN_COLUMNS), pd.DataFrame(), {}
        confusion = pd.DataFrame(columns=aug.ADHERENCE_COLUMNS)
    write_csv(f"{out}/augmentation_runs.csv", runs)
    write_csv(f"{out}/adherence.csv", confusion)
    write_csv(f"{out}/augmentation.csv", table)
    aug.plot(table, f"{out}/augmentation.png", empty_note=note)
    return metrics


def warn_small_samples(figures: dict, kid_subset_size: int) -> None:
    """One line for each figure the sample is too small for, as asked."""
    if figures["kid_subset_size"] < kid_subset_size:
        print(f"evaluate: KID on subsets of {figures['kid_subset_size']} images, not evaluate.kid_subset_size="
              f"{kid_subset_size}: a subset is at most half of the {figures['fd_n']} images, or every subset is the "
              "same set")
    if not figures["fd_reliable"]:
        print(f"evaluate: FD on {figures['fd_n']} images in {figures['fd_dims']} dimensions is mostly its sample-size "
              "bias (it needs several images per dimension): compare KID, precision/recall or fd_effnet_inf")


def synthetic_groups(sets: EvaluationSets) -> np.ndarray:
    """The unit a synthetic image is resampled with: its source's group (the real image whose caption or
    embedding made it), or its caption where it has no source, so images made from correlated sources are drawn
    together."""
    real = pd.concat([x.rows.assign(unit=x.groups) for x in (sets.train, sets.held_out)]).drop_duplicates("file_name")
    rows = sets.synth.rows
    source = rows.get("source_file_name", pd.Series("", index=rows.index)).fillna("")
    return ("source:" + source.map(real.set_index("file_name")["unit"])).fillna("caption:" + rows["text"]).to_numpy()


def fidelity(sets: EvaluationSets, real: ImageSet, synth_mask: np.ndarray, p, seed: int, out: str | None,
             prefix: str = "") -> dict:
    """FD/KID/PRDC per generation mode of the synthetic images in ``synth_mask`` against ``real`` (the report
    split's images, or val's with ``prefix`` val_), intervals resampled by group, beside the real-vs-real
    reference (once: it depends on the set size alone, the same for every mode of a plan); per-label PRDC to
    ``out``/per_label.csv when ``out`` is given."""
    metrics, per_label = {}, []
    groups = {"test": real.groups, "train": sets.train.groups, "synth": synthetic_groups(sets)}
    synth_rows = sets.synth.rows
    for mode, suffix in modes_of(synth_rows).items():
        sel = synth_mask & mode_mask(synth_rows, mode)
        if not sel.any():
            continue
        try:
            figures = fidelity_with_reference(real.features, sets.synth.features[sel], sets.train.features,
                                              p.kid_subset_size, p.kid_subsets, p.prdc_k, seed, p.resamples,
                                              groups={**groups, "synth": groups["synth"][sel]})
        except ValueError as exc:
            raise PipelineError(f"params.yaml: evaluate: {exc}; lower evaluate.prdc_k or raise "
                                "prompts.images_per_prompt") from None
        if not suffix and not prefix:
            warn_small_samples(figures, p.kid_subset_size)
        shared = ("n_real_reference", "fd_n", "fd_dims", "fd_reliable")  # the same for every mode
        metrics.update({prefix + (k.replace("_ci_", f"{suffix}_ci_") if "_ci_" in k else k + suffix): v
                        for k, v in figures.items()  # fd_effnet_interpolation_ci_low
                        if not (suffix and ("real_" in k or k.startswith("kid_sub") or k in shared))})
        metrics[f"{prefix}n_synthetic_fidelity{suffix}"] = int(sel.sum())
        per_label.append(per_label_prdc(real.features, real.labels, sets.synth.features[sel],
                                        sets.synth.labels[sel], p.prdc_k).assign(mode=mode))
    if out is not None:
        frame = pd.concat(per_label, ignore_index=True)
        write_csv(f"{out}/per_label.csv", frame if "mode" in synth_rows else frame.drop(columns="mode"))
    return metrics
