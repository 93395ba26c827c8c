"""Does synthetic data help a classifier? The DiNO-Diffusion protocol.

Regimes: stratified fractions of the real train split (e.g. 1 %, 10 %, 100 %). Arms in
each regime: `real` only (the control); real + synthetic at ratios of the real count
(`0p5x`, `1x`, `2x`); `synth` only, as many synthetic images as the regime has real ones.
Every arm of a regime uses the same real subset and classifier seed for a given
repetition, so arms are compared pairwise by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch

from synthmed.data.disk_array import Rows, as_rows
from synthmed.metrics.downstream import ClassifierConfig, predict, score_classifier, train_classifier
from synthmed.metrics.stats import bootstrap_ci, summarise_arms
from synthmed.core.config import require_at_least_one, require_fractions, require_non_negative
from synthmed.core.provenance import derive_seed
from synthmed.core.progress import progress

METRICS = ("auc", "acc", "bacc")
ADHERENCE_COLUMNS = ["rep", "prompt_label", "predicted_label"]
RUN_COLUMNS = ["regime", "arm", "rep", "n_real", "n_synth", "n_synth_requested", *METRICS]


def regime_name(fraction: float) -> str:
    return f"{fraction * 100:g}pct".replace(".", "p")


def ratio_name(ratio: float) -> str:
    return f"{ratio:g}x".replace(".", "p")


@dataclass
class AugmentationParams:
    """evaluate.augmentation: the study's design."""
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
class AdherenceParams:
    """evaluate.adherence: the judge of prompt adherence, classifiers trained on all real train images by the
    classifier's rule with more steps and blur (a judge that reads texture takes any blurred image for one
    class, whatever its anatomy: docs/metrics.md)."""
    steps: int
    blur_sigma: float  # augmentation blur, sigma uniform in [0, blur_sigma] pixels
    seeds: int  # judges (classifier seeds); adherence is their mean

    def __post_init__(self):
        require_at_least_one(self, "steps", "seeds")
        require_non_negative(self, "blur_sigma")


BLUR_CHECK_SIGMA = 1.0  # the judge's accuracy on real test images blurred this much (pixels) says it reads anatomy


@dataclass
class Cell:
    regime: str
    arm: str
    rep: int  # repetition: pairs arms within a regime
    clf_seed: int
    real_idx: np.ndarray
    synth_idx: np.ndarray
    synth_requested: int = 0
    scores: dict = field(default_factory=dict)


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """round(fraction x class count) images of each class, at least one."""
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False))
    return np.sort(np.concatenate(picks))


def classifier_seed(seed: int, rep: int) -> int:
    return derive_seed(seed, "classifier", rep) % 2**31


def plan_cells(real_labels: np.ndarray, pool_size: int | dict[str, int], fractions: list[float], ratios: list[float],
               arms: list[str], reps: int, seed: int) -> list[Cell]:
    """Every (regime, arm, repetition) with the indices of its real and synthetic training images.

    ``pool_size``: the synthetic pool's size, or several pools' sizes by name (e.g. generation modes), laid end
    to end in that order; each pool gets its own arms, named ``<arm>_<pool>`` but for the first pool's, and
    all share one real control per regime and repetition."""
    pools = pool_size if isinstance(pool_size, dict) else {"": pool_size}
    offsets = np.cumsum([0, *pools.values()])
    cells = []
    for f in fractions:
        for rep in range(reps):
            real = stratified_subset(real_labels, f, np.random.default_rng(derive_seed(seed, "regime", f, rep)))
            clf_seed = classifier_seed(seed, rep)
            cells.append(Cell(regime_name(f), "real", rep, clf_seed, real, np.array([], dtype=int)))
            for k, (pool, size) in enumerate(pools.items()):
                extra = [(ratio_name(r), r, real) for r in ratios] if "real_synth" in arms else []
                extra += [("synth", 1.0, np.array([], dtype=int))] if "synth" in arms else []
                for arm, ratio, keep in extra:
                    want = int(round(ratio * len(real)))
                    # the first pool draws as a single pool always did: its cells do not depend on the others
                    rng = np.random.default_rng(derive_seed(seed, "synthetic", f, arm, rep, *([pool] if k else [])))
                    synth = np.sort(rng.choice(size, size=min(want, size), replace=False)) + offsets[k]
                    cells.append(Cell(regime_name(f), f"{arm}_{pool}" if k else arm, rep, clf_seed, keep, synth, want))
    return cells


