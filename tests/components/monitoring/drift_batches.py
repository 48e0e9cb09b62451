"""Tables, reference profiles and batches for judging the drift monitor's verdicts: how often
it raises drift on batches drawn like the reference (false alarms), and how often on
shifted ones (power). Shared by tests/components/monitoring/test_drift_defaults.py and
tests/benchmarks/bench_drift_false_alarms.py.

Two tables, each with the scores of a fixed scoring function (a stand-in for a model, so
prediction drift is compared too):

* the worked example's credit data (``generate_credit_data``): the training table is the
  reference; days before the population shift are a pool of unshifted rows, the first
  shifted day a pool of shifted ones;
* a seeded synthetic table of readings: numeric columns of several shapes (normal,
  lognormal, counts with ties, a column that is mostly zeros) and categorical ones (a few
  common categories, and a long tail of rare ones), with missing values in three columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stemma.components.monitoring.drift import DriftMonitor
from stemma.components.monitoring.profile import ReferenceProfile, build_reference_profile
from stemma.components.monitoring.report import DriftReport
from stemma.components.spec import DataSpec, FeaturesSpec, MonitorSpec
from stemma.examples.credit import generate_credit_data

#: Batch sizes are drawn log-uniformly between these.
SMALLEST_BATCH, LARGEST_BATCH = 30, 5_000

CREDIT = DataSpec(
    path="data/credit/train.parquet",
    target="approved",
    id="application_id",
    features=FeaturesSpec(
        numeric=["salary", "commission", "age", "hvalue", "hyears", "loan"],
        categorical=["elevel", "car", "zipcode"],
    ),
)
#: Rows of the credit training table, and of each generated day (the pools of rows).
CREDIT_TRAIN_ROWS = 40_000
CREDIT_DAY_ROWS = 20_000
#: The generator's first day with the shifted applicant population.
CREDIT_SHIFT_DAY = 6

READINGS = DataSpec(
    path="data/readings.parquet",
    target="alert",
    features=FeaturesSpec(
        numeric=["temperature", "duration", "events", "rainfall"],
        categorical=["channel", "station"],
    ),
)
#: Rows of the synthetic reference table.
READINGS_ROWS = 30_000
#: Share of missing values per column of the synthetic table.
READINGS_MISSING = {"temperature": 0.02, "duration": 0.005, "channel": 0.05}
TEMPERATURE_MEAN, TEMPERATURE_SD = 15.0, 8.0
#: A long tail of stations: shares proportional to 1 / rank.
STATIONS = [f"st{rank:02d}" for rank in range(1, 41)]
CHANNELS = ["radio", "cellular", "satellite", "wired"]


def readings(
    rows: int,
    seed: int,
    *,
    warmer_sd: float = 0.0,
    missing: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Seeded readings of weather stations.

    Args:
        warmer_sd: the temperature's mean moved by this many standard deviations.
        missing: missing shares per column, in place of :data:`READINGS_MISSING`.
    """
    rng = np.random.default_rng(seed)
    station_shares = 1.0 / np.arange(1, len(STATIONS) + 1)
    frame = pd.DataFrame(
        {
            "temperature": rng.normal(
                TEMPERATURE_MEAN + warmer_sd * TEMPERATURE_SD, TEMPERATURE_SD, rows
            ),
            "duration": rng.lognormal(2.0, 0.7, rows),
            "events": rng.poisson(3.0, rows).astype(np.float64),
            "rainfall": np.where(rng.random(rows) < 0.6, 0.0, rng.exponential(4.0, rows)),
            "channel": rng.choice(CHANNELS, rows, p=[0.5, 0.3, 0.15, 0.05]),
            "station": rng.choice(STATIONS, rows, p=station_shares / station_shares.sum()),
        }
    )
    for column, share in (missing or READINGS_MISSING).items():
        holes = rng.random(rows) < share
        frame[column] = frame[column].astype(object if column == "channel" else np.float64)
        frame.loc[holes, column] = None if column == "channel" else np.nan
    frame["alert"] = (frame["rainfall"] > 8).astype(np.int64)
    return frame


