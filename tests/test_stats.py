"""normbench.analysis.stats against scipy.stats: t quantiles, mean, Welch, paired and Fieller intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from normbench.analysis.stats import (
    NO_SPREAD, ONE_SEED, diff_ci, fieller, mean_ci, no_interval, paired_ci, recovered_share, t95, welch_df,
)

# ---- t quantiles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("df, expected", [
    (1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (20, 2.086), (30, 2.042),
    (60, 2.000), (120, 1.980), (1000, 1.962),
])
def test_t95_matches_student_t_table(df, expected):
    assert t95(df) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("df", [0.5, 1.0, 1.25, 1.5, 1.75, 2.5, 3.7, 10.3, 29.5, 45.2])
def test_t95_at_fractional_df_is_scipys_quantile(df):
    assert t95(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)


def test_t95_between_one_and_two_df_is_not_interpolated():
    # linear interpolation between the table's 12.706 (df 1) and 4.303 (df 2) was 27-41% too wide
    interpolated = 12.706 + 0.5 * (4.303 - 12.706)
    assert t95(1.5) == pytest.approx(6.0167, abs=1e-3)
    assert interpolated / t95(1.5) > 1.4
    values = [t95(df) for df in np.arange(0.5, 40.0, 0.25)]
    assert all(a > b for a, b in zip(values, values[1:])), "t quantile must fall as df grows"


@pytest.mark.parametrize("df", [0, -1, math.nan])
def test_t95_undefined_without_degrees_of_freedom(df):
    assert math.isnan(t95(df))


# ---- means -----------------------------------------------------------------------------------------------


def test_mean_ci_is_scipys_t_interval():
    values = [81.0, 84.5, 79.0, 90.25]
    mean, half, n = mean_ci(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert n == 4 and mean == pytest.approx(np.mean(values))
    assert (mean - half, mean + half) == (pytest.approx(lo), pytest.approx(hi))


def test_mean_ci_ignores_missing_values_and_handles_small_n():
    mean, half, n = mean_ci([1.0, None, math.nan, 3.0, math.inf])
    assert (mean, n) == (2.0, 2) and half == pytest.approx(12.706, abs=1e-3)  # sd sqrt(2), n 2
    mean, half, n = mean_ci([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(half)
    mean, half, n = mean_ci([])
    assert n == 0 and math.isnan(mean) and math.isnan(half)


def test_mean_ci_without_spread_has_no_interval():
    mean, half, n = mean_ci([90.0, 90.0, 90.0])
    assert (mean, n) == (90.0, 3) and math.isnan(half)  # not a zero-width interval


# ---- differences -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b", [
    ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]),
    ([1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]),
    ([70.0, 70.5, 69.5], [90.0, 95.0, 80.0]),
    ([50.0, 52.0], [60.0, 75.0]),  # df between 1 and 2
])
def test_diff_ci_is_scipys_welch_interval(a, b):
    d, h = diff_ci(a, b)
    result = stats.ttest_ind(a, b, equal_var=False)
    if not hasattr(result, "confidence_interval"):
        pytest.skip("scipy < 1.11 has no ttest_ind confidence_interval")
    lo, hi = result.confidence_interval(0.95)
    assert (d - h, d + h) == (pytest.approx(lo), pytest.approx(hi))


def test_welch_df_is_fractional_and_bounded():
    a, b = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    va, vb = 1.0 / 3, np.var(b, ddof=1) / 4
    df = welch_df(a, b)
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))
    assert 2 <= df <= 5 and not float(df).is_integer()


def test_diff_ci_without_spread_or_with_one_seed_has_no_interval():
    d, h = diff_ci([2.0, 2.0], [1.0, 1.0])
    assert d == 1.0 and math.isnan(h)  # not "1.0 ± 0.0"
    assert no_interval([2.0, 2.0], [1.0, 1.0]) == NO_SPREAD == "no spread between seeds, so no interval"
    d, h = diff_ci([3.0], [1.0, 2.0])
    assert d == pytest.approx(1.5) and math.isnan(h)
    assert no_interval([3.0], [1.0, 2.0]) == ONE_SEED == "one seed: no interval, so no test"
    d, h = diff_ci([], [1.0])
    assert math.isnan(d) and math.isnan(h)
    assert no_interval([1.0, 2.0], [3.0, 4.0]) is None


def test_diff_ci_with_spread_in_one_group_only():
    d, h = diff_ci([5.0, 5.0, 5.0], [1.0, 2.0, 3.0])
    assert d == pytest.approx(3.0)
    assert h == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))  # df = n - 1 of the noisy group


def test_diff_ci_drops_nan():
    assert diff_ci([1.0, math.nan, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(diff_ci([1.0, 3.0], [1.0, 2.0, 3.0]))


def test_paired_ci_is_scipys_paired_interval():
    x, y = [85.0, 84.5, 86.0, 83.0], [70.0, 70.5, 69.5, 71.0]
    d, h = paired_ci(x, y)
    result = stats.ttest_rel(x, y)
    if not hasattr(result, "confidence_interval"):
        pytest.skip("scipy < 1.11 has no ttest_rel confidence_interval")
    lo, hi = result.confidence_interval(0.95)
    assert (d - h, d + h) == (pytest.approx(lo), pytest.approx(hi))
    d, h = paired_ci([75.0, 75.5, 74.5], [70.0, 70.5, 69.5])  # every seed gains exactly 5
    assert d == pytest.approx(5.0) and math.isnan(h)
    d, h = paired_ci([75.0, math.nan, 74.0], [70.0, 70.5, 69.5])  # pairs with a NaN are dropped
    assert d == pytest.approx(4.75) and np.isfinite(h)


# ---- ratios ----------------------------------------------------------------------------------------------


def test_fieller_with_an_exact_denominator_scales_the_numerators_interval():
    lo, hi = fieller(num=6.0, den=2.0, var_num=1.0, var_den=0.0, cov=0.0, t=2.0)
    assert (lo, hi) == (pytest.approx((6.0 - 2.0) / 2.0), pytest.approx((6.0 + 2.0) / 2.0))


def test_fieller_bounds_solve_its_equation_and_contain_the_ratio():
    num, den, var_num, var_den, cov, t = 15.0, 20.0, 0.33, 0.17, -0.05, 4.3
    lo, hi = fieller(num, den, var_num, var_den, cov, t)
    assert lo < num / den < hi
    for r in (lo, hi):
        assert (num - r * den) ** 2 == pytest.approx(t**2 * (var_num - 2 * r * cov + r**2 * var_den))


def test_fieller_is_unbounded_when_the_denominator_may_be_zero():
    lo, hi = fieller(num=5.0, den=1.0, var_num=1.0, var_den=1.0, cov=0.0, t=2.0)
    assert math.isnan(lo) and math.isnan(hi)


def test_recovered_share_interval():
    small, fixed, large = [70.0, 70.5, 69.5], [84.0, 85.5, 85.5], [90.0, 90.5, 89.5]
    share, lo, hi, loss = recovered_share(small, fixed, large)
    assert loss == pytest.approx(20.0) and share == pytest.approx(15.0 / 20.0)
    assert 0 < lo < share < hi < 1
    gain = np.subtract(fixed, small)
    var_num, var_den = np.var(gain, ddof=1) / 3, (np.var(large, ddof=1) + np.var(small, ddof=1)) / 3
    cov = -np.cov(gain, small)[0, 1] / 3
    t = stats.t.ppf(0.975, 2)  # min(paired df 2, Welch df 4)
    for r in (lo, hi):
        assert (15.0 - r * 20.0) ** 2 == pytest.approx(t**2 * (var_num - 2 * r * cov + r**2 * var_den))


def test_recovered_share_without_spread_has_no_interval():
    share, lo, hi, loss = recovered_share([70.0, 70.0], [85.0, 85.0], [90.0, 91.0])
    assert share == pytest.approx(15.0 / 20.5) and math.isnan(lo) and math.isnan(hi)
