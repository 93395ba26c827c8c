"""The evaluate stage's studies, each per generation mode of the synthetic set (metadata `mode`: an
image-conditioned model's reconstruction and interpolation): the first mode's figures under the plain names
(as a text model's), the others' with the mode appended (`fd_effnet_interpolation`, augmentation arm
`1x_interpolation`). Fidelity (FD/KID/PRDC beside the real-vs-real reference), the memorization audit,
the augmentation study with prompt adherence, and the optional Inception figures; each writes its tables
and figures into the stage's folder.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from synthmed.core import store
from synthmed.data.dataset import mode_mask, modes_of
from synthmed.core.errors import PipelineError
from synthmed.core.io import write_csv
from synthmed.metrics import augmentation as aug
from synthmed.metrics.feature_cache import FeatureCache
from synthmed.metrics.fidelity import fidelity_with_reference, frechet_distance, per_label_prdc
from synthmed.metrics.privacy import PixelSpace, closest_pairs, gate, memorization_table
from synthmed.core.runtime import pick_device
from synthmed.viz import image_grid, save_png, to_array


def inception_metrics(path: str, real_test, synth_fid) -> dict[str, float]:
    from synthmed.metrics.inception import PoolAndLogits, inception_score, load_fid_inception

    cache = FeatureCache(store.cache_dir("features") / "fid_inception.pt", PoolAndLogits(load_fid_inception(path)).to(pick_device()))
    f_test, f_syn = cache(real_test), cache(synth_fid)
    cache.save()
    is_mean, is_std = inception_score(f_syn[:, 2048:])
    return {"fid_inception": frechet_distance(f_test[:, :2048], f_syn[:, :2048]), "is_inception": is_mean,
            "is_inception_std": is_std}


def privacy(feat: dict, images: dict, rows: dict, p, out: str) -> tuple[dict, str | None]:
    """Memorization table and the closest pairs figure (in ``out``), per generation mode; the gate's message
    when armed (``p``: evaluate.privacy) and fired in any mode. The reference is ``feat``/``images``
    "held_out": every real image that is not train (val and test; "test" alone where no "held_out" is given)."""
    ref = "held_out" if "held_out" in feat else "test"
    space = {k: {"feature": feat[k], "pixel": PixelSpace(images[k], p.pixel_resolution)} for k in ("train", ref)}
    tables, summary, verdicts = [], {"mem_pixel_side": space["train"]["pixel"].side}, []
    for mode, suffix in modes_of(rows["synth"]).items():
        sel = mode_mask(rows["synth"], mode)
        synth = {"feature": feat["synth"][sel], "pixel": PixelSpace(images["synth"].subset(sel), p.pixel_resolution)}
        table, mode_summary = memorization_table(synth, space["train"], space[ref], rows["synth"][sel],
                                                 rows["train"]["file_name"], alpha=p.alpha, mirror=p.mirror)
        tables.append(table.assign(mode=mode) if suffix or "mode" in rows["synth"] else table)
        summary.update({k + suffix: v for k, v in mode_summary.items()})
        verdicts.append(gate(mode_summary, p.gate_level, p.max_excess) if p.fail_on_violation else None)
    table = pd.concat(tables, ignore_index=True)
    write_csv(f"{out}/memorization.csv", table)
    tiles, captions = [], []
    synth_row = {name: i for i, name in enumerate(rows["synth"]["file_name"])}
    for i, j, d in closest_pairs(table, rows["train"]["file_name"].tolist()):
        tiles += [to_array(images["synth"][synth_row[table["file_name"].iloc[i]]]), to_array(images["train"][j])]
        captions += [f"synthetic, d={d:.2f}", "nearest train image" + (" (not its source)" if "mode" in table else "")]
    save_png(image_grid(tiles, captions, ncol=8, caption_lines=2), f"{out}/closest_pairs.png")
    verdict = next((v for v in verdicts if v), None)
    return summary, verdict and f"{verdict}; see {out}/memorization.csv and {out}/closest_pairs.png"


def downstream(images: dict, rows: dict, p, seed: int, out: str, real: str) -> dict:
    """The augmentation study (one set of synthetic arms per generation mode; each cell's synthetic images those
    made from its own real train subset, every arm with its information budget and claim: augmentation.csv) and
    prompt adherence (its figure on images of val/test captions, with the label each is taken for:
    adherence.csv; train captions' apart), their tables and figure in ``out`` (``p``: the evaluate params;
    ``real``: the real dataset, named in errors); for unlabelled data or volumes, empty tables and a figure
    that says why (DVC declares them as outputs, and every input kind runs the whole DAG)."""
    from synthmed.data.imagefolder import read_metadata

    classes = sorted(set(rows["train"]["label"]) - {""})
    volumes = images["train"].ndim == 5
    if len(classes) >= 2 and not volumes:
        sets = {k: (images[k], aug.encode(rows[k]["label"], classes)) for k in ("train", "val", "test", "synth")}
        if not (sets["test"][1] >= 0).any():
            raise PipelineError(f"{real}/metadata.csv: no {p.fidelity_split} image has a label seen in train; the "
                                "classifier cannot be scored (check the labels or evaluate.fidelity_split)")
        modes = modes_of(rows["synth"])
        pools = aug.synthetic_pools(rows["synth"], images["synth"], sets["synth"][1], rows["train"]["file_name"], modes)
        n_generator = aug.n_generator_captions(read_metadata(real), next(iter(pools.values())).kind)
        a, cfg = p.augmentation, p.classifier
        study = aug.run_study(sets["train"], pools, sets["test"], len(classes), a.fractions, a.ratios, a.arms,
                              a.seeds, cfg, seed, val=sets["val"], n_generator=n_generator)
        for line in study.table.get("claim", []):
            print(f"evaluate: {line}")
        metrics, confusions = dict(study.flat), []
        judge = replace(cfg, steps=p.adherence.steps, augment=True, blur_sigma=p.adherence.blur_sigma)
        judges = (aug.train_judges(sets["train"], len(classes), judge, p.adherence.seeds, seed, val=sets["val"])
                  if (sets["synth"][1] >= 0).any() else [])
        split = rows["synth"]["split"] if "split" in rows["synth"] else pd.Series("", index=rows["synth"].index)
        for mode, suffix in modes.items():
            sel = mode_mask(rows["synth"], mode)
            adherence, confusion = aug.prompt_adherence(judges, aug.subset(sets["synth"], sel), sets["test"],
                                                        len(classes), seed, p.resamples, splits=split[sel].to_numpy())
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


def fidelity(feat: dict, rows: dict, fid_mask, p, seed: int, out: str) -> dict:
    """FD/KID/PRDC per generation mode against the real images of the fidelity split (the real-vs-real
    reference once: it depends on the set size alone, the same for every mode of a plan); per-label PRDC to
    ``out``/per_label.csv."""
    metrics, per_label = {}, []
    for mode, suffix in modes_of(rows["synth"]).items():
        sel = fid_mask & mode_mask(rows["synth"], mode)
        if not sel.any():
            continue
        try:
            figures = fidelity_with_reference(feat["test"], feat["synth"][sel], feat["train"], p.kid_subset_size,
                                              p.kid_subsets, p.prdc_k, seed, p.resamples)
        except ValueError as exc:
            raise PipelineError(f"params.yaml: evaluate: {exc}; lower evaluate.prdc_k or raise "
                                "prompts.images_per_prompt") from None
        if not suffix:
            warn_small_samples(figures, p.kid_subset_size)
        shared = ("n_real_reference", "fd_n", "fd_dims", "fd_reliable")  # the same for every mode
        metrics.update({(k.replace("_ci_", f"{suffix}_ci_") if "_ci_" in k else k + suffix): v  # fd_effnet_interpolation_ci_low
                        for k, v in figures.items()
                        if not (suffix and ("real_" in k or k.startswith("kid_sub") or k in shared))})
        metrics[f"n_synthetic_fidelity{suffix}"] = int(sel.sum())
        per_label.append(per_label_prdc(feat["test"], rows["test"]["label"], feat["synth"][sel],
                                        rows["synth"]["label"][sel], p.prdc_k).assign(mode=mode))
    frame = pd.concat(per_label, ignore_index=True)
    write_csv(f"{out}/per_label.csv", frame if "mode" in rows["synth"] else frame.drop(columns="mode"))
    return metrics
