"""The drift report: per-column comparisons, the verdict, and its metrics, table and plot."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stemma.components.monitoring.profile import CATEGORICAL, NUMERIC
from stemma.components.spec.limits import percent_of
from stemma.components.training.metrics import save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Roles of a compared column: a feature, the model's scores, a classifier's predicted
#: classes, the labels.
FEATURE, PREDICTION, PREDICTED_CLASS, LABEL = "feature", "prediction", "predicted_class", "label"
#: Statistics names as they appear in reports, metrics and the event payload.
STATISTIC_NAMES = (
    "psi",
    "ks_statistic",
    "ks_pvalue",
    "chi2_statistic",
    "chi2_pvalue",
    "jensen_shannon",
    "missing_pvalue",
)
#: Why a statistic is left out of several columns (each column's numbers are in its own
#: ``not_assessed``).
NOT_ASSESSED = {
    "psi": (
        "a bin can expect fewer than monitor.psi_min_expected of the batch's rows (the numbers "
        "per column are in the report's table)"
    ),
    "chi2": "fewer than two categories (rare ones pooled) can expect 5 of the batch's rows",
}
#: Most categories a plot shows per column; the rest are drawn as one "other" bar.
PLOT_MAX_CATEGORIES = 12
#: Most drifted columns whose distributions the report's plot shows.
PLOT_TOP_COLUMNS = 3

_METRIC_UNSAFE = re.compile(r"[^\w.\- /]")


@dataclass(frozen=True)
class ColumnDrift:
    """How one column of the batch compares with its reference.

    Attributes:
        name: the column (``score`` for the prediction, ``class`` for the predicted
            class, the target for the label).
        role: ``feature``, ``prediction``, ``predicted_class`` or ``label``.
        kind: ``numeric`` or ``categorical``.
        rows: rows of the batch for this column; ``missing`` of them had no usable value.
        statistics: the configured statistics (``psi``, ``ks_statistic``, ``ks_pvalue``,
            ``chi2_statistic``, ``chi2_pvalue``, ``jensen_shannon``).
        breaches: the statistics over their thresholds (``psi``, ``ks``, ``chi2``,
            ``jensen_shannon``), and ``missing`` when the missing rate rose significantly
            or the batch has no value at all.
        bins: a label per bin or category, for tables and plots.
        reference: the reference's share per bin.
        current: the batch's share per bin.
        reference_mean: the reference's mean (numeric) or rate of 1 (binary label).
        current_mean: the batch's.
        reference_missing_share: the reference's share of missing values (features).
        not_assessed: why a configured statistic was not computed, by statistic (``psi``:
            a bin cannot expect ``monitor.psi_min_expected`` rows; ``chi2``: fewer than two
            categories can expect 5).
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
    reference_missing_share: float | None = None
    not_assessed: dict[str, str] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return bool(self.breaches)

    @property
    def missing_share(self) -> float:
        return self.missing / self.rows if self.rows else 0.0

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
        threshold: the drop that counts as decay, in the metric's units.
        rows: labelled rows with a score.
        decayed: whether the drop reached the threshold.
        note: why it was not assessed, when it was not.
        limit: the threshold as the spec gave it and in the metric's units (``5% =
            3.2550``, ``0.05 = 5.88%``).
    """

    metric: str
    reference: float | None
    current: float | None
    drop: float | None
    threshold: float
    rows: int
    decayed: bool
    note: str = ""
    limit: str = ""


@dataclass(frozen=True)
class DriftReport:
    """The drift of one batch against a model's reference profile.

    Attributes:
        rows: rows of the batch.
        features: one comparison per monitored feature.
        prediction: the scores' comparison, or None.
        predicted_class: a classifier's predicted classes' comparison, or None.
        label: the labels' comparison, or None (no labels, or none matched).
        performance: the performance check, or None (no labels).
        labelled_rows: batch rows with a label.
        min_drifted_features: drifted features that make feature drift.
        thresholds: what the statistics were compared with (p-value thresholds after the
            correction for the number of tests; ``psi`` None when PSI does not decide).
        statistics: the configured statistics per kind of column.
        pvalue_correction: ``bonferroni`` or ``none``.
        tests: the p-value tests the batch ran (what Bonferroni divides by).
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
    tests: int = 0
    predicted_class: ColumnDrift | None = None

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
        """The scores or the predicted classes drifted."""
        return any(
            column is not None and column.drifted
            for column in (self.prediction, self.predicted_class)
        )

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
        """Every compared column: features, then the prediction, the predicted class and the
        label."""
        extra = [
            column
            for column in (self.prediction, self.predicted_class, self.label)
            if column is not None
        ]
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
                    f"rows vs {check.reference:.4f} at training, worse by {check.drop:.4f} "
                    f"({percent_of(check.drop, check.reference)}), limit "
                    f"{check.limit or check.threshold}"
                )
        return lines + self.not_assessed_lines()

    def not_assessed_lines(self) -> list[str]:
        """One line per statistic left out of some columns: which, and why (the columns'
        ``not_assessed`` hold each one's numbers)."""
        skipped: dict[str, list[ColumnDrift]] = {}
        for column in self.columns:
            for statistic in column.not_assessed:
                skipped.setdefault(statistic, []).append(column)
        lines = []
        for statistic, columns in skipped.items():
            names = ", ".join(
                column.name if column.role == FEATURE else column.role for column in columns
            )
            why = columns[0].not_assessed[statistic] if len(columns) == 1 else None
            lines.append(
                f"{statistic} not assessed for {names}: "
                f"{why or NOT_ASSESSED.get(statistic, 'see the report')}"
            )
        return lines

    def metrics(self) -> dict[str, float]:
        """Every number of the report as MLflow metrics (one ``log_batch``)."""
        out: dict[str, float] = {
            "rows": float(self.rows),
            "rows_labelled": float(self.labelled_rows),
            "detected": float(self.detected),
            "assessed": float(self.assessed),
            "features_monitored": float(len(self.features)),
            "features_drifted": float(len(self.drifted_features)),
        }
        for column in self.columns:
            prefix = {FEATURE: f"feature.{_metric_name(column.name)}"}.get(column.role, column.role)
            for name, value in column.statistics.items():
                out[f"{prefix}.{name}"] = value
            out[f"{prefix}.missing_share"] = column.missing_share
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
        return pd.DataFrame(
            [
                {
                    "column": column.name,
                    "role": column.role,
                    "kind": column.kind,
                    "rows": column.rows,
                    "missing": column.missing,
                    "missing_share": column.missing_share,
                    "reference_missing_share": column.reference_missing_share,
                    **{name: column.statistics.get(name, math.nan) for name in STATISTIC_NAMES},
                    "reference_mean": column.reference_mean,
                    "current_mean": column.current_mean,
                    "drifted": column.drifted,
                    "breaches": ",".join(column.breaches),
                    "not_assessed": "; ".join(
                        f"{name}: {why}" for name, why in column.not_assessed.items()
                    ),
                }
                for column in self.columns
            ]
        )

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
            "tests": self.tests,
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
        if self.prediction is not None and self.prediction.drifted:
            parts.append("the model's scores")
        if self.predicted_class is not None and self.predicted_class.drifted:
            parts.append("the predicted classes")
        if self.label_drift:
            parts.append("the labels")
        if self.performance_decay and self.performance is not None:
            parts.append(f"performance ({self.performance.metric})")
        return f"drift in {'; '.join(parts)} over {self.rows:,} rows"


