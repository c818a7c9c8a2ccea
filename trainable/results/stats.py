"""The uncertainty of cross-validation results: a t-interval over folds, and the corrected resampled t-test for
comparing two configs over the same folds (Nadeau & Bengio, 2003). Pure functions of per-fold accuracies.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not len(values):
        return None, None
    mean = float(np.mean(values))
    return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def ci95(values: Sequence[float], test_train_ratio: float = 0.0) -> tuple[float, float] | None:
    """95 % t-interval of the mean over folds (None for fewer than two folds).

    With ``test_train_ratio`` = n_test/n_train > 0, the interval of Nadeau & Bengio (2003):
    mean ± t(0.975, k-1) · s · √(1/k + n_test/n_train), wider than the plain mean ± t · s / √k (ratio 0) because the
    folds' training sets overlap, so the fold results are correlated.
    """
    from scipy import stats

    k = len(values)
    if k < 2 or not math.isfinite(test_train_ratio):
        return None
    mean, std = mean_std(values)
    half = float(stats.t.ppf(0.975, k - 1)) * std * math.sqrt(1 / k + test_train_ratio)
    return mean - half, mean + half


def corrected_paired_ttest(a: Sequence[float], b: Sequence[float], test_train_ratio: float) -> dict[str, float | None]:
    """Compare per-fold accuracies ``a`` with ``b`` (same folds, same order), two-sided.

    The folds' training sets overlap, so the plain paired t-test is too confident; the corrected resampled t-test
    inflates the variance of the differences: var · (1/k + n_test/n_train). ``test_train_ratio`` is n_test/n_train.
    Returns mean_difference (a - b), t, p_value, folds; t and p are None for fewer than two folds.
    """
    from scipy import stats

    d = np.subtract(a, b, dtype=float)
    k = len(d)
    result: dict[str, float | None] = {"mean_difference": float(d.mean()) if k else None, "t": None, "p_value": None,
                                       "folds": k}
    if k < 2:
        return result
    var = float(np.var(d, ddof=1))
    mean = float(d.mean())
    if var == 0.0:  # identical differences on every fold
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / math.sqrt(var * (1 / k + test_train_ratio))
    result["t"] = t
    result["p_value"] = float(2 * stats.t.sf(abs(t), k - 1))
    return result