def run_cells(cells: list[Cell], real_x, real_y, synth_x, synth_y, test_x, test_y, n_classes: int,
              cfg: ClassifierConfig, val: tuple | None = None) -> pd.DataFrame:
    """Train (keeping the weights that score best on real ``val``, if given) and score every cell; one row each."""
    rows = []
    for cell in progress(cells, desc="classifier cells"):
        x = as_rows(real_x).subset(cell.real_idx) + as_rows(synth_x).subset(cell.synth_idx)  # read by batch
        y = torch.cat([real_y[cell.real_idx], synth_y[cell.synth_idx]])
        cell.scores = score_classifier(train_classifier(x, y, n_classes, cfg, cell.clf_seed, val), test_x, test_y)
        rows.append({"regime": cell.regime, "arm": cell.arm, "rep": cell.rep, "n_real": len(cell.real_idx),
                     "n_synth": len(cell.synth_idx), "n_synth_requested": cell.synth_requested, **cell.scores})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def encode(labels, classes: list[str]) -> torch.Tensor:
    """Class indices; -1 for unlabelled images and classes unseen in real train (left out of scoring)."""
    code = {c: i for i, c in enumerate(classes)}
    return torch.tensor([code.get(c, -1) for c in labels], dtype=torch.long)


@dataclass
class Study:
    runs: pd.DataFrame  # one row per (regime, arm, repetition)
    table: pd.DataFrame  # mean ± CI per (regime, arm), gains over `real` with raw and Holm p-values
    flat: dict[str, float]  # the table as flat metrics (aug_...)
    cells: list[Cell]


def subset(images_labels: tuple, mask) -> tuple[Rows, torch.Tensor]:
    """(images, labels) of the rows in ``mask``; the images stay where they are (a Rows: nothing is read)."""
    x, y = images_labels
    return as_rows(x).subset(mask), y[torch.as_tensor(mask)]


def _labelled(x, y):
    return subset((x, y), y >= 0)


def run_study(real: tuple, pool: tuple | dict[str, tuple], test: tuple, n_classes: int, fractions: list[float],
              ratios: list[float], arms: list[str], reps: int, cfg: ClassifierConfig, seed: int,
              val: tuple | None = None) -> Study:
    """Every regime x arm x repetition on (images, class indices) of real train, the synthetic pool (or several,
    by name: plan_cells) and real test (and real val, which picks each classifier's weights); images with index
    -1 are left out. Without labelled synthetic images only the real arm runs."""
    pools = {k: _labelled(*v) for k, v in (pool if isinstance(pool, dict) else {"": pool}).items()}
    (real_x, real_y), (test_x, test_y) = _labelled(*real), _labelled(*test)
    val = _labelled(*val) if val is not None else None
    pools = {k: v for k, v in pools.items() if len(v[0])}
    if arms and not pools:
        print("evaluate: no labelled synthetic images in the augmentation pool; real-only arm only")
        arms = []
    pool_x = sum((x for x, _ in pools.values()), start=real_x.subset([]))
    pool_y = torch.cat([real_y[:0], *(y for _, y in pools.values())])
    cells = plan_cells(real_y.numpy(), {k: len(x) for k, (x, _) in pools.items()}, fractions, ratios, arms, reps, seed)
    short = [c for c in cells if len(c.synth_idx) < c.synth_requested]
    if short:
        print(f"evaluate: {len(short)} cell(s) asked for more synthetic images than the pool has; they use the "
              "whole pool (n_synth in augmentation.csv). Raise prompts.images_per_prompt")
    runs = run_cells(cells, real_x, real_y, pool_x, pool_y, test_x, test_y, n_classes, cfg, val)
    table, flat = summarise(runs)
    sizes = {f"n_synthetic_pool{'_' + k if i else ''}": len(x) for i, (k, (x, _)) in enumerate(pools.items())}
    return Study(runs, table, {**flat, "n_synthetic_pool": 0, **sizes}, cells)


def train_judges(real: tuple, n_classes: int, cfg: ClassifierConfig, seeds: int, seed: int,
                 val: tuple | None = None) -> list:
    """The adherence judges: ``seeds`` classifiers trained on all labelled real train images by ``cfg``."""
    (x, y), val = _labelled(*real), (_labelled(*val) if val is not None else None)
    return [train_classifier(x, y, n_classes, cfg, classifier_seed(seed, rep), val)
            for rep in progress(range(seeds), desc="adherence judges")]