def _describe(column: ColumnDrift) -> str:
    shown = [
        f"{name} {format_statistic(value)}"
        for name in STATISTIC_NAMES
        if (value := column.statistics.get(name)) is not None and not math.isnan(value)
    ]
    if "missing" in column.breaches and column.reference_missing_share is not None:
        shown.append(
            f"missing {column.missing_share:.1%} vs {column.reference_missing_share:.1%} "
            "in the reference"
        )
    breached = ", ".join(column.breaches)
    return f"{'; '.join(shown)} (over the threshold: {breached})"


def format_statistic(value: float) -> str:
    """A statistic for people: four decimals, or three significant digits when tiny or huge."""
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

    Top left: PSI per column with the PSI threshold (when PSI decides); top right: the
    p-values of the KS or chi-square tests as -log10(p) with their thresholds; below, the
    shares per bin or category of the :data:`PLOT_TOP_COLUMNS` most drifted columns.
    Drifted columns are red.
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
        report.thresholds.get("psi"),
        xlabel=(
            "PSI (reference quantile bins / categories)"
            if report.thresholds.get("psi") is not None
            else "PSI (reference quantile bins / categories; reported, the tests decide)"
        ),
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
    return save_figure(figure, Path(out_path))


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
    numbers = [(column, value(column)) for column in columns]
    shown = sorted(
        ((c, n) for c, n in numbers if n is not None and not math.isnan(n)), key=lambda i: i[1]
    )
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
        f"{name} {format_statistic(column.statistics[name])}"
        for name in ("psi", "ks_pvalue", "chi2_pvalue", "jensen_shannon")
        if name in column.statistics and not math.isnan(column.statistics[name])
    )
    role = "" if column.role == FEATURE else f" ({column.role})"
    axes.set_title(f"{column.name}{role}: {stats}", fontsize=9)
    axes.legend(fontsize=8)
