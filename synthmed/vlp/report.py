"""The VLP study's summary: mean ± CI per arm, paired gains over `real` with raw and Holm p-values, and
report.md with the chance level beside every recall.

A handful of seeds cannot test a gain (two seeds: a t-test with 1 degree of freedom). Gains are tested over
the real test items instead, paired: every arm's models score the same items from the same seeds, so each
item's seed-averaged difference is one replicate (``synthmed.metrics.stats.paired_item_gain``; an AUC, which
does not split into items, by a paired bootstrap over items, ``paired_auc_gain``). The seed t-test stays as
``..._p_seeds``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from synthmed.core.provenance import derive_seed
from synthmed.metrics.augmentation import regime_name
from synthmed.metrics.stats import holm, min_detectable_gain, paired_auc_gain, paired_item_gain, summarise_arms
from synthmed.vlp.evaluation import ClassScores, ItemScores

# Per-run diagnostics, not outcomes: the training loss and temperature of arms trained on different
# corpora are not comparable, so they get no gain or p-value (they stay in runs.csv).
DIAGNOSTICS = ("arm", "rep", "pairs", "final_loss", "temperature")


def summarise(runs: pd.DataFrame, items: dict[tuple[str, int], ItemScores] | None = None, draws: int = 0,
              seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI over seeds per arm and metric; for arms other than `real`, the gain over `real` with its
    p-value, Holm-corrected over the arms (flat: vlp_<metric>_<arm>, vlp_gain_<metric>_<arm>[_p, _p_holm]).

    With ``items`` ((arm, rep) -> that model's per-item results, from ``evaluate_model``) every metric they
    cover is tested over the test items (``item_gains``); the rest, paired by seed only."""
    metrics = [c for c in runs.columns if c not in DIAGNOSTICS]
    table, flat = summarise_arms(runs, ["arm"], metrics, "vlp", lambda grp: {"pairs": int(grp["pairs"].iloc[0])})
    if items:
        table, flat = item_gains(runs, table, flat, items, metrics, draws, seed)
    return table, flat


