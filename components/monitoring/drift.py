"""Drift: how far a production batch has moved from a model's reference profile.

For each monitored column the batch is compared with the :class:`~.profile.ReferenceProfile`
saved when the model was trained:

* numeric columns: PSI on the profile's quantile bins, and the two-sample
  Kolmogorov-Smirnov test against the profile's sorted sample;
* categorical columns: PSI on the category frequencies, the chi-square test of
  homogeneity, or the Jensen-Shannon distance;
* prediction drift: the model's scores on the batch against its scores on the test split
  (as a numeric column);
* once labels arrive (joined by the id column): label drift against the training labels,
  and performance decay, the model's metric on the batch against its test metric.

Everything streams: :class:`DriftMonitor` takes the batch a chunk at a time and keeps only
counts, so memory is bounded by the chunk whatever the batch's size, and the statistics
are those of the whole batch. Per numeric column and chunk the work is one sort of the
chunk (numpy's vectorised sort) and one binary search per distinct reference value: the
counts of the batch below and at every point of the reference sample are additive over
chunks and are all the KS statistic needs. The KS statistic and p-value are those of
``scipy.stats.ks_2samp(sample, batch)`` (bit for bit: the same differences of the same
fractions, and scipy's own p-value: its exact method for samples of up to 10,000 values,
``kstwo.sf`` beyond, as ``method="auto"`` does).

Definitions (``e`` the reference's shares, ``a`` the batch's, per bin or category):

* PSI = sum((a - e) * ln(a / e)), each share floored at :data:`PSI_FLOOR` so an empty bin
  contributes a large but finite amount;
* chi-square: the 2 x k contingency test of the reference and batch counts over the
  categories seen in either (no continuity correction), p-value from chi2(k - 1);
* Jensen-Shannon: the distance (square root of the divergence) in base 2, from 0 to 1.

A column drifts when any of its configured statistics crosses its threshold; the batch
has drift when at least ``min_drifted_features`` features drift, or its scores or labels
drift, or its performance decays. :func:`drift_event` then describes the Prefect event
``stemma.drift.detected`` that the monitoring flow emits.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.lineage import records as lineage
from stemma.components.monitoring.profile import (
    CATEGORICAL,
    NUMERIC,
    CategoricalProfile,
    ColumnProfile,
    NumericProfile,
    ReferenceProfile,
    bin_counts_sorted,
)
from stemma.components.spec import METRIC_DIRECTIONS, MonitorSpec

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from stemma.components.scoring.engine import ScoringModel

#: Floor of a bin's share in PSI, so an empty bin adds a large but finite term.
PSI_FLOOR = 1e-4
#: scipy's ks_2samp(method="auto") is exact while neither sample is larger than this.
KS_EXACT_MAX_N = 10_000
#: Values of a chunk from which its numeric columns are sorted in parallel parts.
PARALLEL_MIN_ROWS = 200_000
#: Read buffer of the Parquet reader.
READ_BUFFER_BYTES = 1 << 20
#: Most threads sorting parts of one column.
MAX_THREADS = 8
#: Name of the Prefect event emitted when a batch drifts over the thresholds.
DRIFT_EVENT = "stemma.drift.detected"
#: Roles of a compared column.
FEATURE, PREDICTION, LABEL = "feature", "prediction", "label"
#: Statistics names as they appear in reports, metrics and the event payload.
STATISTIC_NAMES = (
    "psi",
    "ks_statistic",
    "ks_pvalue",
    "chi2_statistic",
    "chi2_pvalue",
    "jensen_shannon",
)
#: Most categories a plot shows per column; the rest are drawn as one "other" bar.
PLOT_MAX_CATEGORIES = 12
#: Most drifted columns whose distributions the report's plot shows.
PLOT_TOP_COLUMNS = 3
#: Longest list of drifted features kept in a tag value.
MAX_TAG_CHARS = 4000

#: Counts per bin or category.
Counts = Sequence[float] | np.ndarray

_METRIC_UNSAFE = re.compile(r"[^\w.\- /]")


# ---------------------------------------------------------------------------------------
# Statistics on counts


def psi(reference_counts: Counts, current_counts: Counts) -> float:
    """Population stability index of two histograms on the same bins.

    Shares are floored at :data:`PSI_FLOOR`. Returns NaN when either histogram is empty.
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


def chi_square(reference_counts: Counts, current_counts: Counts) -> tuple[float, float]:
    """Chi-square test of homogeneity of two count vectors over the same categories.

    Categories with no row in either are left out; with fewer than two left the samples
    cannot differ: ``(0.0, 1.0)``. No continuity correction.

    Returns:
        ``(statistic, p-value)``; NaNs when either side is empty.
    """
    from scipy.special import chdtrc

    table = np.vstack(
        [np.asarray(reference_counts, dtype=np.float64), np.asarray(current_counts, np.float64)]
    )
    table = table[:, table.sum(axis=0) > 0]
    rows = table.sum(axis=1)
    if np.any(rows <= 0):
        return math.nan, math.nan
    if table.shape[1] < 2:
        return 0.0, 1.0
    expected = np.outer(rows, table.sum(axis=0)) / table.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    return statistic, float(chdtrc(table.shape[1] - 1, statistic))


