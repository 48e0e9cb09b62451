"""The monitor's performance decay in the metric's units or relative to the test metric, on a
regression whose RMSE is in the target's units (a progression around 150, RMSE about 40)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stemma.components.monitoring.drift import DriftMonitor
from stemma.components.monitoring.profile import ReferenceProfile, build_reference_profile
from stemma.components.spec import DataSpec, FeaturesSpec, MonitorSpec

DATA = DataSpec(
    path="data/x.parquet",
    task="regression",
    target="progression",
    id="patient",
    features=FeaturesSpec(numeric=["bmi", "bp"]),
)
#: The model's RMSE on its test split, as training recorded it.
TEST_RMSE = 40.0


def patients(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    bmi, bp = rng.normal(26, 4, rows), rng.normal(95, 13, rows)
    return pd.DataFrame(
        {
            "patient": np.arange(rows),
            "bmi": bmi,
            "bp": bp,
            "progression": 150 + 10 * (bmi - 26) + rng.normal(0, TEST_RMSE, rows),
        }
    )


@pytest.fixture(scope="module")
def reference() -> ReferenceProfile:
    rows = patients(5_000, seed=1)
    return build_reference_profile(
        rows, DATA, scores=rows["progression"].to_numpy(), performance={"rmse": TEST_RMSE}
    )


def performance(reference, settings, rmse: float, rows: int = 4_000):
    """The check on a batch whose predictions miss by a normal error of spread ``rmse``."""
    batch = patients(rows, seed=7)
    truth = batch["progression"].to_numpy()
    errors = np.random.default_rng(8).normal(0, 1, rows)
    errors *= rmse / np.sqrt(np.mean(errors**2))  # exactly that RMSE
    monitor = DriftMonitor(reference, settings)
    monitor.add({name: batch[name].to_numpy() for name in monitor.columns})
    monitor.add_labels(truth, truth + errors)
    report = monitor.report(metric="rmse", labelled=True)
    return report, report.performance


@pytest.mark.parametrize(
    ("rmse", "decayed"),
    [(40.0, False), (41.0, False), (41.9, False), (42.1, True), (48.0, True)],
    ids=["same", "2.5%-worse", "just-within", "just-over", "20%-worse"],
)
def test_an_rmse_decays_past_5_percent_of_the_test_rmse_by_default(reference, rmse, decayed):
    report, check = performance(reference, MonitorSpec(), rmse)
    assert check.current == pytest.approx(rmse)
    assert check.threshold == pytest.approx(0.05 * TEST_RMSE)
    assert check.decayed is decayed
    assert check.limit == "5% = 2.0000"
    if decayed:
        line = next(line for line in report.reasons() if line.startswith("performance"))
        assert f"worse by {rmse - TEST_RMSE:.4f} ({(rmse - TEST_RMSE) / TEST_RMSE:.2%})" in line
        assert line.endswith("limit 5% = 2.0000")


def test_an_absolute_threshold_keeps_its_meaning(reference):
    settings = MonitorSpec.model_validate({"thresholds": {"max_metric_drop": 0.05}})
    _, check = performance(reference, settings, 41.0)
    assert check.threshold == 0.05 and check.decayed
    assert check.limit == "0.05 = 0.12%"
    relative = MonitorSpec.model_validate({"thresholds": {"max_metric_drop": "10%"}})
    _, check = performance(reference, relative, 43.0)
    assert check.threshold == pytest.approx(4.0) and not check.decayed
