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

    Identical differences have no variance: p is 1 when they are all zero, 0 otherwise.
    """
    diff = np.asarray(treated, dtype=float) - np.asarray(control, dtype=float)
    if len(diff) < 2:
        return float("nan")
    if np.allclose(diff, diff[0]):
        return 1.0 if np.isclose(diff[0], 0) else 0.0
    return float(stats.ttest_rel(treated, control).pvalue)
