"""Uncertainty for results over a few seeds: t-based 95 % intervals and paired t-tests."""

from __future__ import annotations

import numpy as np
from scipy import stats


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95 % t confidence interval (0 for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


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
