"""The VLP study's summary: mean ± CI per arm, paired gains over `real` with raw and Holm p-values, and
report.md with the chance level beside every recall."""

from __future__ import annotations

import pandas as pd

from synthmed.metrics.augmentation import regime_name
from synthmed.metrics.stats import summarise_arms

# Per-run diagnostics, not outcomes: the training loss and temperature of arms trained on different
# corpora are not comparable, so they get no gain or p-value (they stay in runs.csv).
DIAGNOSTICS = ("arm", "rep", "pairs", "final_loss", "temperature")


def summarise(runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI per arm and metric; for arms other than `real`, the gain over `real`
    paired by seed with its p-value (flat: vlp_<metric>_<arm>, vlp_gain_<metric>_<arm>[_p, _p_holm])."""
    metrics = [c for c in runs.columns if c not in DIAGNOSTICS]
    return summarise_arms(runs, ["arm"], metrics, "vlp", lambda grp: {"pairs": int(grp["pairs"].iloc[0])})


def headline(arms: list[str], probe_fractions: list[float], flat: dict) -> list[str]:
    """The figures `dvc exp show` compares: the gain of adding synthetic pairs where labels are scarcest (linear
    probe; image->text retrieval for unlabelled data), with its Holm-corrected p-value."""
    arm = "real_synth" if "real_synth" in arms else "synth"
    probe = f"vlp_gain_probe_auc_{regime_name(min(probe_fractions))}_{arm}"
    key = probe if probe in flat else f"vlp_gain_i2t_r5_{arm}"
    return [key, f"{key}_p_holm"]


def report(table: pd.DataFrame, arms: list[str], probe_fractions: list[float], seeds: int, steps: int,
           test_split: str, chance: dict[str, float], notes: list[str]) -> str:
    def cell(arm, col):
        r = table[(table["arm"] == arm)].iloc[0]
        return f"{r[col]:.3f} ± {r[col + '_ci95']:.3f}"

    fracs = [f for f in map(regime_name, probe_fractions) if f"probe_auc_{f}" in table.columns]
    lines = ["# Vision-language pretraining: real vs synthetic pairs", "",
             f"Mean ± 95 % CI over {seeds} seeds; every arm trained {steps} steps from the same seeds. "
             f"Scores on the real `{test_split}` split.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    if fracs:
        lines += ["## Linear probe (macro AUC / accuracy) by share of labelled real train images", "",
                  "| arm | " + " | ".join(fracs) + " |", "|---|" + "---|" * len(fracs)]
        lines += [f"| {arm} | " + " | ".join(f"{cell(arm, f'probe_auc_{f}')} / {cell(arm, f'probe_acc_{f}')}"
                                             for f in fracs) + " |" for arm in arms]
    cols = [c for c in ("zeroshot_acc", "zeroshot_auc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                        "t2i_r10") if c in table.columns]
    title = "Zero-shot classification and retrieval" if "zeroshot_acc" in cols else "Retrieval"
    lines += ["", f"## {title}", "",
              f"Retrieval ranks {chance['i2t_candidates']} distinct test captions (image->text) and "
              f"{chance['t2i_candidates']} test images (text->image); every caption of an image is a positive. "
              "The `chance` row is what a random ranking scores.", "",
              "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(cell(arm, c) for c in cols) + " |")
    lines.append("| chance | " + " | ".join(f"{chance[c + '_chance']:.3f}" if c + "_chance" in chance else ""
                                            for c in cols) + " |")
    others = [a for a in arms if a != "real"] if "real" in arms else []
    gains = [f"probe_auc_{f}" for f in fracs] + [c for c in ("zeroshot_acc", "i2t_r10", "t2i_r10") if c in cols]
    if others and gains:
        lines += ["", "## Paired difference against `real`", "",
                  "Mean ± 95 % CI; paired t-test p, then Holm-corrected over every gain of that metric.", "",
                  "| arm | " + " | ".join(gains) + " |", "|---|" + "---|" * len(gains)]
        for arm in others:
            r = table[table["arm"] == arm].iloc[0]
            lines.append(f"| {arm} | " + " | ".join(
                f"{r[f'gain_{c}']:+.3f} ± {r[f'gain_{c}_ci95']:.3f} (p={r[f'gain_{c}_p']:.2f}, "
                f"Holm {r[f'gain_{c}_p_holm']:.2f})" for c in gains) + " |")
    return "\n".join(lines) + "\n"
