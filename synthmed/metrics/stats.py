"""Uncertainty: t-based 95 % intervals over a few seeds, paired t-tests, Holm's correction for the many arms x
regimes tested at once, and bootstrap intervals over images."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95 % t confidence interval (0 for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def bootstrap_ci(values, draws: int, seed: int) -> tuple[float, float, float]:
    """Mean of the finite values and the 2.5/97.5 percentiles of its bootstrap over them (images)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    if len(v) < 2 or draws <= 0:
        return float(v.mean()), float(v.mean()), float(v.mean())
    means = np.random.default_rng(seed).choice(v, size=(draws, len(v)), replace=True).mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_p(treated, control) -> float:
    """Two-sided paired t-test p-value of treated vs control (paired by seed).

    When all paired differences are equal (common for accuracy on a small test set) the t
    statistic is undefined; the exact sign-flip test is used instead: p = 1 for all-zero
    differences, else 2 / 2^n, the chance that n fair coin flips all agree.
    """
    diff = np.asarray(treated, dtype=float) - np.asarray(control, dtype=float)
    if len(diff) < 2:
        return 1.0
    if np.allclose(diff, diff[0]):
        return 1.0 if np.isclose(diff[0], 0) else min(1.0, 2 / 2 ** len(diff))
    return float(stats.ttest_rel(treated, control).pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error), in the input order.

    Sorted ascending, the i-th smallest (0-based) of m is scaled by (m - i); the running maximum
    keeps the adjusted values monotone, and they are capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = scaled
    return out


def summarise_arms(runs: pd.DataFrame, groups: list[str], metrics: list[str], prefix: str,
                   describe: Callable[[pd.DataFrame], dict], control: str = "real"
                   ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Mean ± 95 % CI per group of repetitions, and each arm's gain over the ``control`` arm of the
    same group, paired by ``rep``, with its p-value.

    ``groups`` ends with "arm"; the columns before it (e.g. a data regime) pick the control's rows.
    Returns the table (``describe(rows)`` adds descriptive columns) and flat metrics
    <prefix>_<metric>_<group values>, <prefix>_gain_<metric>_<group values>, ..._p and ..._p_holm: the
    p-value corrected for every gain of that metric in the table (the family a reader scans for stars).
    """
    table, flat = [], {}
    for keys, grp in runs.groupby(groups, sort=False):
        where = dict(zip(groups, keys if isinstance(keys, tuple) else (keys,)))
        same = np.logical_and.reduce([runs[g] == v for g, v in where.items() if g != "arm"] + [runs["arm"] == control])
        ctrl, grp = runs[same].sort_values("rep"), grp.sort_values("rep")
        name = "_".join(map(str, where.values()))
        row = {**where, **describe(grp)}
        for m in metrics:
            row[m], row[f"{m}_ci95"] = mean_ci(grp[m])
            flat[f"{prefix}_{m}_{name}"] = row[m]
            if where["arm"] != control and len(ctrl):
                row[f"gain_{m}"], row[f"gain_{m}_ci95"] = mean_ci(grp[m].to_numpy() - ctrl[m].to_numpy())
                row[f"gain_{m}_p"] = paired_p(grp[m], ctrl[m])
                flat[f"{prefix}_gain_{m}_{name}"] = row[f"gain_{m}"]
                flat[f"{prefix}_gain_{m}_{name}_p"] = row[f"gain_{m}_p"]
        table.append(row)
    table = pd.DataFrame(table)
    for m in metrics:
        tested = table[f"gain_{m}_p"].notna() if f"gain_{m}_p" in table else pd.Series(False, index=table.index)
        if tested.any():
            table.loc[tested, f"gain_{m}_p_holm"] = holm(table.loc[tested, f"gain_{m}_p"])
            for _, row in table[tested].iterrows():
                name = "_".join(str(row[g]) for g in groups)
                flat[f"{prefix}_gain_{m}_{name}_p_holm"] = float(row[f"gain_{m}_p_holm"])
    return table, flat