def prompt_adherence(judges: list, synth: tuple, test: tuple, n_classes: int, seed: int,
                     resamples: int) -> tuple[dict[str, float], pd.DataFrame]:
    """Share of labelled synthetic images that the judges assign to their prompt's label (their mean), with a
    bootstrap 95 % interval over the synthetic images; beside the judges' accuracy on real test (the ceiling)
    and on real test blurred by BLUR_CHECK_SIGMA (a judge that fails there reads texture, not anatomy). And
    which labels they are taken for: one row per (judge, synthetic image) with its prompt's label and the
    predicted one (class indices), the confusion table that says which levels a generator mixes up."""
    (synth_x, synth_y), (test_x, test_y) = _labelled(*synth), _labelled(*test)
    if not len(synth_x):
        return {}, pd.DataFrame(columns=ADHERENCE_COLUMNS)
    hits, real_acc, blurred_acc, rows = [], [], [], []
    for rep, model in enumerate(judges):
        pred = predict(model, synth_x).argmax(1)
        hits.append(pred == synth_y.numpy())
        real_acc.append(score_classifier(model, test_x, test_y)["acc"])
        blurred_acc.append(score_classifier(model, test_x, test_y, blur_sigma=BLUR_CHECK_SIGMA)["acc"])
        rows.append(pd.DataFrame({"rep": rep, "prompt_label": synth_y.numpy(), "predicted_label": pred}))
    mean, low, high = bootstrap_ci(np.mean(hits, axis=0), resamples, derive_seed(seed, "adherence") % 2**31)
    return ({"adherence_acc": mean, "adherence_acc_ci_low": low, "adherence_acc_ci_high": high,
             "adherence_real_test_acc": float(np.mean(real_acc)),
             "adherence_real_test_blurred_acc": float(np.mean(blurred_acc)),
             "adherence_chance": float(np.bincount(synth_y.numpy(), minlength=n_classes).max() / len(synth_y))},
            pd.concat(rows, ignore_index=True))


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI per (regime, arm) and the paired gain over `real` with its p-value.

    Returns the table and flat metrics: aug_<metric>_<regime>_<arm>, aug_gain_<metric>_<regime>_<arm>
    and aug_gain_<metric>_<regime>_<arm>_p.
    """
    return summarise_arms(runs, ["regime", "arm"], list(METRICS), "aug", lambda grp: {
        "seeds": len(grp), "n_real": int(grp["n_real"].iloc[0]), "n_synth": int(grp["n_synth"].iloc[0])})


def plot(table: pd.DataFrame, path, metrics=("auc", "bacc"), empty_note: str = "") -> None:
    """Grouped bars (regime x arm) with 95 % CIs; * marks a gain over `real` with Holm-corrected p < 0.05.
    An empty table (no labels: no classifier) gives a figure that says why, so the declared plot exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthmed.viz import save_figure

    if table.empty:
        fig = plt.figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, empty_note or "no augmentation study", ha="center", va="center", wrap=True)
        save_figure(fig, path)
        return
    regimes, arms = list(dict.fromkeys(table["regime"])), list(dict.fromkeys(table["arm"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(arms)
    for ax, m in zip(axes[0], metrics):
        for j, arm in enumerate(arms):
            sub = table[table["arm"] == arm].set_index("regime").reindex(regimes)
            xs = np.arange(len(regimes)) + (j - (len(arms) - 1) / 2) * width
            ax.bar(xs, sub[m], width, yerr=sub[f"{m}_ci95"], capsize=3, label=arm)
            if arm != "real":
                for x, (mean, ci, p) in zip(xs, sub[[m, f"{m}_ci95", f"gain_{m}_p_holm"]].to_numpy()):
                    if p < 0.05:
                        ax.text(x, mean + ci + 0.01, "*", ha="center")
        ax.set_xticks(np.arange(len(regimes)), regimes)
        ax.set_ylim(0, 1.1)
        ax.set_title({"auc": "macro AUC", "acc": "accuracy", "bacc": "balanced accuracy"}[m])
        ax.set_xlabel("real training data")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(arms), fontsize=8, frameon=False)
    fig.text(0.99, 0.01, "* gain over real, paired by seed, Holm-corrected p < 0.05", ha="right", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.92))
    save_figure(fig, path)