def jensen_shannon(reference_counts: Counts, current_counts: Counts) -> float:
    """Jensen-Shannon distance (base 2, 0 to 1) of two histograms on the same bins."""
    p = np.asarray(reference_counts, dtype=np.float64)
    q = np.asarray(current_counts, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2.0

    def kl(x: np.ndarray) -> float:
        present = x > 0
        return float(np.sum(x[present] * np.log2(x[present] / m[present])))

    return math.sqrt(max((kl(p) + kl(q)) / 2.0, 0.0))


def ks_pvalue(statistic: float, n_reference: int, n_current: int) -> float:
    """Two-sided p-value of a two-sample KS statistic as scipy's asymptotic method has it."""
    from scipy.stats import kstwo

    m, n = sorted([float(n_reference), float(n_current)], reverse=True)
    en = m * n / (m + n)
    return float(np.clip(kstwo.sf(statistic, np.round(en)), 0.0, 1.0))


def ks_2samp_sorted(sample: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Two-sample KS test of ``values`` against a sorted reference ``sample``.

    Equal to ``scipy.stats.ks_2samp(sample, values)`` (statistic and p-value). Values
    that are missing or not finite are left out, as the monitor leaves them out.
    """
    ordered = np.sort(np.asarray(sample, dtype=np.float64))
    ordered = ordered[np.isfinite(ordered)]
    accumulator = NumericAccumulator(
        NumericProfile(
            rows=ordered.size, missing=0, edges=(), counts=(ordered.size,), sample=ordered
        )
    )
    accumulator.add(values)
    return accumulator.ks()


# ---------------------------------------------------------------------------------------
# Accumulating a batch


def _workers() -> int:
    return min(os.cpu_count() or 1, MAX_THREADS)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Threads that sort and count parts of large chunks, shared by every accumulator."""
    return ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="stemma-drift")


class NumericAccumulator:
    """Counts of a numeric column of the batch, chunk by chunk, against its profile."""

    def __init__(self, reference: NumericProfile) -> None:
        self.reference = reference
        sample = np.asarray(reference.sample, dtype=np.float64)
        self._points, first = np.unique(sample, return_index=True)
        # Reference sample values <= each distinct point (the sample is sorted).
        self._reference_le = np.append(first[1:], sample.size).astype(np.int64)
        self._edges = np.asarray(reference.edges, dtype=np.float64)
        self._below = np.zeros(self._points.size, dtype=np.int64)
        self._at_or_below = np.zeros(self._points.size, dtype=np.int64)
        self.bins = np.zeros(self._edges.size + 1, dtype=np.int64)
        self.rows = 0
        self.finite = 0
        self._sum = 0.0
        # Values kept while the batch is small enough for scipy's exact p-value.
        self._kept: list[np.ndarray] | None = []

    def add(self, values: np.ndarray) -> None:
        """Count one chunk of the column (missing and non-finite values are counted apart).

        The counts are additive over any split of the values, so a large chunk is cut into
        one part per CPU, each sorted and counted in its own thread (numpy releases the GIL
        while sorting and searching).
        """
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        self.rows += array.size
        finite = np.isfinite(array)
        if not finite.all():
            array = array[finite]
        self.finite += array.size
        if self._kept is not None:
            if self.finite <= KS_EXACT_MAX_N:
                self._kept.append(array.copy())
            else:
                self._kept = None
        workers = _workers()
        if array.size < PARALLEL_MIN_ROWS or workers == 1:
            parts = [self._count(array)]
        else:
            parts = list(_pool().map(self._count, np.array_split(array, workers)))
        for below, at_or_below, bins, total in parts:
            self._below += below
            self._at_or_below += at_or_below
            self.bins += bins
            self._sum += total

    def _count(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        ordered = np.sort(values)
        return (
            np.searchsorted(ordered, self._points, side="left"),
            np.searchsorted(ordered, self._points, side="right"),
            bin_counts_sorted(ordered, self._edges),
            float(ordered.sum()),
        )

    @property
    def missing(self) -> int:
        return self.rows - self.finite

    @property
    def mean(self) -> float:
        return self._sum / self.finite if self.finite else math.nan

    def ks(self) -> tuple[float, float]:
        """KS statistic and p-value of the values counted so far against the sample."""
        m, n = int(self.reference.sample.size), self.finite
        if m == 0 or n == 0:
            return math.nan, math.nan
        if m <= KS_EXACT_MAX_N and self._kept is not None:
            # Small samples: scipy's exact p-value (which also rounds the statistic to the
            # lattice of the two sizes), computed by scipy itself.
            from scipy.stats import ks_2samp

            kept = np.concatenate(self._kept) if self._kept else np.empty(0)
            result = ks_2samp(self.reference.sample, kept)
            return float(result.statistic), float(result.pvalue)
        reference_cdf = self._reference_le / m
        # The ECDF difference on [point_i, point_i+1) runs from its value at point_i to its
        # value just below point_i+1; below the first point the reference ECDF is 0.
        at_points = reference_cdf - self._at_or_below / n
        before_next = reference_cdf[:-1] - self._below[1:] / n
        before_first = -(self._below[0] / n)
        largest = max(float(at_points.max()), float(before_next.max(initial=0.0)), 0.0)
        smallest = min(float(at_points.min()), float(before_next.min(initial=0.0)), before_first)
        statistic = max(largest, min(max(-smallest, 0.0), 1.0))
        return statistic, ks_pvalue(statistic, m, n)


class CategoricalAccumulator:
    """Counts of a categorical column of the batch, chunk by chunk."""

    def __init__(self, reference: CategoricalProfile) -> None:
        self.reference = reference
        self.counts: dict[Any, int] = {}
        self.rows = 0
        self.missing = 0

    def add(self, values: Any) -> None:
        """Count one chunk (an Arrow array, numpy array or pandas Series)."""
        array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
        self.rows += len(array)
        self.missing += array.null_count
        counted = pc.value_counts(array)
        for value, count in zip(
            counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True
        ):
            if value is None:
                continue
            key = _category(value)
            self.counts[key] = self.counts.get(key, 0) + int(count)

    @property
    def finite(self) -> int:
        return self.rows - self.missing

    def aligned(self) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """Categories (the reference's, then new ones by count) with both count vectors."""
        categories = list(self.reference.categories)
        known = set(categories)
        new = sorted(
            (key for key in self.counts if key not in known),
            key=lambda key: (-self.counts[key], str(key)),
        )
        categories += new
        reference = np.asarray([*self.reference.counts, *([0] * len(new))], dtype=np.float64)
        current = np.asarray([self.counts.get(key, 0) for key in categories], dtype=np.float64)
        return categories, reference, current


def _category(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Accumulator = NumericAccumulator | CategoricalAccumulator


def _accumulator(reference: ColumnProfile) -> Accumulator:
    if isinstance(reference, NumericProfile):
        return NumericAccumulator(reference)
    return CategoricalAccumulator(reference)


# ---------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class ColumnDrift:
    """How one column of the batch compares with its reference.

    Attributes:
        name: the column (``score`` for the prediction, the target for the label).
        role: ``feature``, ``prediction`` or ``label``.
        kind: ``numeric`` or ``categorical``.
        rows: rows of the batch for this column; ``missing`` of them had no usable value.
        statistics: the configured statistics (``psi``, ``ks_statistic``, ``ks_pvalue``,
            ``chi2_statistic``, ``chi2_pvalue``, ``jensen_shannon``).
        breaches: the statistics over their thresholds (``psi``, ``ks``, ``chi2``,
            ``jensen_shannon``, or ``missing`` when the batch has no value at all).
        bins: a label per bin or category, for tables and plots.
        reference: the reference's share per bin.
        current: the batch's share per bin.
        reference_mean: the reference's mean (numeric) or rate of 1 (binary label).
        current_mean: the batch's.
    """

    name: str
    role: str
    kind: str
    rows: int
    missing: int
    statistics: dict[str, float]
    breaches: tuple[str, ...]
    bins: tuple[str, ...] = ()
    reference: tuple[float, ...] = ()
    current: tuple[float, ...] = ()
    reference_mean: float | None = None
    current_mean: float | None = None

    @property
    def drifted(self) -> bool:
        return bool(self.breaches)

    @property
    def severity(self) -> float:
        """PSI, for ranking (0 when it was not computed)."""
        value = self.statistics.get("psi", math.nan)
        return 0.0 if math.isnan(value) else value


@dataclass(frozen=True)
class PerformanceCheck:
    """The model's metric on the labelled batch against its test-split metric.

    Attributes:
        metric: the metric's name.
        reference: its value on the test split when the model was trained.
        current: its value on the labelled rows of the batch (None when not assessed).
        drop: how much worse the batch is, in the metric's units (positive: worse).
        threshold: the drop that counts as decay.
        rows: labelled rows with a score.
        decayed: whether the drop reached the threshold.
        note: why it was not assessed, when it was not.
    """

    metric: str
    reference: float | None
    current: float | None
    drop: float | None
    threshold: float
    rows: int
    decayed: bool
    note: str = ""


@dataclass(frozen=True)
class DriftReport:
    """The drift of one batch against a model's reference profile.

    Attributes:
        rows: rows of the batch.
        features: one comparison per monitored feature.
        prediction: the scores' comparison, or None.
        label: the labels' comparison, or None (no labels, or none matched).
        performance: the performance check, or None (no labels).
        labelled_rows: batch rows with a label.
        min_drifted_features: drifted features that make feature drift.
        thresholds: what the statistics were compared with (p-value thresholds after the
            correction for the number of tests).
        statistics: the configured statistics per kind of column.
        pvalue_correction: ``bonferroni`` or ``none``.
        min_rows: batches with fewer rows are not compared (``monitor.min_rows``); their
            report holds no columns and is never drift.
    """

    rows: int
    features: tuple[ColumnDrift, ...]
    prediction: ColumnDrift | None
    label: ColumnDrift | None
    performance: PerformanceCheck | None
    labelled_rows: int
    min_drifted_features: int
    thresholds: dict[str, float]
    statistics: dict[str, list[str]]
    pvalue_correction: str = "none"
    min_rows: int = 1

    @property
    def assessed(self) -> bool:
        """Whether the batch had rows enough to be compared at all."""
        return self.rows > 0 and self.rows >= self.min_rows

    @property
    def not_assessed_reason(self) -> str | None:
        """Why the batch was not compared, or None when it was."""
        if self.rows == 0:
            return "the batch has no rows: nothing to compare, drift not assessed"
        if self.rows < self.min_rows:
            return (
                f"the batch has {self.rows:,} rows, fewer than monitor.min_rows "
                f"({self.min_rows:,}): drift not assessed"
            )
        return None

    @property
    def drifted_features(self) -> list[str]:
        """Features that drifted, most drifted (by PSI) first."""
        drifted = [column for column in self.features if column.drifted]
        return [column.name for column in sorted(drifted, key=lambda c: -c.severity)]

    @property
    def feature_drift(self) -> bool:
        return len(self.drifted_features) >= self.min_drifted_features

    @property
    def prediction_drift(self) -> bool:
        return self.prediction is not None and self.prediction.drifted

    @property
    def label_drift(self) -> bool:
        return self.label is not None and self.label.drifted

    @property
    def performance_decay(self) -> bool:
        return self.performance is not None and self.performance.decayed

    @property
    def detected(self) -> bool:
        """Whether the batch drifted over the thresholds in any way (never when not assessed)."""
        return self.assessed and (
            self.feature_drift
            or self.prediction_drift
            or self.label_drift
            or self.performance_decay
        )

    @property
    def kinds(self) -> list[str]:
        """What drifted: ``features``, ``prediction``, ``label``, ``performance``."""
        flags = {
            "features": self.feature_drift,
            "prediction": self.prediction_drift,
            "label": self.label_drift,
            "performance": self.performance_decay,
        }
        return [kind for kind, on in flags.items() if on]

    @property
    def columns(self) -> list[ColumnDrift]:
        """Every compared column: features, then the prediction and the label."""
        extra = [column for column in (self.prediction, self.label) if column is not None]
        return [*self.features, *extra]

    def reasons(self) -> list[str]:
        """One line per finding, for people."""
        if not self.assessed:
            return [str(self.not_assessed_reason)]
        lines = []
        for column in self.columns:
            if column.drifted:
                lines.append(f"{column.role} {column.name}: {_describe(column)}")
        if self.features and not self.feature_drift and self.drifted_features:
            lines.append(
                f"{len(self.drifted_features)} drifted feature(s), fewer than "
                f"monitor.min_drifted_features ({self.min_drifted_features}): no feature drift"
            )
        check = self.performance
        if check is not None:
            if check.current is None:
                lines.append(f"performance not assessed: {check.note}")
            elif check.decayed:
                lines.append(
                    f"performance: {check.metric} {check.current:.4f} on {check.rows} labelled "
                    f"rows vs {check.reference:.4f} at training (drop {check.drop:.4f} >= "
                    f"{check.threshold})"
                )
        return lines

    def metrics(self) -> dict[str, float]:
        """Every number of the report as MLflow metrics (one ``log_batch``)."""
        out: dict[str, float] = {
            "rows": float(self.rows),
            "rows_labelled": float(self.labelled_rows),
            "drift_detected": float(self.detected),
            "drift_assessed": float(self.assessed),
            "features_monitored": float(len(self.features)),
            "features_drifted": float(len(self.drifted_features)),
        }
        for column in self.columns:
            prefix = {FEATURE: f"feature.{_metric_name(column.name)}"}.get(column.role, column.role)
            for name, value in column.statistics.items():
                out[f"{prefix}.{name}"] = value
            out[f"{prefix}.missing_share"] = column.missing / column.rows if column.rows else 0.0
            out[f"{prefix}.drifted"] = float(column.drifted)
            if column.current_mean is not None:
                out[f"{prefix}.mean"] = column.current_mean
        check = self.performance
        if check is not None and check.current is not None:
            out[f"performance.{check.metric}"] = check.current
            if check.reference is not None:
                out[f"performance.{check.metric}.reference"] = check.reference
            if check.drop is not None:
                out[f"performance.{check.metric}.drop"] = check.drop
        return out

    def table(self) -> pd.DataFrame:
        """One row per compared column: role, kind, statistics, thresholds crossed."""
        rows = []
        for column in self.columns:
            rows.append(
                {
                    "column": column.name,
                    "role": column.role,
                    "kind": column.kind,
                    "rows": column.rows,
                    "missing": column.missing,
                    **{name: column.statistics.get(name, math.nan) for name in STATISTIC_NAMES},
                    "reference_mean": column.reference_mean,
                    "current_mean": column.current_mean,
                    "drifted": column.drifted,
                    "breaches": ",".join(column.breaches),
                }
            )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-safe document (NaN as null)."""
        document = {
            "rows": self.rows,
            "labelled_rows": self.labelled_rows,
            "detected": self.detected,
            "assessed": self.assessed,
            "kinds": self.kinds,
            "drifted_features": self.drifted_features,
            "min_drifted_features": self.min_drifted_features,
            "thresholds": dict(self.thresholds),
            "pvalue_correction": self.pvalue_correction,
            "statistics": {kind: list(names) for kind, names in self.statistics.items()},
            "columns": [asdict(column) for column in self.columns],
            "performance": asdict(self.performance) if self.performance else None,
            "reasons": self.reasons(),
        }
        return json_safe(document)

    def summary(self) -> str:
        """One line for people."""
        if not self.assessed:
            return str(self.not_assessed_reason)
        if not self.detected:
            return (
                f"no drift over the thresholds in {self.rows:,} rows "
                f"({len(self.features)} features compared)"
            )
        parts = []
        if self.feature_drift:
            parts.append(
                f"{len(self.drifted_features)} of {len(self.features)} features "
                f"({', '.join(self.drifted_features)})"
            )
        if self.prediction_drift:
            parts.append("the model's scores")
        if self.label_drift:
            parts.append("the labels")
        if self.performance_decay and self.performance is not None:
            parts.append(f"performance ({self.performance.metric})")
        return f"drift in {'; '.join(parts)} over {self.rows:,} rows"


def _describe(column: ColumnDrift) -> str:
    shown = []
    for name in STATISTIC_NAMES:
        value = column.statistics.get(name)
        if value is not None and not math.isnan(value):
            shown.append(f"{name} {_number(value)}")
    breached = ", ".join(column.breaches)
    return f"{'; '.join(shown)} (over the threshold: {breached})"


def _number(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}"
    return f"{value:.3g}"


def _metric_name(name: str) -> str:
    return _METRIC_UNSAFE.sub("_", name)


def json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


# ---------------------------------------------------------------------------------------
# Comparing a batch


class DriftMonitor:
    """Compares a batch, fed chunk by chunk, with a reference profile.

    Args:
        profile: the model's reference profile.
        settings: the spec's monitor section (statistics, thresholds, ...).
        features: the features to compare (default: ``settings.features``, else every
            feature of the profile).
        prediction: whether scores will be added for prediction drift (they are compared
            only when the profile holds reference scores).

    Raises:
        DataError: a feature to compare is not in the profile.
    """

    def __init__(
        self,
        profile: ReferenceProfile,
        settings: MonitorSpec,
        *,
        features: Sequence[str] | None = None,
        prediction: bool = True,
    ) -> None:
        self.profile = profile
        self.settings = settings
        names = list(features or settings.features or profile.features)
        unknown = [name for name in names if name not in profile.features]
        if unknown:
            raise DataError(
                f"the reference profile has no {', '.join(unknown)}",
                [
                    f"profiled features: {', '.join(profile.features)}",
                    "monitor only features the model was trained on (monitor.features)",
                ],
            )
        self.features = {name: _accumulator(profile.features[name]) for name in names}
        self.scores = (
            NumericAccumulator(profile.scores)
            if prediction and settings.prediction_drift and profile.scores is not None
            else None
        )
        self.labels: Accumulator | None = None
        if settings.label_drift and profile.label is not None:
            self.labels = _accumulator(profile.label)
        self._labelled_truth: list[np.ndarray] = []
        self._labelled_scores: list[np.ndarray] = []
        self.rows = 0

    @property
    def columns(self) -> list[str]:
        """The feature columns each chunk must hold."""
        return list(self.features)

    def add(self, columns: Mapping[str, Any], scores: np.ndarray | None = None) -> None:
        """Count one chunk: a mapping of feature name to its values, and the chunk's scores.

        Numeric columns may be numpy arrays or Arrow arrays (nulls are missing values);
        categorical ones anything :class:`CategoricalAccumulator` takes.
        """
        rows = None
        for name, accumulator in self.features.items():
            values = columns[name]
            if isinstance(accumulator, NumericAccumulator):
                values = _float_values(values)
            accumulator.add(values)
            rows = len(values)
        if self.scores is not None and scores is not None:
            self.scores.add(scores)
            rows = len(scores) if rows is None else rows
        self.rows += rows or 0

    def add_labels(self, truth: np.ndarray, scores: np.ndarray | None) -> None:
        """Count labelled rows of the batch: their labels and (when scored) their scores."""
        truth = np.asarray(truth, dtype=np.float64)
        if self.labels is not None:
            if isinstance(self.labels, NumericAccumulator):
                self.labels.add(truth)
            else:
                finite = truth[np.isfinite(truth)]
                self.labels.add(pa.array(finite.astype(np.int64)))
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            usable = np.isfinite(truth) & np.isfinite(scores)
            self._labelled_truth.append(truth[usable])
            self._labelled_scores.append(scores[usable])

    def report(self, *, metric: str | None = None, labelled: bool = False) -> DriftReport:
        """The report of everything added so far.

        Args:
            metric: the performance metric (``roc_auc``...); None skips the check.
            labelled: whether labels were given (the label and performance checks then
                appear in the report, assessed or with the reason they were not).
        """
        settings = self.settings
        truth = np.concatenate(self._labelled_truth) if self._labelled_truth else np.empty(0)
        if self.rows == 0 or self.rows < settings.min_rows:
            # Statistics of an empty or tiny batch say nothing about the population; with
            # no rows every test would read as the largest possible shift.
            return DriftReport(
                rows=self.rows,
                features=(),
                prediction=None,
                label=None,
                performance=None,
                labelled_rows=int(truth.size) if labelled else 0,
                min_drifted_features=settings.min_drifted_features,
                thresholds=settings.thresholds.model_dump(),
                statistics={
                    NUMERIC: list(settings.statistics.numeric),
                    CATEGORICAL: list(settings.statistics.categorical),
                },
                pvalue_correction=settings.pvalue_correction,
                min_rows=settings.min_rows,
            )
        compared: list[tuple[str, str, Accumulator]] = [
            (name, FEATURE, accumulator) for name, accumulator in self.features.items()
        ]
        if self.scores is not None and self.scores.rows:
            compared.append(("score", PREDICTION, self.scores))
        if labelled and self.labels is not None and self.labels.finite:
            compared.append((self.profile.target, LABEL, self.labels))
        thresholds = _effective_thresholds(settings, [item[2] for item in compared])
        columns = [
            _column_drift(name, role, accumulator, settings, thresholds)
            for name, role, accumulator in compared
        ]
        features = tuple(column for column in columns if column.role == FEATURE)
        prediction = next((column for column in columns if column.role == PREDICTION), None)
        label = next((column for column in columns if column.role == LABEL), None)
        performance = None
        if labelled and metric is not None and settings.performance_decay:
            scores = np.concatenate(self._labelled_scores) if self._labelled_scores else np.empty(0)
            performance = _performance(self.profile, metric, truth, scores, settings)
        return DriftReport(
            rows=self.rows,
            features=features,
            prediction=prediction,
            label=label,
            performance=performance,
            labelled_rows=int(truth.size) if labelled else 0,
            min_drifted_features=settings.min_drifted_features,
            thresholds=thresholds,
            statistics={
                NUMERIC: list(settings.statistics.numeric),
                CATEGORICAL: list(settings.statistics.categorical),
            },
            pvalue_correction=settings.pvalue_correction,
            min_rows=settings.min_rows,
        )


def _float_values(values: Any) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise DataError(f"expected a numeric column, got {values.type}")
        return np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False))
    return np.asarray(values, dtype=np.float64)


def _effective_thresholds(
    settings: MonitorSpec, accumulators: Sequence[Accumulator]
) -> dict[str, float]:
    """The thresholds the statistics are compared with, p-value ones corrected.

    With ``pvalue_correction: bonferroni`` every p-value threshold is divided by the number
    of p-value tests the batch runs (KS per numeric column, chi-square per categorical one,
    as configured), so the chance that a batch drawn like the reference fails any of them
    is at most the threshold.
    """
    thresholds = settings.thresholds.model_dump()
    wanted = settings.statistics
    tests = sum(
        ("ks" in wanted.numeric)
        if isinstance(accumulator, NumericAccumulator)
        else ("chi2" in wanted.categorical)
        for accumulator in accumulators
    )
    if settings.pvalue_correction == "bonferroni" and tests > 1:
        for key in ("ks_pvalue", "chi2_pvalue"):
            thresholds[key] = thresholds[key] / tests
    return thresholds


def _column_drift(
    name: str,
    role: str,
    accumulator: Accumulator,
    settings: MonitorSpec,
    thresholds: Mapping[str, float],
) -> ColumnDrift:
    statistics: dict[str, float] = {}
    breaches: list[str] = []
    wanted: Sequence[str]
    if isinstance(accumulator, NumericAccumulator):
        reference = accumulator.reference
        wanted = settings.statistics.numeric
        if "psi" in wanted:
            statistics["psi"] = psi(reference.counts, accumulator.bins)
        if "ks" in wanted:
            statistics["ks_statistic"], statistics["ks_pvalue"] = accumulator.ks()
        bins = _bin_labels(reference.edges)
        reference_shares = _shares(reference.counts)
        current_shares = _shares(accumulator.bins)
        reference_mean, current_mean = reference.mean, accumulator.mean
        kind = NUMERIC
    else:
        categories, reference_counts, current_counts = accumulator.aligned()
        wanted = settings.statistics.categorical
        if "psi" in wanted:
            statistics["psi"] = psi(reference_counts, current_counts)
        if "chi2" in wanted:
            statistics["chi2_statistic"], statistics["chi2_pvalue"] = chi_square(
                reference_counts, current_counts
            )
        if "jensen_shannon" in wanted:
            statistics["jensen_shannon"] = jensen_shannon(reference_counts, current_counts)
        bins = tuple(str(value) for value in categories)
        reference_shares = _shares(reference_counts)
        current_shares = _shares(current_counts)
        reference_mean = current_mean = None
        if role == LABEL:  # a binary label: the rate of 1
            reference_mean = _rate_of_one(categories, reference_counts)
            current_mean = _rate_of_one(categories, current_counts)
        kind = CATEGORICAL
    rules = {
        "psi": lambda: statistics["psi"] >= thresholds["psi"],
        "ks": lambda: statistics["ks_pvalue"] < thresholds["ks_pvalue"],
        "chi2": lambda: statistics["chi2_pvalue"] < thresholds["chi2_pvalue"],
        "jensen_shannon": lambda: statistics["jensen_shannon"] >= thresholds["jensen_shannon"],
    }
    if accumulator.finite == 0 and accumulator.reference.finite > 0:
        breaches.append("missing")
    else:
        breaches += [statistic for statistic in wanted if rules[statistic]()]
    return ColumnDrift(
        name=name,
        role=role,
        kind=kind,
        rows=accumulator.rows,
        missing=accumulator.missing,
        statistics=statistics,
        breaches=tuple(breaches),
        bins=bins,
        reference=reference_shares,
        current=current_shares,
        reference_mean=reference_mean,
        current_mean=None if current_mean is None or math.isnan(current_mean) else current_mean,
    )


def _shares(counts: Sequence[float] | np.ndarray) -> tuple[float, ...]:
    values = np.asarray(counts, dtype=np.float64)
    total = values.sum()
    return tuple(float(v) for v in (values / total if total > 0 else values))


def _rate_of_one(categories: Sequence[Any], counts: np.ndarray) -> float | None:
    total = float(np.sum(counts))
    if total <= 0:
        return None
    return float(sum(c for v, c in zip(categories, counts, strict=True) if v == 1)) / total


def _bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    if not edges:
        return ("all",)
    shown = [_short(edge) for edge in edges]
    labels = [f"<{shown[0]}"]
    labels += [f"{low}-{high}" for low, high in itertools.pairwise(shown)]
    labels.append(f">={shown[-1]}")
    return tuple(labels)


def _short(value: float) -> str:
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _performance(
    profile: ReferenceProfile,
    metric: str,
    truth: np.ndarray,
    scores: np.ndarray,
    settings: MonitorSpec,
) -> PerformanceCheck:
    from stemma.components.training.metrics import evaluate_scores

    threshold = settings.thresholds.max_metric_drop
    reference = profile.performance.get(metric)

    def unassessed(note: str) -> PerformanceCheck:
        return PerformanceCheck(
            metric, reference, None, None, threshold, int(truth.size), False, note
        )

    if reference is None:
        return unassessed(f"the reference profile holds no {metric} for the model")
    if truth.size < settings.min_labelled_rows:
        return unassessed(
            f"{truth.size} labelled rows with a score, fewer than monitor.min_labelled_rows "
            f"({settings.min_labelled_rows})"
        )
    try:
        current = evaluate_scores(profile.task, truth, scores)[metric]
    except DataError as error:
        return unassessed(error.headline)
    if not math.isfinite(current):
        return unassessed(f"{metric} is not defined on these rows")
    higher_is_better = METRIC_DIRECTIONS[profile.task].get(metric, True)
    drop = reference - current if higher_is_better else current - reference
    return PerformanceCheck(
        metric, reference, current, drop, threshold, int(truth.size), drop >= threshold
    )


# ---------------------------------------------------------------------------------------
# Reading a batch


def read_chunks(
    files: Sequence[Path], columns: Sequence[str], chunk_rows: int
) -> Iterator[pa.Table]:
    """The files' rows, ``columns`` only, as tables of at most ``chunk_rows`` rows."""
    for path in files:
        try:
            if path.suffix.lower() == ".parquet":
                # A small read buffer and no pre-buffering: pyarrow otherwise holds whole
                # column chunks of a row group, and more of them the longer the file.
                parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
                try:
                    for batch in parquet.iter_batches(
                        batch_size=chunk_rows, columns=list(columns), use_threads=False
                    ):
                        yield pa.Table.from_batches([batch])
                        del batch
                        # Arrow's allocator keeps freed chunks for reuse; measured on 10M
                        # rows x 20 columns, that made peak memory grow with the file.
                        pa.default_memory_pool().release_unused()
                finally:
                    parquet.close()
            else:
                options = pacsv.ConvertOptions(
                    include_columns=list(columns), strings_can_be_null=True
                )
                with pacsv.open_csv(path, convert_options=options) as reader:
                    for batch in reader:
                        yield pa.Table.from_batches([batch])
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: cannot read it", [_first_line(error)]) from error


def read_labels(files: Sequence[Path], *, id_column: str | None, target: str) -> pd.Series:
    """The labels of a batch: the target by id, from Parquet or CSV files.

    Raises:
        DataError: the spec names no id column; a file lacks the id or target column
            (every file is checked before one is read); an id appears twice; a label is
            missing or not a number.
    """
    if id_column is None:
        raise DataError(
            "labels are joined to the batch by the id column, and the spec names none",
            ["set data.id to the column that identifies rows in batches and labels"],
        )
    problems = []
    for path in files:
        present = set(_schema(path).names)
        missing = [column for column in (id_column, target) if column not in present]
        if missing:
            role = " and ".join(
                f"{'id' if column == id_column else 'target'} column {column!r}"
                for column in missing
            )
            problems.append(
                f"{path.name}: no {role} (its columns: {', '.join(sorted(present)) or 'none'})"
            )
    if problems:
        raise DataError(
            f"the labels cannot be joined to the batch: {len(problems)} file(s) at fault",
            [*problems, f"a labels file holds {id_column!r} and {target!r}"],
        )
    parts = [
        table.to_pandas() for table in read_chunks(files, [id_column, target], chunk_rows=1_000_000)
    ]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    duplicated = frame[id_column].duplicated(keep=False)
    if duplicated.any():
        examples = frame.loc[duplicated, id_column].unique()[:5]
        raise DataError(
            f"the labels hold {int(duplicated.sum())} rows with a repeated {id_column}",
            [f"e.g. {', '.join(str(value) for value in examples)}", "keep one label per row"],
        )
    values = pd.to_numeric(frame[target], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad.any():
        examples = frame.loc[bad, id_column].head(5).tolist()
        raise DataError(
            f"{int(bad.sum())} labels are missing or not numbers",
            [f"{id_column} {', '.join(str(value) for value in examples)}"],
        )
    return pd.Series(values.to_numpy(dtype=np.float64), index=frame[id_column].to_numpy())


def _schema(path: Path) -> pa.Schema:
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_schema(path)
        with pacsv.open_csv(path) as reader:
            return reader.schema
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable file", [_first_line(error)]) from error


def make_scorer(model: ScoringModel) -> Callable[[pa.Table], np.ndarray]:
    """A function giving the model's score for each row of a chunk.

    Rows with a missing or non-finite numeric feature get NaN (left out of the prediction
    comparison); an unknown category encodes as unknown, as ``score.unknown_categories:
    score`` does.
    """
    from stemma.components.training.loop import predict_raw

    preprocessor = model.preprocessor
    numeric = list(preprocessor.numeric)
    means = dict(zip(numeric, preprocessor.means, strict=True))

    def score(table: pa.Table) -> np.ndarray:
        frame = table.select(model.feature_columns).to_pandas()
        usable = np.ones(len(frame), dtype=bool)
        for column in numeric:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
            finite = np.isfinite(values)
            usable &= finite
            frame[column] = np.where(finite, values, means[column])
        raw = predict_raw(model.network, preprocessor.transform(frame))
        scores = np.asarray(preprocessor.decode_output(raw), dtype=np.float64).reshape(len(frame))
        scores[~usable] = np.nan
        return scores

    return score


def monitor_batch(
    files: Sequence[Path],
    profile: ReferenceProfile,
    settings: MonitorSpec,
    *,
    scorer: Callable[[pa.Table], np.ndarray] | None = None,
    score_columns: Sequence[str] = (),
    labels: pd.Series | None = None,
    id_column: str | None = None,
    metric: str | None = None,
) -> DriftReport:
    """Compare a batch (files read a chunk at a time) with a reference profile.

    Args:
        files: the batch's Parquet or CSV files (columns already checked).
        profile: the model's reference profile.
        settings: the spec's monitor section.
        scorer: scores a chunk (from :func:`make_scorer`), for prediction drift and the
            performance check; None skips both.
        score_columns: the columns the scorer reads.
        labels: the batch's labels by id (from :func:`read_labels`), or None.
        id_column: the column the labels join on.
        metric: the performance metric (``roc_auc``...).

    Returns:
        The report.
    """
    monitor = DriftMonitor(profile, settings, prediction=scorer is not None)
    columns = list(dict.fromkeys([*monitor.columns, *score_columns]))
    if labels is not None:
        if id_column is None:
            raise DataError("labels need an id column to join on (data.id)")
        columns.append(id_column)
    for chunk in read_chunks(files, columns, settings.chunk_rows):
        scores = scorer(chunk) if scorer is not None else None
        monitor.add({name: chunk.column(name) for name in monitor.columns}, scores)
        if labels is not None and id_column is not None:
            ids = chunk.column(id_column).to_numpy(zero_copy_only=False)
            truth = labels.reindex(ids).to_numpy(dtype=np.float64, na_value=np.nan)
            known = np.isfinite(truth)
            if known.any():
                monitor.add_labels(truth[known], None if scores is None else scores[known])
    return monitor.report(metric=metric, labelled=labels is not None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------
# The event, the lineage record and the plot


def pipeline_resource_id(pipeline: str) -> str:
    """The Prefect resource of a pipeline, which drift events are about."""
    return f"stemma.pipeline.{pipeline}"


def model_version_resource_id(model_name: str, version: str) -> str:
    return f"stemma.model-version.{model_name}.{version}"


@dataclass(frozen=True)
class MonitorFacts:
    """What a monitoring run read and wrote, for its event and lineage record."""

    pipeline: str
    model_name: str
    model_version: str
    weights_sha256: str
    profile_sha256: str
    training_run_id: str | None
    batch_path: str
    batch_digest: str
    batch_files: dict[str, str]
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    report_sha256: str
    labels_path: str | None = None
    labels_digest: str | None = None
    event_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def model_uri(self) -> str:
        return lineage.model_node_id(self.model_name, self.model_version)


def drift_event(report: DriftReport, facts: MonitorFacts) -> dict[str, Any] | None:
    """The ``stemma.drift.detected`` event for ``prefect.events.emit_event(**event)``.

    Returns None when the batch did not drift over the thresholds: no event then.
    """
    if not report.detected:
        return None
    drifted = {
        column.name: json_safe(dict(column.statistics))
        for column in report.features
        if column.drifted
    }
    payload: dict[str, Any] = {
        "pipeline": facts.pipeline,
        "model": facts.model_uri,
        "model_name": facts.model_name,
        "model_version": facts.model_version,
        "report_run_id": facts.run_id,
        "batch": facts.batch_path,
        "batch_digest": facts.batch_digest,
        "labels": facts.labels_path,
        "rows": report.rows,
        "kinds": report.kinds,
        "drifted_features": report.drifted_features,
        "statistics": drifted,
        "prediction": (
            json_safe({"drifted": report.prediction.drifted, **report.prediction.statistics})
            if report.prediction is not None
            else None
        ),
        "label": (
            json_safe({"drifted": report.label.drifted, **report.label.statistics})
            if report.label is not None
            else None
        ),
        "performance": json_safe(asdict(report.performance)) if report.performance else None,
        "reasons": report.reasons(),
    }
    event: dict[str, Any] = {
        "event": DRIFT_EVENT,
        "resource": {
            "prefect.resource.id": pipeline_resource_id(facts.pipeline),
            "prefect.resource.name": facts.pipeline,
            "stemma.pipeline": facts.pipeline,
        },
        "related": [
            {
                "prefect.resource.id": model_version_resource_id(
                    facts.model_name, facts.model_version
                ),
                "prefect.resource.role": "model-version",
                "prefect.resource.name": f"{facts.model_name} v{facts.model_version}",
                "stemma.model.uri": facts.model_uri,
            },
            {
                "prefect.resource.id": f"stemma.drift-report.{facts.run_id}",
                "prefect.resource.role": "drift-report",
                "mlflow.run_id": facts.run_id,
            },
        ],
        "payload": payload,
    }
    return event


def report_node_id(run_id: str) -> str:
    return f"drift-report:{run_id}"


def profile_node_id(sha256: str) -> str:
    return f"reference-profile:{sha256}"


def build_monitor_record(
    report: DriftReport, facts: MonitorFacts, *, created: datetime | None = None
) -> dict[str, Any]:
    """The lineage record of a monitoring run (``lineage/record.json``).

    The batch (by its digest), the labels, the model version and its reference profile
    go into the run, which produces the drift report; the batch and the model version are
    ``monitored_in`` the report (the edge the retraining record draws from a batch to the
    report that caused it). Only the report is reachable from the run's node, so the
    lineage index counts it as the one thing the run made.
    """
    Node, Edge = lineage.Node, lineage.Edge
    batch = lineage.input_node_id(facts.batch_path, facts.batch_digest)
    model = lineage.model_node_id(facts.model_name, facts.model_version)
    reference = profile_node_id(facts.profile_sha256)
    run = lineage.run_node_id(facts.run_id)
    drift_report = report_node_id(facts.run_id)
    nodes = [
        Node(
            "input",
            batch,
            f"md5:{facts.batch_digest}",
            {"path": facts.batch_path, "files": dict(facts.batch_files), "role": "batch"},
        ),
        Node("model_version", model, f"sha256:{facts.weights_sha256}", {}),
        Node(
            "reference_profile",
            reference,
            f"sha256:{facts.profile_sha256}",
            {"training_run_id": facts.training_run_id},
        ),
        Node(
            "run",
            run,
            None,
            {"experiment_id": facts.experiment_id, "flow_run_id": facts.flow_run_id},
        ),
        Node(
            "drift_report",
            drift_report,
            f"sha256:{facts.report_sha256}",
            {
                "detected": report.detected,
                "kinds": report.kinds,
                "drifted_features": report.drifted_features,
                "artifact": REPORT_ARTIFACT,
                "event_id": facts.event_id,
            },
        ),
    ]
    edges = [
        Edge(model, reference, "profiled_by"),
        Edge(batch, run, "input_of"),
        Edge(model, run, "monitored_with"),
        Edge(reference, run, "reference_of"),
        Edge(run, drift_report, "produced"),
        Edge(batch, drift_report, "monitored_in"),
        Edge(model, drift_report, "monitored_in"),
    ]
    if facts.labels_path and facts.labels_digest:
        labels = lineage.input_node_id(facts.labels_path, facts.labels_digest)
        nodes.insert(
            1,
            Node(
                "input",
                labels,
                f"md5:{facts.labels_digest}",
                {"path": facts.labels_path, "role": "labels"},
            ),
        )
        edges.insert(2, Edge(labels, run, "input_of"))
    if facts.training_run_id:
        training = lineage.run_node_id(facts.training_run_id)
        nodes.append(Node("run", training, None, {"flow": "train"}))
        edges.insert(0, Edge(training, reference, "produced"))
    return {
        "schema": lineage.RECORD_SCHEMA,
        "pipeline": facts.pipeline,
        "flow": "monitor",
        "created": (created or datetime.now(UTC)).isoformat(),
        "nodes": [asdict(node) for node in nodes],
        "edges": [asdict(edge) for edge in edges],
        "artifacts": {path: f"sha256:{digest}" for path, digest in sorted(facts.artifacts.items())},
    }


def run_tags(report: DriftReport) -> dict[str, str]:
    """``stemma.drift.*`` tags of the report's MLflow run."""
    features = ",".join(report.drifted_features)
    if len(features) > MAX_TAG_CHARS:
        features = features[: MAX_TAG_CHARS - 3] + "..."
    return {
        "stemma.drift.detected": str(report.detected).lower(),
        "stemma.drift.features": features,
        "stemma.drift.kinds": ",".join(report.kinds),
        "stemma.drift.summary": report.summary()[:MAX_TAG_CHARS],
    }


#: Where the report's files go among the run's artifacts.
REPORT_ARTIFACT = "drift/report.json"
TABLE_ARTIFACT = "drift/statistics.json"
PLOT_ARTIFACT = "drift/summary.png"

#: Size (inches) and resolution of the summary plot.
PLOT_WIDTH = 13.0
PLOT_ROW_HEIGHT = 3.6
PLOT_DPI = 100
#: Columns of the plot's grid: two halves on top, PLOT_TOP_COLUMNS equal panels below.
PLOT_GRID_COLUMNS = 6
_DRIFTED_COLOR = "#c0392b"
_STABLE_COLOR = "#4a7fb5"
_REFERENCE_COLOR = "#9aa5b1"


def plot_drift_report(report: DriftReport, out_path: Path, *, title: str) -> Path:
    """Draw the report at a glance: drift per column against the thresholds, and the
    distributions (reference vs batch) of the most drifted columns.

    Top left: PSI per column with the PSI threshold; top right: the p-values of the KS or
    chi-square tests as -log10(p) with their thresholds; below, the shares per bin or
    category of the :data:`PLOT_TOP_COLUMNS` most drifted columns. Drifted columns are red.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = report.columns
    top = sorted(columns, key=lambda c: (not c.drifted, -c.severity))[:PLOT_TOP_COLUMNS]
    figure = Figure(
        figsize=(PLOT_WIDTH, PLOT_ROW_HEIGHT * (2 if top else 1) + 0.3 * len(columns) / 4),
        dpi=PLOT_DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2 if top else 1, PLOT_GRID_COLUMNS)
    half = PLOT_GRID_COLUMNS // 2
    _plot_bars(
        figure.add_subplot(grid[0, :half]),
        columns,
        lambda c: c.statistics.get("psi"),
        report.thresholds["psi"],
        xlabel="PSI (reference quantile bins / categories)",
    )
    pvalue_thresholds = [
        report.thresholds[key]
        for key, used in (
            ("ks_pvalue", "ks" in report.statistics[NUMERIC]),
            ("chi2_pvalue", "chi2" in report.statistics[CATEGORICAL]),
        )
        if used
    ]
    _plot_bars(
        figure.add_subplot(grid[0, half:]),
        columns,
        _log_pvalue,
        -math.log10(min(pvalue_thresholds)) if pvalue_thresholds else None,
        xlabel="-log10 p-value (KS for numeric, chi-square for categorical)",
        threshold_label=(
            "threshold (Bonferroni)" if report.pvalue_correction == "bonferroni" else "threshold"
        ),
    )
    span = PLOT_GRID_COLUMNS // max(len(top), 1)
    for index, column in enumerate(top):
        _plot_distribution(figure.add_subplot(grid[1, index * span : (index + 1) * span]), column)
    verdict = "DRIFT: " + report.summary() if report.detected else report.summary()
    figure.suptitle(f"{title}\n{verdict}", fontsize=11)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    figure.savefig(temporary, format="png")
    os.replace(temporary, out)
    return out


def _log_pvalue(column: ColumnDrift) -> float | None:
    value = column.statistics.get("ks_pvalue", column.statistics.get("chi2_pvalue"))
    if value is None or math.isnan(value):
        return None
    return -math.log10(max(value, 1e-300))


def _plot_bars(
    axes: Axes,
    columns: Iterable[ColumnDrift],
    value: Callable[[ColumnDrift], float | None],
    threshold: float | None,
    *,
    xlabel: str,
    threshold_label: str = "threshold",
) -> None:
    shown: list[tuple[ColumnDrift, float]] = []
    for column in columns:
        number = value(column)
        if number is not None and not math.isnan(number):
            shown.append((column, number))
    shown.sort(key=lambda item: item[1])
    names = [f"{c.name}" if c.role == FEATURE else f"{c.name} ({c.role})" for c, _ in shown]
    values = [v for _, v in shown]
    colors = [_DRIFTED_COLOR if c.drifted else _STABLE_COLOR for c, _ in shown]
    axes.barh(names, values, color=colors)
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=threshold_label)
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.tick_params(labelsize=8)


def _plot_distribution(axes: Axes, column: ColumnDrift) -> None:
    labels, reference, current = list(column.bins), list(column.reference), list(column.current)
    if len(labels) > PLOT_MAX_CATEGORIES:
        keep = PLOT_MAX_CATEGORIES - 1
        labels = [*labels[:keep], "other"]
        reference = [*reference[:keep], sum(reference[keep:])]
        current = [*current[:keep], sum(current[keep:])]
    positions = np.arange(len(labels))
    width = 0.4
    axes.bar(positions - width / 2, reference, width, color=_REFERENCE_COLOR, label="reference")
    axes.bar(
        positions + width / 2,
        current,
        width,
        color=_DRIFTED_COLOR if column.drifted else _STABLE_COLOR,
        label="batch",
    )
    axes.set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
    axes.set_ylabel("share of rows", fontsize=9)
    stats = ", ".join(
        f"{name} {_number(column.statistics[name])}"
        for name in ("psi", "ks_pvalue", "chi2_pvalue", "jensen_shannon")
        if name in column.statistics and not math.isnan(column.statistics[name])
    )
    role = "" if column.role == FEATURE else f" ({column.role})"
    axes.set_title(f"{column.name}{role}: {stats}", fontsize=9)
    axes.legend(fontsize=8)
