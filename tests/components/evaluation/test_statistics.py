"""The statistics module against scipy and plain formulas, on a seeded table of sensor
readings (no credit columns)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon as scipy_jensenshannon

from stemma.components.evaluation.statistics import (
    PSI_FLOOR,
    chi_square,
    jensen_shannon,
    ks_pvalue,
    ks_test,
    psi,
    quantile_psi,
)


def readings(rows: int, seed: int, *, warmer: float = 0.0) -> pd.DataFrame:
    """Readings of weather stations: temperature, humidity and the station's region."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "temperature": rng.normal(12.0 + warmer, 6.0, rows),
            "humidity": rng.beta(4, 2, rows) * 100,
            "region": rng.choice(
                ["coast", "valley", "ridge", "plain"], rows, p=[0.4, 0.3, 0.2, 0.1]
            ),
        }
    )


@pytest.fixture(scope="module")
def before() -> pd.DataFrame:
    return readings(8_000, seed=11)


@pytest.fixture(scope="module")
def after() -> pd.DataFrame:
    return readings(6_000, seed=12, warmer=2.5)


def plain_psi(expected, actual, floor=PSI_FLOOR) -> float:
    total = 0.0
    for e_count, a_count in zip(expected, actual, strict=True):
        e = max(e_count / sum(expected), floor)
        a = max(a_count / sum(actual), floor)
        total += (a - e) * math.log(a / e)
    return total


def region_counts(frame: pd.DataFrame, regions=("coast", "valley", "ridge", "plain", "island")):
    counted = frame["region"].value_counts()
    return [int(counted.get(region, 0)) for region in regions]


def test_psi_equals_the_plain_formula_on_region_counts(before, after):
    shifted = after.assign(region=np.where(after.index % 7 == 0, "island", after["region"]))
    assert psi(region_counts(before), region_counts(shifted)) == pytest.approx(
        plain_psi(region_counts(before), region_counts(shifted)), abs=1e-12
    )
    assert psi(region_counts(before), region_counts(before)) == 0.0


def test_quantile_psi_bins_on_the_reference_deciles(before, after):
    reference, current = before["temperature"].to_numpy(), after["temperature"].to_numpy()
    edges = np.quantile(reference, np.linspace(0, 1, 11))[1:-1]
    expected_counts = [np.sum(np.digitize(reference, edges) == b) for b in range(10)]
    actual_counts = [np.sum(np.digitize(current, edges) == b) for b in range(10)]
    assert quantile_psi(reference, current) == pytest.approx(
        plain_psi(expected_counts, actual_counts), abs=1e-12
    )
    assert quantile_psi(reference, current) > quantile_psi(reference, reference[::2])


def test_quantile_psi_leaves_non_finite_values_out_and_is_nan_when_empty(before):
    values = before["humidity"].to_numpy()
    holed = np.concatenate([values, [np.nan, np.inf]])
    assert quantile_psi(values, holed) == quantile_psi(values, values)
    assert math.isnan(quantile_psi(values, np.array([np.nan])))


def test_chi_square_equals_scipy_on_a_contingency_table(before, after):
    table = pd.crosstab(
        np.r_[np.zeros(len(before)), np.ones(len(after))],
        np.r_[before["region"], after["region"]],
    ).to_numpy()
    expected = stats.chi2_contingency(table, correction=False)
    statistic, pvalue = chi_square(table[0], table[1])
    assert statistic == pytest.approx(expected.statistic, rel=1e-12)
    assert pvalue == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def test_chi_square_by_hand_with_an_empty_category_left_out():
    reference, current = [40, 0, 60], [55, 0, 45]
    observed = np.array([[40, 60], [55, 45]], dtype=float)
    expected = observed.sum(1, keepdims=True) * observed.sum(0) / observed.sum()
    by_hand = float(((observed - expected) ** 2 / expected).sum())
    statistic, pvalue = chi_square(reference, current)
    assert statistic == pytest.approx(by_hand, rel=1e-12)
    assert pvalue == pytest.approx(stats.chi2.sf(by_hand, 1), rel=1e-12)
    assert chi_square([5, 0], [7, 0]) == (0.0, 1.0)
    assert all(math.isnan(value) for value in chi_square([0, 0], [1, 2]))


def test_jensen_shannon_equals_its_definition_and_scipy(before, after):
    p = np.array(region_counts(before), dtype=float)
    q = np.array(region_counts(after.iloc[::3]), dtype=float)
    p_share, q_share = p / p.sum(), q / q.sum()
    middle = (p_share + q_share) / 2

    def kl(x):
        kept = x > 0
        return float(np.sum(x[kept] * np.log2(x[kept] / middle[kept])))

    by_hand = math.sqrt((kl(p_share) + kl(q_share)) / 2)
    assert jensen_shannon(p, q) == pytest.approx(by_hand, abs=1e-12)
    assert jensen_shannon(p, q) == pytest.approx(scipy_jensenshannon(p, q, base=2), abs=1e-15)
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(1.0)
    assert math.isnan(jensen_shannon([0, 0], [1, 1]))


def test_ks_test_is_scipy_and_its_asymptotic_p_value_matches(before, after):
    reference, current = before["temperature"].to_numpy(), after["temperature"].to_numpy()
    expected = stats.ks_2samp(reference, current)
    assert ks_test(reference, current) == (expected.statistic, expected.pvalue)
    asymptotic = stats.ks_2samp(reference, current, method="asymp")
    assert ks_pvalue(asymptotic.statistic, reference.size, current.size) == pytest.approx(
        asymptotic.pvalue, rel=1e-9, abs=1e-300
    )
    assert all(math.isnan(value) for value in ks_test(reference, np.empty(0)))