def readings_scores(frame: pd.DataFrame) -> np.ndarray:
    """A fixed scoring function of the readings (NaN where a numeric input is missing)."""
    logit = (
        (frame["temperature"].to_numpy(np.float64) - TEMPERATURE_MEAN) / TEMPERATURE_SD
        + 0.3 * np.log(frame["duration"].to_numpy(np.float64))
        + 0.2 * frame["rainfall"].to_numpy(np.float64)
        - 1.5
    )
    return 1.0 / (1.0 + np.exp(-logit))


def credit_scores(frame: pd.DataFrame) -> np.ndarray:
    """A fixed scoring function of the credit rows: the example's approval rule, smoothed."""
    disposable = (
        2 * (frame["salary"].to_numpy(np.float64) + frame["commission"].to_numpy(np.float64)) / 3
        - frame["loan"].to_numpy(np.float64) / 5
        - 20_000
    )
    return 1.0 / (1.0 + np.exp(-disposable / 20_000))


@dataclass(frozen=True)
class Case:
    """A table's reference profile, and pools or generators of its batches."""

    name: str
    profile: ReferenceProfile
    unshifted: pd.DataFrame | None = None
    shifted: pd.DataFrame | None = None

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        return credit_scores(frame) if self.name == "credit" else readings_scores(frame)

    def null_batch(self, rows: int, seed: int) -> pd.DataFrame:
        """A batch drawn like the reference: a random sample of the unshifted pool (credit)
        or fresh rows of the generator (readings)."""
        if self.unshifted is None:
            return readings(rows, seed)
        return self.unshifted.sample(n=rows, random_state=seed, ignore_index=True)


def _held_out_profile(frame: pd.DataFrame, data: DataSpec, scores, seed: int) -> ReferenceProfile:
    """The profile of the training rows, with the scores of held-out rows (as training does:
    the test split's scores are the prediction's reference)."""
    test = np.random.default_rng(seed).random(len(frame)) < 0.2
    train = frame.loc[~test].reset_index(drop=True)
    held_out = frame.loc[test].reset_index(drop=True)
    return build_reference_profile(train, data, scores=scores(held_out))


def credit_case(folder: Path) -> Case:
    """The credit case: the example's data written under ``folder``."""
    generate_credit_data(
        folder,
        train_rows=CREDIT_TRAIN_ROWS,
        days=CREDIT_SHIFT_DAY,
        batch_rows=CREDIT_DAY_ROWS,
        population_shift_day=CREDIT_SHIFT_DAY,
        concept_shift_day=CREDIT_SHIFT_DAY + 1,
    )
    credit = folder / "credit"
    days = [pd.read_parquet(credit / "batches" / f"day_{n:02d}.parquet") for n in range(1, 7)]
    train = pd.read_parquet(credit / "train.parquet")
    return Case(
        name="credit",
        profile=_held_out_profile(train, CREDIT, credit_scores, seed=0),
        unshifted=pd.concat(days[: CREDIT_SHIFT_DAY - 1], ignore_index=True),
        shifted=days[CREDIT_SHIFT_DAY - 1],
    )


def readings_case() -> Case:
    """The synthetic case: a reference table of readings; batches are fresh draws."""
    profile = _held_out_profile(readings(READINGS_ROWS, seed=0), READINGS, readings_scores, 1)
    return Case(name="readings", profile=profile)


def batch_sizes(count: int, seed: int) -> np.ndarray:
    """``count`` batch sizes, log-uniform between SMALLEST_BATCH and LARGEST_BATCH."""
    rng = np.random.default_rng(seed)
    logs = rng.uniform(np.log(SMALLEST_BATCH), np.log(LARGEST_BATCH), count)
    return np.round(np.exp(logs)).astype(int)


def null_batches(case: Case, count: int, seed: int) -> Iterator[pd.DataFrame]:
    """``count`` batches drawn like the reference, of sizes from :func:`batch_sizes`."""
    for index, rows in enumerate(batch_sizes(count, seed)):
        yield case.null_batch(int(rows), seed=seed * 100_000 + index)


def judge(case: Case, batch: pd.DataFrame, settings: MonitorSpec | None = None) -> DriftReport:
    """The monitor's report of a batch (features and the scores), as the flow computes it."""
    monitor = DriftMonitor(case.profile, settings or MonitorSpec())
    monitor.add({name: batch[name].to_numpy() for name in monitor.columns}, case.scores(batch))
    return monitor.report()
