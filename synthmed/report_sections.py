"""The run report's sections, each from the stage outputs it reads: the dataset, the autoencoder, diffusion
training, samples per label, fidelity, the memorization audit, the augmentation study, the VLP study and the
zero-shot segmentation.
Every file is asked for through ``dep`` (the report stage's `Stage.dep`: a dvc.yaml dependency, present)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from synthmed.data.dataset import first_mode, images_of
from synthmed.data.imagefolder import read_metadata
from synthmed.report import Figure, Section, Table, curves_png, fmt, frame_table, smoothed
from synthmed.viz import image_grid, to_array

Dep = Callable[[str], str]  # "train_vae/loss.csv" -> its path, which must exist


FIDELITY = [("fd_effnet", "Fréchet distance (EfficientNet features), lower is better"),
            ("kid_effnet", "kernel distance, lower is better"),
            ("precision", "share of synthetic images inside the real manifold"),
            ("recall", "share of real images inside the synthetic manifold"),
            ("density", "precision weighted by how many real neighbourhoods contain each image"),
            ("coverage", "share of real images with a synthetic image among their nearest neighbours")]


def metrics(dep: Dep, stage: str) -> dict:
    return json.loads(Path(dep(f"metrics/all/{stage}.json")).read_text())


def png(path: str) -> bytes:
    return Path(path).read_bytes()


def dataset_section(dep: Dep) -> Section:
    card = Path(dep("ingest/card.md")).read_text().split("\n## ")[0]
    bullets = [line[2:] for line in card.splitlines() if line.startswith("- ")]
    meta = read_metadata(dep("ingest/dataset")).drop_duplicates("file_name")
    counts = pd.crosstab(meta["label"].replace("", "(none)"), meta["split"]).reset_index()
    return Section("Dataset", "the real images the models learn from; splits never cut a group (patient, volume), "
                   "and only `train` is ever trained on.",
                   [*bullets, frame_table(counts), Figure("samples", png(dep("ingest/samples.png")), "real images")])


def vae_section(dep: Dep) -> Section:
    m, loss = metrics(dep, "train_vae"), pd.read_csv(dep("train_vae/loss.csv"))
    curve = curves_png({"training loss (mean of 50 steps)": (loss["step"].tolist(), smoothed(loss["loss"]))},
                       "VAE training", "loss", logy=True)
    return Section("Autoencoder", "real validation images above their reconstructions; the diffusion model works in "
                   "this latent space, so its samples cannot be sharper than these.",
                   [f"Validation PSNR {fmt(m.get('val_psnr'))} dB, SSIM {fmt(m.get('val_ssim'))}, "
                    f"MAE {fmt(m.get('val_mae'))}; {fmt(m.get('parameters'))} parameters.",
                    Figure("vae_reconstructions", png(dep("train_vae/recon.png")), "real (top) and reconstructed"),
                    Figure("vae_loss", curve, "training loss")])


def diffusion_section(dep: Dep) -> Section:
    m, loss, val = metrics(dep, "train_ldm"), pd.read_csv(dep("train_ldm/loss.csv")), pd.read_csv(dep("train_ldm/val_loss.csv"))
    curve = curves_png({"training (mean of 50 steps)": (loss["step"].tolist(), smoothed(loss["loss"])),
                        "validation, EMA weights": (val["step"].tolist(), val["val_loss_ema"].tolist()),
                        "validation, raw weights": (val["step"].tolist(), val["val_loss_raw"].tolist())},
                       "diffusion training", "min-SNR-weighted loss")
    grids = sorted(Path(dep("train_ldm/progress")).glob("step*.png"))
    blocks = [f"{fmt(m.get('parameters'))} UNet parameters, {fmt(m.get('train_images'))} training images; "
              f"validation loss {fmt(m.get('val_loss_ema'))} (EMA).", Figure("ldm_loss", curve, "loss curves")]
    if grids:
        blocks.append(Figure("ldm_progress", grids[-1].read_bytes(), f"fixed conditions and seeds at {grids[-1].stem}"))
    return Section("Diffusion training", "the training loss falls with noise around it; a validation loss that rises "
                   "while it falls is overfitting (memorization: see the privacy section).", blocks)


def samples_section(dep: Dep) -> Section:
    """A real image of each label beside synthetic ones of it (the first generation mode's)."""
    real, synth = read_metadata(dep("ingest/dataset")).drop_duplicates("file_name"), read_metadata(dep("generate/dataset")).drop_duplicates("file_name")
    synth = first_mode(synth)
    tiles, captions = [], []
    for label in sorted(set(synth["label"]))[:12]:
        mine = synth[synth["label"] == label].head(7)
        ref = real[real["label"] == label].head(1)
        tiles += [to_array(x) for x in images_of(dep("ingest/dataset"), ref)] + [to_array(x) for x in images_of(dep("generate/dataset"), mine)]
        captions += [f"real {label or ''}".strip()] * len(ref) + ["synthetic"] * len(mine)
        tiles += [None] * (8 - len(ref) - len(mine))
        captions += [""] * (8 - len(ref) - len(mine))
    blank = next(t for t in tiles if t is not None) * 0 + 255
    buf = io.BytesIO()
    image_grid([blank if t is None else t for t in tiles], captions, ncol=8).save(buf, format="PNG")
    per_label, grid = buf.getvalue(), png(dep("generate/grid.png"))
    return Section("Synthetic samples", "each row: a real image of a label, then synthetic images generated for it; "
                   "they should look like the real one without being copies of any training image.",
                   [Figure("samples_per_label", per_label, "per label"),
                    Figure("generate_grid", grid, "the generate stage's grid")])


def with_interval(m: dict, key: str) -> str:
    """A figure with its interval in brackets, where the metrics hold one."""
    low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return fmt(m.get(key)) + (f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else "")


def fidelity_section(dep: Dep, m: dict) -> Section:
    modes = [("", "synthetic")] + ([("_interpolation", "interpolations")] if "fd_effnet_interpolation" in m else [])
    rows = [[key, *(with_interval(m, key + s) for s, _ in modes), with_interval(m, f"{key}_real_train_vs_test"), meaning]
            for key, meaning in FIDELITY]
    fd = (f"FD rests on {fmt(m.get('fd_n'))} images in {fmt(m.get('fd_dims'))} dimensions"
          + (": far too few for it (it needs many more images than dimensions), so it mostly measures the sample "
             f"size; read KID and precision/recall, or FD extrapolated to infinite n ({fmt(m.get('fd_effnet_inf'))}, "
             f"real vs real {fmt(m.get('fd_effnet_inf_real_train_vs_test'))})." if not m.get("fd_reliable") else "."))
    blocks: list = [f"{fmt(m.get('n_synthetic_fidelity'))} synthetic images against {fmt(m.get('n_real_test'))} "
                    "real test images; in brackets, 95 % intervals from redrawing half of each image set `evaluate.resamples` times. " + fd,
                    Table(["metric", *(name for _, name in modes), "real vs real", "meaning"], rows)]
    if "volume_ssim" in m:  # volumes: the planes' features above, and voxel by voxel here
        blocks += ["Volumes: the figures above use the EfficientNet features of each volume's three central planes "
                   f"side by side (FD per plane: axial {fmt(m.get('fd_effnet_axial'))}, coronal "
                   f"{fmt(m.get('fd_effnet_coronal'))}, sagittal {fmt(m.get('fd_effnet_sagittal'))}). Below, each "
                   "synthetic volume against its nearest real test volume, beside real test against nearest train.",
                   Table(["metric", "synthetic vs nearest real", "real test vs nearest train"],
                         [[k, fmt(m.get(f"volume_{k}")), fmt(m.get(f"volume_{k}_real_test_vs_train"))]
                          for k in ("psnr", "ssim", "mae")])]
    return Section("Fidelity", "each synthetic figure beside the same figure for real train images against real "
                   "test ones, the score of a generator that samples the real distribution; precision/recall "
                   "near that twin and FD/KID near it are the goal.", blocks)


def privacy_section(dep: Dep, m: dict) -> Section:
    rows = [[space, fmt(m.get(f"mem_frac_below_{space}")),
             f"[{fmt(m.get(f'mem_frac_below_{space}_ci_low'))}, {fmt(m.get(f'mem_frac_below_{space}_ci_high'))}]",
             fmt(m.get(f"mem_expected_rate_{space}")), fmt(m.get(f"mem_p_{space}"))]
            for space in ("feature", "pixel") if f"mem_frac_below_{space}" in m]
    n = m.get("mem_n_reference")
    return Section("Privacy: memorization audit", "the share of synthetic images closer to a training image than "
                   f"all but the nearest few of the {fmt(n)} held-out real images are (each space's threshold, an "
                   "order statistic of their distances to train); a generator that copies nothing puts the expected "
                   "rate below it. The synthetic images closest to a training image, beside it.",
                   [Table(["space", "share below", "95 % interval", "expected if no copies", "p (more copies)"], rows),
                    Figure("closest_pairs", png(dep("evaluate/closest_pairs.png")), "closest synthetic–train pairs")])


def augmentation_section(dep: Dep) -> Section:
    try:
        table = pd.read_csv(dep("evaluate/augmentation.csv"))
    except pd.errors.EmptyDataError:  # no labels, no classifier: evaluate says why in the figure
        table = pd.DataFrame()
    blocks: list = [Figure("augmentation", png(dep("evaluate/augmentation.png")), "macro AUC and balanced accuracy")]
    if not table.empty:
        cols = [c for c in ["regime", "arm", "seeds", "n_real_images", "n_synth", "n_labels", "n_pool_conditions",
                            "auc", "auc_ci95", "gain_auc", "gain_auc_p_holm"] if c in table]
        blocks.insert(0, frame_table(table, cols))
        if "claim" in table:  # each arm's information, in words: what it trained on, where its labels came from
            blocks[1:1] = [f"{row.regime} {row.arm}: {row.claim}." for row in table.itertuples()]
    return Section("Does synthetic data help a classifier?", "each arm against the real-only classifier of the same "
                   "regime (share of real train), paired by seed; a gain counts when its Holm-corrected p < 0.05 "
                   "(* in the plot). An arm's synthetic images come from its own real subset's captions alone "
                   "(`n_labels`: the labelled real images it learned from, directly or through them), but the "
                   "generator that made them trained on every train caption; `100pct real` is the ceiling.", blocks)


def vlp_section(dep: Dep) -> Section:
    """The evaluate_vlp report's tables and lines, as they are."""
    blocks: list = []
    lines = Path(dep("evaluate_vlp/report.md")).read_text().splitlines()[1:]
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            blocks.append(Table(rows[0], [r for r in rows[2:]]))
            continue
        text = re.sub(r"^#+\s*", "", lines[i]).strip()
        if text:
            blocks.append(text)
        i += 1
    return Section("Vision-language pretraining", "dual encoders pretrained on real, synthetic or both kinds of "
                   "pairs, scored on real test images; synthetic pairs help when `real_synth` beats `real`.", blocks)


def segmentation_section(dep: Dep) -> Section:
    m = metrics(dep, "segment")
    methods = [("seg", "attention (the model)"), ("seg_otsu", "Otsu (intensities)"), ("seg_kmeans", "k-means (intensities)")]
    keys = sorted({k[len("seg_"):-len("_ci_low")] for k in m if k.startswith("seg_dice_") and k.endswith("_ci_low")})
    blocks: list = []
    if keys:
        blocks.append(f"Dice on {fmt(m.get('n_images'))} real images, mean over images with a bootstrap 95 % interval; "
                      "`dice_mean` averages the classes but the background, `dice_foreground` is everything but the "
                      "background (the demo's brain mask).")
        blocks.append(Table(["Dice", *(name for _, name in methods)],
                            [[k, *(with_interval(m, f"{prefix}_{k}") for prefix, _ in methods)] for k in keys]
                            + [["segments per image", *(fmt(m.get(f"{prefix}_segments_mean")) for prefix, _ in methods)]]))
    blocks.append(Figure("segmentation", png(dep("segment/overlays.png")), "image, mask, attention segments, matched classes"))
    return Section("Zero-shot segmentation", "segments merged from the UNet's self-attention on real images, matched "
                   "one-to-one to the mask classes (Hungarian), beside two baselines that need no model; the model "
                   "has learned anatomy where its segments come near or beat them.", blocks)


def sections(dep: Dep) -> list[Section]:
    m = metrics(dep, "evaluate")
    return [dataset_section(dep), vae_section(dep), diffusion_section(dep), samples_section(dep),
            fidelity_section(dep, m), privacy_section(dep, m), augmentation_section(dep), vlp_section(dep),
            segmentation_section(dep)]
