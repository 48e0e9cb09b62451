"""Distribution statistics shared by drift monitoring, shadow and canary evaluation.

PSI is Stemma's own (``sum((a - e) * ln(a / e))`` over shares floored at
:data:`PSI_FLOOR`); Jensen-Shannon, chi-square, Kolmogorov-Smirnov and Fisher's exact test
are scipy's. Histogram statistics take counts on the same bins; every one is NaN when a side
is empty. :func:`pool_rare_categories` merges the categories a sample is too small to
expect rows of, before a chi-square test or PSI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Floor of a bin's share in PSI, so an empty bin adds a large but finite term.
PSI_FLOOR = 1e-4
#: Quantile bins of the reference used by :func:`quantile_psi`.
PSI_BINS = 10

#: Cochran's rule: the chi-square approximation holds when every cell expects at least 5 rows.
CHI2_MIN_EXPECTED = 5.0

#: Counts per bin or category.
Counts = Sequence[float] | np.ndarray


def psi(reference_counts: Counts, current_counts: Counts) -> float:
    """Population stability index of two histograms on the same bins.

    Raises:
        ValueError: the histograms have different numbers of bins.
    """
    expected = np.asarray(reference_counts, dtype=np.float64)
    actual = np.asarray(current_counts, dtype=np.float64)
    if expected.shape != actual.shape:
        raise ValueError(f"{expected.shape} reference bins but {actual.shape} current bins")
    if expected.sum() <= 0 or actual.sum() <= 0:
        return math.nan
    e = np.maximum(expected / expected.sum(), PSI_FLOOR)
    a = np.maximum(actual / actual.sum(), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def quantile_psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """PSI of two samples over the reference's quantile bins (non-finite values left out)."""
    ref = finite_values(reference)
    cur = finite_values(current)
    if ref.size == 0 or cur.size == 0:
        return math.nan
    inner = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1))[1:-1])
    ref_counts = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=inner.size + 1)
    cur_counts = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=inner.size + 1)
    return psi(ref_counts, cur_counts)


def chi_square(reference_counts: Counts, current_counts: Counts) -> tuple[float, float]:
    """Chi-square test of homogeneity (``scipy.stats.chi2_contingency``, no correction).

    Categories with no row on either side are left out; with fewer than two left the
    samples cannot differ: ``(0.0, 1.0)``.

    Returns:
        ``(statistic, p-value)``.
    """
    from scipy.stats import chi2_contingency

    table = np.vstack(
        [np.asarray(reference_counts, np.float64), np.asarray(current_counts, np.float64)]
    )
    table = table[:, table.sum(axis=0) > 0]
    if np.any(table.sum(axis=1) <= 0):
        return math.nan, math.nan
    if table.shape[1] < 2:
        return 0.0, 1.0
    result = chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def pool_rare_categories(
    reference_counts: Counts, current_counts: Counts, min_expected: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Merge the categories a chi-square test of the two samples cannot expect enough of.

    A category's expected rows are those the smaller sample can expect of it: that
    sample's size times the category's share of the reference or of both samples together,
    whichever is larger; a category the reference never saw expects as many as the current
    sample holds. Categories expecting fewer than ``min_expected`` become one cell; while
    that cell expects fewer, the next rarest category joins it.

    When the samples are alike the shares agree with the categories' true shares, so
    pooling keeps the test's error rate; taking the larger keeps a category one sample
    holds many of (a class a shifted batch no longer predicts) out of the pool. A category
    the reference never saw is kept once the sample holds ``min_expected`` rows of it:
    by chance a batch shows that many of a category its reference's rows never showed only
    when it is about as large as the reference.

    Returns:
        ``(reference, current, pooled)``: the counts of the kept categories in their order,
        then the pooled cell when there is one; ``pooled`` is how many categories it holds.
        With an empty side the counts come back as given.
    """
    reference = np.asarray(reference_counts, dtype=np.float64)
    current = np.asarray(current_counts, dtype=np.float64)
    if reference.shape != current.shape:
        raise ValueError(f"{reference.shape} reference categories but {current.shape} current")
    if reference.sum() <= 0 or current.sum() <= 0:
        return reference, current, 0
    both = reference + current
    smaller = min(reference.sum(), current.sum())
    expected = smaller * np.maximum(reference / reference.sum(), both / both.sum())
    expected = np.where(reference > 0, expected, np.maximum(expected, current))
    pooled = expected < min_expected
    if pooled.any():
        pooled_expected = float(expected[pooled].sum())
        for index in np.argsort(expected, kind="stable"):
            if pooled_expected >= min_expected:
                break
            if not pooled[index]:
                pooled[index] = True
                pooled_expected += float(expected[index])
    if not pooled.any():
        return reference, current, 0
    kept = ~pooled
    return (
        np.append(reference[kept], reference[pooled].sum()),
        np.append(current[kept], current[pooled].sum()),
        int(pooled.sum()),
    )


def missing_rise_pvalue(
    reference_missing: int, reference_rows: int, current_missing: int, current_rows: int
) -> float:
    """p-value of the current sample's missing rate being higher than the reference's.

    Fisher's exact test, one-sided (``scipy.stats.fisher_exact(alternative="greater")``)
    on the two samples' missing and present counts: exact at any size, and a reference
    with no missing value does not make one missing value in the sample significant.
    NaN when a side has no rows.
    """
    from scipy.stats import fisher_exact

    if reference_rows <= 0 or current_rows <= 0:
        return math.nan
    table = [
        [current_missing, current_rows - current_missing],
        [reference_missing, reference_rows - reference_missing],
    ]
    return float(fisher_exact(table, alternative="greater").pvalue)


def jensen_shannon(reference_counts: Counts, current_counts: Counts) -> float:
    """Jensen-Shannon distance in base 2 (0 to 1; ``scipy.spatial.distance.jensenshannon``)."""
    from scipy.spatial.distance import jensenshannon

    p = np.asarray(reference_counts, dtype=np.float64)
    q = np.asarray(current_counts, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    return float(jensenshannon(p, q, base=2.0))


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``): statistic, p-value."""
    from scipy.stats import ks_2samp

    if np.size(reference) == 0 or np.size(current) == 0:
        return math.nan, math.nan
    result = ks_2samp(reference, current)
    return float(result.statistic), float(result.pvalue)


def ks_pvalue(statistic: float, n_reference: int, n_current: int) -> float:
    """Two-sided p-value of a two-sample KS statistic, as scipy's asymptotic method has it."""
    from scipy.stats import kstwo

    m, n = sorted([float(n_reference), float(n_current)], reverse=True)
    en = m * n / (m + n)
    return float(np.clip(kstwo.sf(statistic, np.round(en)), 0.0, 1.0))


def finite_values(values: np.ndarray | Sequence[float]) -> np.ndarray:
    """The finite values, as float64."""
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]
