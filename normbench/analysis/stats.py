"""Means, differences and ratios over seeds with 95% intervals, quantiles from `scipy.stats`.

Every function takes per-seed values (None, NaN and inf are dropped) and returns an estimate
with the half-width of its 95% interval, or NaN where the seeds give no interval: one seed has
no spread to estimate, and seeds that all agree exactly give a zero-width interval that would
claim a certainty a few seeds cannot give. `no_interval` says which, in words.

* `mean_ci`: Student's t interval of a mean.
* `diff_ci`: Welch's interval of a difference of means (Welch-Satterthwaite degrees of freedom).
* `paired_ci`: the interval of a mean paired difference (the one `scipy.stats.ttest_rel` inverts).
* `recovered_share`: Fieller's interval of a ratio of two correlated estimates.
* `welch_test`, `paired_test`: the same differences with their two-sided p-values (`scipy.stats.ttest_ind`
  with unequal variances, `scipy.stats.ttest_rel`), and `holm`, which adjusts a family of p-values for the
  number of comparisons a verdict rests on (Holm 1979: step-down, controls the family-wise error rate).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
ONE_SEED = "one seed: no interval, so no test"
NO_SPREAD = "no spread between seeds, so no interval"


def finite(values) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)


def t95(df: float) -> float:
    """The 0.975 quantile of Student's t with `df` (possibly fractional) degrees of freedom; NaN if df <= 0."""
    if not df > 0:
        return math.nan
    return float(stats.t.ppf(0.5 + LEVEL / 2, df))


def _spread(v: np.ndarray) -> bool:
    return len(v) > 1 and float(np.ptp(v)) > 0


def no_interval(*groups) -> str | None:
    """Why these groups of seeds give no interval (`ONE_SEED`, `NO_SPREAD`), or None if they give one."""
    groups = [finite(g) for g in groups]
    if any(len(g) < 2 for g in groups):
        return ONE_SEED
    if not any(_spread(g) for g in groups):
        return NO_SPREAD
    return None


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of the 95% t-interval (NaN: see `no_interval`), and n of the finite values."""
    v = finite(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    if not _spread(v):
        return float(v.mean()), math.nan, n
    return float(v.mean()), t95(n - 1) * float(stats.sem(v)), n


def welch_df(a, b) -> float:
    """Welch-Satterthwaite degrees of freedom of mean(a) - mean(b)."""
    a, b = finite(a), finite(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    return float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))


def diff_ci(a, b) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% Welch interval (NaN: see `no_interval`)."""
    a, b = finite(a), finite(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan
    d = float(a.mean() - b.mean())
    if no_interval(a, b):
        return d, math.nan
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    return d, t95(welch_df(a, b)) * se


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def paired_ci(x, y) -> tuple[float, float]:
    """Mean of x - y over seeds where both are known, and the half-width of its 95% paired t-interval."""
    x, y = _pairs(x, y)
    mean, half, _ = mean_ci(x - y)
    return mean, half


def fieller(num: float, den: float, var_num: float, var_den: float, cov: float, t: float) -> tuple[float, float]:
    """Fieller's interval of num/den: every r with (num - r den)^2 <= t^2 Var(num - r den).

    (NaN, NaN) when the set is unbounded, i.e. when the denominator is not clearly away from zero.
    """
    a = den**2 - t**2 * var_den
    b = num * den - t**2 * cov
    c = num**2 - t**2 * var_num
    if not a > 0:
        return math.nan, math.nan
    root = math.sqrt(max(b**2 - a * c, 0.0))  # >= 0 whenever a > 0: num/den itself is in the set
    return (b - root) / a, (b + root) / a


def recovered_share(small, fixed, large) -> tuple[float, float, float, float]:
    """Share of the loss large - small that a per-seed fix of the small-batch runs wins back.

    small and fixed are paired per seed (the same runs, evaluated two ways); large are other runs.
    Returns (share, lo, hi, loss): share = mean(fixed - small) / (mean(large) - mean(small)), with
    Fieller's 95% interval (NaN when unbounded or when the seeds give no interval). Numerator and
    denominator share the small-batch seeds, so their covariance enters; the t quantile takes the
    fewer degrees of freedom of the two (paired and Welch), the cautious choice.
    """
    fixed, small = _pairs(fixed, small)
    large = finite(large)
    if len(small) == 0 or len(large) == 0:
        return math.nan, math.nan, math.nan, math.nan
    gain = fixed - small
    num, loss = float(gain.mean()), float(large.mean() - small.mean())
    share = num / loss if loss != 0 else math.nan
    if no_interval(gain) or no_interval(large, small):
        return share, math.nan, math.nan, loss
    n = len(small)
    var_num = gain.var(ddof=1) / n
    var_den = large.var(ddof=1) / len(large) + small.var(ddof=1) / n
    cov = -float(np.cov(gain, small, ddof=1)[0, 1]) / n  # Cov(mean gain, -mean small)
    t = t95(min(n - 1, welch_df(large, small)))
    lo, hi = fieller(num, loss, var_num, var_den, cov, t)
    return share, lo, hi, loss


@dataclass(frozen=True)
class Test:
    """A difference of means with its 95% interval and two-sided p-value (NaN where the seeds give none)."""

    effect: float
    ci95: float  # half-width
    p: float
    n_a: int
    n_b: int
    kind: str  # "welch" | "paired"
    why: str | None = None  # why there is no interval (`no_interval`), else None


def welch_test(a, b) -> Test:
    """mean(a) - mean(b), its Welch interval and Welch's t-test p-value."""
    a, b = finite(a), finite(b)
    d, half = diff_ci(a, b)
    why = no_interval(a, b) if len(a) and len(b) else ONE_SEED
    p = math.nan if why else _quiet(lambda: stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Test(d, half, p, len(a), len(b), "welch", why)


def paired_test(x, y) -> Test:
    """mean(x - y) over the pairs where both are known, its paired interval and the paired t-test p-value."""
    x, y = _pairs(x, y)
    d, half = paired_ci(x, y)
    why = no_interval(x - y) if len(x) else ONE_SEED
    p = math.nan if why else _quiet(lambda: stats.ttest_rel(x, y).pvalue)
    return Test(d, half, p, len(x), len(y), "paired", why)


def _quiet(test) -> float:
    """A p-value, without scipy's warning for nearly identical seeds (the interval already says how sure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(test())


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of a family of p-values; NaN ones stay NaN and do not count as tests.

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j)): reject where the
    adjusted value is below the level, and the family-wise error rate stays at that level.
    """
    p = np.asarray([x if x is not None else math.nan for x in pvalues], dtype=float)
    known = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), math.nan)
    m, running = len(known), 0.0
    for rank, i in enumerate(known[np.argsort(p[known], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()