def item_gains(runs: pd.DataFrame, table: pd.DataFrame, flat: dict[str, float],
               items: dict[tuple[str, int], ItemScores], metrics: list[str], draws: int, seed: int
               ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Replace the seed-paired tests of the metrics ``items`` covers by paired tests over the test items.

    Per arm and metric: gain (mean over seeds and items of the per-item difference; an AUC's: the mean over
    seeds of its difference), gain_<m>_ci_low/_ci_high (paired bootstrap over items, 95 %), gain_<m>_p
    (sign-flip test over items; AUC: centred paired bootstrap), gain_<m>_p_holm (Holm over the arms),
    gain_<m>_items, gain_<m>_min_detectable (the gain found at alpha 0.05 with 80 % power at this test set's
    size and per-item spread), and the seed t-test kept as gain_<m>_p_seeds / gain_<m>_ci95_seeds.
    Flat: vlp_gain_<m>_<arm>[_ci_low, _ci_high, _p, _p_holm, _p_seeds], vlp_min_detectable_gain_<m>_<arm>."""
    table, flat = table.copy(), dict(flat)
    reps = {arm: set(runs.loc[runs["arm"] == arm, "rep"]) for arm in table["arm"]}
    for m in metrics:
        tested = []
        for i, arm in table["arm"].items():
            shared = sorted(reps[arm] & reps.get("real", set()))
            if arm == "real" or not shared or not all(m in items.get((a, r), {}) for a in (arm, "real") for r in shared):
                continue
            treated, control = [items[(arm, r)][m] for r in shared], [items[("real", r)][m] for r in shared]
            draw_seed = derive_seed(seed, "vlp_items", m, arm) % 2**31
            if isinstance(control[0], ClassScores):
                res = paired_auc_gain(np.stack([t.scores for t in treated]), np.stack([c.scores for c in control]),
                                      control[0].labels, draws, draw_seed)
            else:
                res = paired_item_gain(np.stack(treated), np.stack(control), draws, draw_seed)
            if f"gain_{m}_ci95" in table:
                table.loc[i, f"gain_{m}_ci95_seeds"] = table.loc[i, f"gain_{m}_ci95"]
                table.loc[i, f"gain_{m}_p_seeds"] = table.loc[i, f"gain_{m}_p"]
                flat[f"vlp_gain_{m}_{arm}_p_seeds"] = float(table.loc[i, f"gain_{m}_p"])
            mdg = min_detectable_gain(res.se)
            table.loc[i, [f"gain_{m}", f"gain_{m}_ci_low", f"gain_{m}_ci_high", f"gain_{m}_p", f"gain_{m}_items",
                          f"gain_{m}_min_detectable"]] = [res.gain, res.ci_low, res.ci_high, res.p, res.items, mdg]
            flat.update({f"vlp_gain_{m}_{arm}": res.gain, f"vlp_gain_{m}_{arm}_ci_low": res.ci_low,
                         f"vlp_gain_{m}_{arm}_ci_high": res.ci_high, f"vlp_gain_{m}_{arm}_p": res.p,
                         f"vlp_min_detectable_gain_{m}_{arm}": mdg})
            tested.append(i)
        if tested:
            if f"gain_{m}_p" in table and set(table.index[table[f"gain_{m}_p"].notna()]) == set(tested):
                table = table.drop(columns=[f"gain_{m}_ci95"], errors="ignore")  # now gain_<m>_ci95_seeds
            table.loc[tested, f"gain_{m}_p_holm"] = holm(table.loc[tested, f"gain_{m}_p"].to_numpy(dtype=float))
            for i in tested:
                flat[f"vlp_gain_{m}_{table.loc[i, 'arm']}_p_holm"] = float(table.loc[i, f"gain_{m}_p_holm"])
    return table, flat


def headline(arms: list[str], probe_fractions: list[float], flat: dict) -> list[str]:
    """The figures `dvc exp show` compares: the gain of adding synthetic pairs where labels are scarcest (linear
    probe; image->text retrieval for unlabelled data), with its Holm-corrected p-value."""
    arm = "real_synth" if "real_synth" in arms else "synth"
    probe = f"vlp_gain_probe_auc_{regime_name(min(probe_fractions))}_{arm}"
    key = probe if probe in flat else f"vlp_gain_i2t_r5_{arm}"
    return [key, f"{key}_p_holm"]


def report(table: pd.DataFrame, arms: list[str], probe_fractions: list[float], seeds: int, steps: int,
           test_split: str, chance: dict[str, float], notes: list[str], draws: int = 0) -> str:
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
    by_items = [c for c in [f"probe_{k}_{f}" for k in ("auc", "acc") for f in fracs] + cols
                if f"gain_{c}_ci_low" in table.columns]
    if others and (gains or by_items):
        lines += ["", "## Paired difference against `real`", ""]
        if by_items:
            lines += [f"Tested over the real test items, paired: the gain is the mean over seeds and items of each "
                      f"item's difference; the interval a paired bootstrap over the items (95 %); p a two-sided "
                      f"sign-flip test on the items' seed-averaged differences (an AUC, which does not split into "
                      f"items: a paired bootstrap over the items recomputing it), {draws} draws, "
                      f"p = (1 + as extreme) / (1 + draws); Holm: corrected over every gain of that metric; "
                      f"`seeds p`: the paired t-test over the {seeds} seeds alone. `detectable`: the smallest true "
                      "gain a two-sided test at alpha 0.05 finds with 80 % power on this test set, 2.80 x the "
                      "gain's standard error (the SD of the items' seed-averaged differences / sqrt(items); AUC: "
                      "the SD of its bootstrap) at the per-item spread observed here.", ""]
            for arm in others:
                r = table[table["arm"] == arm].iloc[0]
                lines += [f"### `{arm}` - `real`", "",
                          "| metric | items | gain [95 % interval] | p | Holm | seeds p | detectable |",
                          "|---|---|---|---|---|---|---|"]
                lines += [f"| {c} | {int(r[f'gain_{c}_items'])} | {r[f'gain_{c}']:+.3f} [{r[f'gain_{c}_ci_low']:+.3f}, "
                          f"{r[f'gain_{c}_ci_high']:+.3f}] | {_p(r[f'gain_{c}_p'])} | {_p(r[f'gain_{c}_p_holm'])} | "
                          f"{_p(r.get(f'gain_{c}_p_seeds', float('nan')))} | {r[f'gain_{c}_min_detectable']:.3f} |"
                          for c in by_items if pd.notna(r[f"gain_{c}_ci_low"])]
                lines.append("")
            lines.pop()
        else:
            lines += ["Mean ± 95 % CI; paired t-test p, then Holm-corrected over every gain of that metric.", "",
                      "| arm | " + " | ".join(gains) + " |", "|---|" + "---|" * len(gains)]
            for arm in others:
                r = table[table["arm"] == arm].iloc[0]
                lines.append(f"| {arm} | " + " | ".join(
                    f"{r[f'gain_{c}']:+.3f} ± {r[f'gain_{c}_ci95']:.3f} (p={r[f'gain_{c}_p']:.2f}, "
                    f"Holm {r[f'gain_{c}_p_holm']:.2f})" for c in gains) + " |")
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    if pd.isna(p):
        return ""
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"
