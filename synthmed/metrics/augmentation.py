"""Does synthetic data help a classifier? The DiNO-Diffusion protocol.

Regimes: stratified fractions of the real train split (e.g. 1 %, 10 %, 100 %). Arms in
each regime: `real` only (the control); real + synthetic at ratios of the real count
(`0p5x`, `1x`, `2x`); `synth` only, as many synthetic images as the regime has real ones.
Every arm of a regime uses the same real subset and classifier seed for a given
repetition, so arms are compared pairwise by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from synthmed.metrics.downstream import ClassifierConfig, score_classifier, train_classifier
from synthmed.metrics.stats import summarise_arms
from synthmed.provenance import derive_seed
from synthmed.runtime import progress

METRICS = ("auc", "acc", "bacc")


def regime_name(fraction: float) -> str:
    return f"{fraction * 100:g}pct".replace(".", "p")


def ratio_name(ratio: float) -> str:
    return f"{ratio:g}x".replace(".", "p")


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
    model: object = None  # the trained classifier, once run


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """round(fraction x class count) images of each class, at least one."""
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(rng.choice(idx, size=max(1, int(round(fraction * len(idx)))), replace=False))
    return np.sort(np.concatenate(picks))


def classifier_seed(seed: int, rep: int) -> int:
    return derive_seed(seed, "classifier", rep) % 2**31


def plan_cells(real_labels: np.ndarray, pool_size: int, fractions: list[float], ratios: list[float],
               arms: list[str], reps: int, seed: int) -> list[Cell]:
    """Every (regime, arm, repetition) with the indices of its real and synthetic training images."""
    cells = []
    for f in fractions:
        for rep in range(reps):
            real = stratified_subset(real_labels, f, np.random.default_rng(derive_seed(seed, "regime", f, rep)))
            clf_seed = classifier_seed(seed, rep)
            cells.append(Cell(regime_name(f), "real", rep, clf_seed, real, np.array([], dtype=int)))
            extra = [(ratio_name(r), r, real) for r in ratios] if "real_synth" in arms else []
            extra += [("synth", 1.0, np.array([], dtype=int))] if "synth" in arms else []
            for arm, ratio, keep in extra:
                want = int(round(ratio * len(real)))
                rng = np.random.default_rng(derive_seed(seed, "synthetic", f, arm, rep))
                synth = np.sort(rng.choice(pool_size, size=min(want, pool_size), replace=False))
                cells.append(Cell(regime_name(f), arm, rep, clf_seed, keep, synth, want))
    return cells


def run_cells(cells: list[Cell], real_x, real_y, synth_x, synth_y, test_x, test_y, n_classes: int,
              cfg: ClassifierConfig) -> pd.DataFrame:
    """Train and score every cell; one row per cell."""
    rows = []
    for cell in progress(cells, desc="classifier cells"):
        x = torch.cat([real_x[cell.real_idx], synth_x[cell.synth_idx]])
        y = torch.cat([real_y[cell.real_idx], synth_y[cell.synth_idx]])
        cell.model = train_classifier(x, y, n_classes, cfg, cell.clf_seed)
        cell.scores = score_classifier(cell.model, test_x, test_y)
        rows.append({"regime": cell.regime, "arm": cell.arm, "rep": cell.rep, "n_real": len(cell.real_idx),
                     "n_synth": len(cell.synth_idx), "n_synth_requested": cell.synth_requested, **cell.scores})
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI per (regime, arm) and the paired gain over `real` with its p-value.

    Returns the table and flat metrics: aug_<metric>_<regime>_<arm>, aug_gain_<metric>_<regime>_<arm>
    and aug_gain_<metric>_<regime>_<arm>_p.
    """
    return summarise_arms(runs, ["regime", "arm"], list(METRICS), "aug", lambda grp: {
        "seeds": len(grp), "n_real": int(grp["n_real"].iloc[0]), "n_synth": int(grp["n_synth"].iloc[0])})


def plot(table: pd.DataFrame, path, metrics=("auc", "bacc")) -> None:
    """Grouped bars (regime x arm) with 95 % CIs; * marks a paired p < 0.05 against `real`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from synthmed.io import atomic_path

    regimes, arms = list(dict.fromkeys(table["regime"])), list(dict.fromkeys(table["arm"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(arms)
    for ax, m in zip(axes[0], metrics):
        for j, arm in enumerate(arms):
            sub = table[table["arm"] == arm].set_index("regime").reindex(regimes)
            xs = np.arange(len(regimes)) + (j - (len(arms) - 1) / 2) * width
            ax.bar(xs, sub[m], width, yerr=sub[f"{m}_ci95"], capsize=3, label=arm)
            if arm != "real":
                for x, (mean, ci, p) in zip(xs, sub[[m, f"{m}_ci95", f"gain_{m}_p"]].to_numpy()):
                    if p < 0.05:
                        ax.text(x, mean + ci + 0.01, "*", ha="center")
        ax.set_xticks(np.arange(len(regimes)), regimes)
        ax.set_ylim(0, 1.1)
        ax.set_title({"auc": "macro AUC", "acc": "accuracy", "bacc": "balanced accuracy"}[m])
        ax.set_xlabel("real training data")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(arms), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
