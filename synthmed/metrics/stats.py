"""Uncertainty: t-based 95 % intervals over a few seeds, paired t-tests, Holm's correction for the many arms x
regimes tested at once, and bootstrap intervals over images."""

from __future__ import annotations

from typing import Callable, NamedTuple

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


# Paired comparisons over test items. Two arms scored on the same test items by models from the same seeds
# differ item by item; the test items, not the handful of seeds, are the replicates. ``treated`` and ``control``
# are per-item scores [seeds, items] (a 1-D array is one seed), row s of both from seed s.

_BLOCK_ELEMENTS = 2**22  # resampling draws are made a block at a time: draws x items stays within this


class PairedGain(NamedTuple):
    """The gain of treated over control (mean over seeds and items), the 2.5/97.5 percentiles of its paired
    bootstrap over items, a two-sided p-value for "no gain", the gain's standard error, and the items used."""

    gain: float
    ci_low: float
    ci_high: float
    p: float
    se: float
    items: int


def _blocks(draws: int, items: int):
    step = max(1, _BLOCK_ELEMENTS // max(items, 1))
    for start in range(0, draws, step):
        yield min(step, draws - start)


def _by_seed(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[None] if v.ndim == 1 else v


def item_differences(treated, control) -> np.ndarray:
    """Each item's treated - control difference averaged over seeds ([seeds, items] -> [items]); items with a
    non-finite score are dropped."""
    t, c = _by_seed(treated), _by_seed(control)
    if t.shape != c.shape or t.ndim != 2:
        raise ValueError(f"paired scores need the same [seeds, items] shape, got {t.shape} and {c.shape}")
    d = (t - c).mean(0)
    return d[np.isfinite(d)]


def sign_flip_p(diffs, draws: int, seed: int) -> float:
    """Two-sided paired permutation (sign-flip) test of "mean difference 0" over items.

    Under the null each item's difference is as likely to have the other sign, so the observed |sum| is
    ranked among sums with random signs. Exact (every one of the 2^n sign patterns) when 2^n <= draws,
    else ``draws`` random patterns with the +1 correction: (1 + #as extreme) / (1 + draws), never 0.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    observed = abs(d.sum())
    if not n or draws <= 0 or observed == 0:
        return 1.0
    tol = 1e-9 * np.abs(d).sum()  # sums of the same values in another order must count as ties
    if 2**n <= draws:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    extreme = sum(int((np.abs((1 - 2 * rng.integers(0, 2, size=(b, n))) @ d) >= observed - tol).sum())
                  for b in _blocks(draws, n))
    return (1 + extreme) / (1 + draws)


def paired_item_gain(treated, control, draws: int, seed: int) -> PairedGain:
    """The gain of treated over control for a score that is a mean over test items (accuracy, recall@K):
    the mean over seeds and items of the per-item difference, a paired bootstrap-over-items 95 % interval
    and a sign-flip p-value on the items' seed-averaged differences (``sign_flip_p``), both from ``draws``
    draws seeded by ``seed``. se is the differences' SD / sqrt(items)."""
    d = item_differences(treated, control)
    n = len(d)
    if not n:
        return PairedGain(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), 0)
    gain = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    if n < 2 or draws <= 0:
        return PairedGain(gain, gain, gain, 1.0, se, n)
    rng = np.random.default_rng(seed)
    boot = np.concatenate([d[rng.integers(0, n, size=(b, n))].mean(1) for b in _blocks(draws, n)])
    low, high = np.percentile(boot, [2.5, 97.5])
    return PairedGain(gain, float(low), float(high), sign_flip_p(d, draws, int(rng.integers(2**31))), se, n)


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of one score column with item weights [draws, items] (ties count half): the
    weighted share of (positive, negative) pairs ranked right; NaN where a draw has no positive or no negative."""
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (wp * (below + 0.5 * wn)).sum(1) / den, np.nan)


def macro_auc(scores, labels, weights=None) -> np.ndarray:
    """Macro one-vs-rest AUC of class scores [items, classes] against class indices [items], per row of item
    weights [draws, items] (default: each item once). Classes with no positive or no negative item, and
    columns with a non-finite score (a class the model does not score), are left out."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels)
    w = np.ones((1, len(y))) if weights is None else np.asarray(weights, dtype=float)
    per = [_weighted_auc(s[:, k], y == k, w) for k in range(s.shape[1]) if np.isfinite(s[:, k]).all()]
    if not per:
        return np.full(len(w), np.nan)
    per = np.stack(per)
    counted = np.isfinite(per).sum(0)
    return np.where(counted > 0, np.nansum(per, 0) / np.maximum(counted, 1), np.nan)


def paired_auc_gain(treated, control, labels, draws: int, seed: int) -> PairedGain:
    """The macro-AUC gain of treated over control class scores ([seeds, items, classes]; [items, classes] is
    one seed) on the same items with class indices ``labels`` [items]: AUC does not split into per-item
    scores, so the items are resampled with replacement (the same draw for both arms and every seed) and the
    AUCs recomputed. Interval: the 2.5/97.5 percentiles of the bootstrap gains; p: the bootstrap centred on
    the observed gain as the null, (1 + #|g* - gain| >= |gain|) / (1 + draws); se: the bootstrap gains' SD."""
    t, c = np.asarray(treated, dtype=float), np.asarray(control, dtype=float)
    t, c = (t[None], c[None]) if t.ndim == 2 else (t, c)
    if t.shape != c.shape or t.ndim != 3:
        raise ValueError(f"paired class scores need the same [seeds, items, classes] shape, got {t.shape} and {c.shape}")
    n = t.shape[1]

    def gains(w):
        return np.mean([macro_auc(t[s], labels, w) - macro_auc(c[s], labels, w) for s in range(len(t))], axis=0)

    gain = float(gains(np.ones((1, n)))[0])
    if n < 2 or draws <= 0 or not np.isfinite(gain):
        return PairedGain(gain, gain, gain, 1.0, float("nan"), n)
    rng = np.random.default_rng(seed)
    boot = np.concatenate([gains(rng.multinomial(n, np.full(n, 1 / n), size=b)) for b in _blocks(draws, n)])
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5])
    p = (1 + int((np.abs(boot - gain) >= abs(gain) - 1e-12).sum())) / (1 + len(boot)) if gain else 1.0
    return PairedGain(gain, float(low), float(high), float(p), float(boot.std(ddof=1)), n)


def min_detectable_gain(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true gain a two-sided test at level ``alpha`` detects with probability ``power``, for a
    gain estimated with standard error ``se`` (normal approximation): (z_{1-alpha/2} + z_power) x se,
    2.80 x se at the defaults."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)
