"""The worked example's data: a seeded loan-application generator with drift.

The columns follow Agrawal, Imielinski and Swami's classic synthetic "people" generator
(Database Mining: A Performance Perspective, 1993): salary, commission, age, education
level, car make, zip code, house value, years owned and loan. The label is a
disposable-income rule from the same paper, blurred by label flips and by small noise on
the observed features, so a good classifier reaches a ROC AUC of about 0.94, not 1.0.

The training table comes before day 1; each day then brings a production batch (features
only) and, separately, that batch's labels, which "arrive later". Two shifts are built in
so that monitoring and retraining have something to find:

* population shift (from ``population_shift_day``): younger applicants with lower
  salaries asking for larger loans; the labelling rule is unchanged, fewer are approved;
* concept shift (from ``concept_shift_day``): the bank approves by another of Agrawal's
  rules (a salary band that depends on age; the loan no longer counts), so a model
  trained on the training table degrades to a ROC AUC of about 0.55.

Every file is written with pyarrow under an explicit schema and fixed compression, from
its own child seed, so the bytes are identical on every run with the same arguments (and
the same pyarrow version, whose name Parquet records in the footer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.platform.files import write_file_atomically

#: Day 1 of production, at midnight; the training table covers the days before it.
FIRST_PRODUCTION_DAY = datetime(2026, 3, 2)
#: How many days before day 1 the training applications span.
TRAINING_SPAN_DAYS = 90
#: The first application id; ids then count up through the training table and each day.
FIRST_APPLICATION_ID = 100_000_001
#: Share of labels flipped at random (a bank's decisions are not a clean rule).
LABEL_FLIP_RATE = 0.05
#: Feature noise, as a share of each column's range, applied after labelling.
FEATURE_NOISE = 0.08
#: Commission is paid only to applicants earning less than this.
COMMISSION_SALARY_LIMIT = 75_000.0
SALARY_RANGE = (20_000.0, 150_000.0)
COMMISSION_RANGE = (10_000.0, 75_000.0)
AGE_RANGE = (20, 80)
LOAN_RANGE = (0.0, 500_000.0)
#: House values: (9 - zipcode) x 100k, within +-50%, so 50k to 1.35M.
HVALUE_RANGE = (50_000.0, 1_350_000.0)
#: After the population shift: younger applicants, lower salaries, larger loans.
SHIFTED_AGE_RANGE = (20, 50)
SHIFTED_SALARY_RANGE = (20_000.0, 110_000.0)
SHIFTED_LOAN_RANGE = (150_000.0, 500_000.0)
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 3

LABEL = "approved"
ID = "application_id"
TIME = "applied_at"
FEATURES = ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan")

_FEATURE_TYPES: dict[str, pa.DataType] = {
    "salary": pa.float64(),
    "commission": pa.float64(),
    "age": pa.int64(),
    "elevel": pa.int64(),
    "car": pa.int64(),
    "zipcode": pa.int64(),
    "hvalue": pa.float64(),
    "hyears": pa.int64(),
    "loan": pa.float64(),
}
BATCH_SCHEMA = pa.schema(
    [pa.field(ID, pa.int64(), nullable=False), pa.field(TIME, pa.timestamp("us"), nullable=False)]
    + [pa.field(name, kind, nullable=False) for name, kind in _FEATURE_TYPES.items()]
)
TRAIN_SCHEMA = BATCH_SCHEMA.append(pa.field(LABEL, pa.int64(), nullable=False))
LABEL_SCHEMA = pa.schema(
    [pa.field(ID, pa.int64(), nullable=False), pa.field(LABEL, pa.int64(), nullable=False)]
)

_DAY_FILE = re.compile(r"^day_\d+\.parquet$")
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class _Regime:
    """What a stretch of days looks like: who applies and how the bank decides."""

    shifted_population: bool
    shifted_concept: bool


def generate_credit_data(
    out_dir: Path,
    *,
    seed: int = 7,
    train_rows: int = 40_000,
    days: int = 14,
    batch_rows: int = 5_000,
    population_shift_day: int = 6,
    concept_shift_day: int = 10,
) -> list[Path]:
    """Write the worked example's training table, daily batches and their labels.

    Files, under ``out_dir`` (the project's ``data/`` folder)::

        credit/train.parquet             features, id, time and `approved`, before day 1
        credit/batches/day_01.parquet    features, id and time of day 1's applications
        credit/labels/day_01.parquet     `application_id`, `approved` for day 1
        ...

    Each file is written atomically. Day files left by an earlier run with more days are
    removed, so the folder always holds exactly one generation.

    Args:
        seed: the root seed; every file draws from its own child of it.
        population_shift_day, concept_shift_day: the first day with the shifted applicant
            population, and labelled by the shifted rule (larger than ``days``: none).

    Returns:
        The written paths, sorted.

    Raises:
        DataError: when an argument is out of range (nothing is written then).
    """
    _check_arguments(
        seed=seed,
        train_rows=train_rows,
        days=days,
        batch_rows=batch_rows,
        population_shift_day=population_shift_day,
        concept_shift_day=concept_shift_day,
    )

    credit = Path(out_dir) / "credit"
    children = np.random.SeedSequence(seed).spawn(1 + days)
    width = max(2, len(str(days)))
    written: list[Path] = []

    train = _applications(
        np.random.default_rng(children[0]),
        rows=train_rows,
        first_id=FIRST_APPLICATION_ID,
        start=FIRST_PRODUCTION_DAY - timedelta(days=TRAINING_SPAN_DAYS),
        span_days=TRAINING_SPAN_DAYS,
        regime=_Regime(shifted_population=False, shifted_concept=False),
    )
    written.append(
        _write(pa.Table.from_pydict(train, schema=TRAIN_SCHEMA), credit / "train.parquet")
    )

    day_names: set[str] = set()
    for day in range(1, days + 1):
        regime = _Regime(
            shifted_population=day >= population_shift_day,
            shifted_concept=day >= concept_shift_day,
        )
        rows = _applications(
            np.random.default_rng(children[day]),
            rows=batch_rows,
            first_id=FIRST_APPLICATION_ID + train_rows + (day - 1) * batch_rows,
            start=FIRST_PRODUCTION_DAY + timedelta(days=day - 1),
            span_days=1,
            regime=regime,
        )
        name = f"day_{day:0{width}d}.parquet"
        day_names.add(name)
        written += _write_day(rows, credit, name)

    for folder in (credit / "batches", credit / "labels"):
        _remove_stale_days(folder, keep=day_names)
    return sorted(written)


def _write_day(rows: dict[str, np.ndarray], credit: Path, name: str) -> list[Path]:
    """Write a day's batch (features, id, time) and its labels (id, label) as ``name``."""
    batch = {column: rows[column] for column in BATCH_SCHEMA.names}
    labels = {column: rows[column] for column in LABEL_SCHEMA.names}
    return [
        _write(pa.Table.from_pydict(batch, schema=BATCH_SCHEMA), credit / "batches" / name),
        _write(pa.Table.from_pydict(labels, schema=LABEL_SCHEMA), credit / "labels" / name),
    ]


def _applications(
    rng: np.random.Generator,
    *,
    rows: int,
    first_id: int,
    start: datetime,
    span_days: int,
    regime: _Regime,
) -> dict[str, np.ndarray]:
    """One file's applications, in time order, with their labels."""
    salary_range = SHIFTED_SALARY_RANGE if regime.shifted_population else SALARY_RANGE
    age_range = SHIFTED_AGE_RANGE if regime.shifted_population else AGE_RANGE
    loan_range = SHIFTED_LOAN_RANGE if regime.shifted_population else LOAN_RANGE

    salary = rng.uniform(*salary_range, size=rows)
    commission = np.where(
        salary >= COMMISSION_SALARY_LIMIT, 0.0, rng.uniform(*COMMISSION_RANGE, size=rows)
    )
    age = rng.integers(age_range[0], age_range[1], endpoint=True, size=rows)
    elevel = rng.integers(0, 4, endpoint=True, size=rows)
    car = rng.integers(1, 20, endpoint=True, size=rows)
    zipcode = rng.integers(0, 8, endpoint=True, size=rows)
    # Agrawal's house value: the zip code sets the price level, within +-50%.
    hvalue = (9 - zipcode) * 100_000.0 * rng.uniform(0.5, 1.5, size=rows)
    hyears = rng.integers(1, 30, endpoint=True, size=rows)
    loan = rng.uniform(*loan_range, size=rows)

    rule = _age_band_rule if regime.shifted_concept else _loan_rule
    approved = rule(salary, commission, age, elevel, hvalue, hyears, loan)
    flipped = rng.random(size=rows) < LABEL_FLIP_RATE
    approved = np.where(flipped, ~approved, approved).astype(np.int64)

    # The bank decided on the true values; the table holds what was observed.
    salary = _perturb(rng, salary, SALARY_RANGE)
    commission = np.where(
        (commission > 0) & (salary < COMMISSION_SALARY_LIMIT),
        _perturb(rng, commission, COMMISSION_RANGE),
        0.0,
    )
    hvalue = _perturb(rng, hvalue, HVALUE_RANGE).round(0)
    loan = _perturb(rng, loan, LOAN_RANGE)

    seconds = np.sort(rng.integers(0, span_days * _SECONDS_PER_DAY, size=rows))
    applied_at = np.datetime64(start, "us") + seconds.astype("timedelta64[s]").astype(
        "timedelta64[us]"
    )
    return {
        ID: np.arange(first_id, first_id + rows, dtype=np.int64),
        TIME: applied_at,
        "salary": salary.round(2),
        "commission": commission.round(2),
        "age": age,
        "elevel": elevel,
        "car": car,
        "zipcode": zipcode,
        "hvalue": hvalue,
        "hyears": hyears,
        "loan": loan.round(2),
        LABEL: approved,
    }


def _loan_rule(salary, commission, age, elevel, hvalue, hyears, loan) -> np.ndarray:
    """Agrawal's function 7: approve when income after the loan's burden is positive."""
    disposable = 2 * (salary + commission) / 3 - loan / 5 - 20_000
    return disposable > 0


def _age_band_rule(salary, commission, age, elevel, hvalue, hyears, loan) -> np.ndarray:
    """Agrawal's function 2: approve salaries inside a band that depends on age."""
    low = np.select([age < 40, age < 60], [50_000.0, 75_000.0], 25_000.0)
    high = np.select([age < 40, age < 60], [100_000.0, 125_000.0], 75_000.0)
    return (salary >= low) & (salary <= high)


def _perturb(
    rng: np.random.Generator, values: np.ndarray, bounds: tuple[float, float]
) -> np.ndarray:
    """Add uniform noise of FEATURE_NOISE times the range, staying inside the bounds."""
    low, high = bounds
    noise = rng.uniform(-1.0, 1.0, size=values.shape) * FEATURE_NOISE * (high - low)
    return np.clip(values + noise, low, high)


#: The smallest value each argument of :func:`generate_credit_data` may take.
_LOWEST = {
    "seed": 0,
    "train_rows": 1,
    "days": 0,
    "batch_rows": 1,
    "population_shift_day": 1,
    "concept_shift_day": 1,
}


def _check_arguments(**values: int) -> None:
    problems = [
        f"{name} must be at least {_LOWEST[name]}, got {value}"
        for name, value in values.items()
        if value < _LOWEST[name]
    ]
    if problems:
        raise DataError("cannot generate the credit data", problems)


def _write(table: pa.Table, path: Path) -> Path:
    """Write a Parquet file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomically(
        path,
        lambda temporary: pq.write_table(
            table,
            temporary,
            compression=PARQUET_COMPRESSION,
            compression_level=PARQUET_COMPRESSION_LEVEL,
            write_statistics=True,
        ),
    )


def _remove_stale_days(folder: Path, *, keep: set[str]) -> None:
    """Remove day files of an earlier, longer generation (only files named like ours)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _DAY_FILE.match(path.name) and path.name not in keep:
            path.unlink()
