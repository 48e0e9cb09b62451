"""The spec's monitor section: which statistics compare a production batch with the model's
reference profile, when they count as drift, and on which batches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stemma.components.platform.deployments import LOG_MONITOR_DAYS, LOG_MONITOR_SCHEDULE
from stemma.components.spec.limits import MetricDrop, PositiveMetricDrop, default_drop
from stemma.components.spec.operations import MONITOR_DROP
from stemma.components.spec.sections import CronSchedule, ModelReference, Section

#: Rows under which a batch is not compared (`monitor.min_rows`).
DEFAULT_MIN_ROWS = 100

NumericStatistic = Literal["psi", "ks"]
CategoricalStatistic = Literal["psi", "chi2", "jensen_shannon"]


class MonitorStatisticsSpec(Section):
    """Which statistics compare a batch with the reference, per kind of column."""

    numeric: list[NumericStatistic] = Field(
        default_factory=lambda: list[NumericStatistic](["psi", "ks"]),
        min_length=1,
        max_length=2,
        description=(
            "`psi`: population stability index on the reference's quantile bins (how far "
            "the column moved; it decides only with `thresholds.psi`); `ks`: two-sample "
            "Kolmogorov-Smirnov test against the reference's stored sample (decides at "
            "`thresholds.ks_pvalue`)."
        ),
    )
    categorical: list[CategoricalStatistic] = Field(
        default_factory=lambda: list[CategoricalStatistic](["psi", "chi2"]),
        min_length=1,
        max_length=3,
        description=(
            "`psi` on the category frequencies (decides only with `thresholds.psi`), "
            "`chi2`: chi-square test of homogeneity, categories the batch can expect fewer "
            "than 5 rows of pooled into one (decides at `thresholds.chi2_pvalue`), "
            "`jensen_shannon`: Jensen-Shannon distance (base 2, 0 to 1)."
        ),
    )


class MonitorThresholdsSpec(Section):
    """When a statistic counts as drift: a column drifts when any of its statistics does."""

    psi: float | None = Field(
        default=None,
        gt=0.0,
        le=10.0,
        description=(
            "Drift when the PSI is at least this. Default none: PSI is reported (how far a "
            "column moved) and the tests decide. PSI has no error rate: on a batch of n rows "
            "drawn like the reference its spread is about (bins - 1) / n, so with 10 bins "
            "0.2 raises false alarms on batches under a few hundred rows."
        ),
    )
    ks_pvalue: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description=(
            "Drift when the Kolmogorov-Smirnov p-value is below this (after the correction, "
            "`pvalue_correction`)."
        ),
    )
    chi2_pvalue: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description="Drift when the chi-square p-value is below this.",
    )
    missing_pvalue: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description=(
            "Missing-rate drift when the p-value of the batch's missing rate being higher "
            "than the reference's (Fisher's exact test) is below this."
        ),
    )
    jensen_shannon: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Drift when the Jensen-Shannon distance is at least this.",
    )
    max_metric_drop: PositiveMetricDrop | None = Field(
        default=None,
        description=(
            "Performance decay when the labelled batch's metric is worse than the reference "
            "(test split) by at least this: a number in the metric's units (`0.05`) or a "
            "percentage of the reference (`5%`). Default: 5% for metrics in the target's units "
            "(rmse, mae), 0.05 for the others. A relative limit of a reference of 0 is 0."
        ),
    )

    def metric_drop(self, metric: str) -> MetricDrop:
        """``max_metric_drop``, or its default for ``metric``."""
        return self.max_metric_drop or default_drop(metric, **MONITOR_DROP)


class MonitorSpec(Section):
    """Drift monitoring of production batches against the model's reference profile."""

    input: str | None = Field(
        default=None,
        description=(
            "Batch to monitor, a Parquet or CSV file or a folder of them (one batch), relative "
            "to the project root (default: the spec's `score.input`)."
        ),
    )
    labels: str | None = Field(
        default=None,
        description=(
            "Labels of the batch (file or folder with the id and target columns), joined by "
            "the id column; enables label drift and performance decay."
        ),
    )
    model: ModelReference | None = Field(
        default=None,
        description=(
            "Model whose reference profile and scores are compared, `models:/<name>@<alias>` "
            "or `models:/<name>/<version>` (default: the pipeline's model @champion)."
        ),
    )
    features: list[str] | None = Field(
        default=None,
        description="Feature columns to monitor (default: every feature of `data.features`).",
    )
    statistics: MonitorStatisticsSpec = Field(
        default_factory=MonitorStatisticsSpec, description="Statistics per kind of column."
    )
    thresholds: MonitorThresholdsSpec = Field(
        default_factory=MonitorThresholdsSpec, description="When a statistic counts as drift."
    )
    min_drifted_features: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="The batch has feature drift when at least this many features drift.",
    )
    min_rows: int = Field(
        default=DEFAULT_MIN_ROWS,
        ge=1,
        le=1_000_000_000,
        description=(
            "Batches with fewer rows are not compared: the report says drift was not "
            "assessed and why, and no drift event is sent. A batch with no rows is never "
            "drift. Default 100: under it the corrected tests find only gross shifts (KS "
            "needs the distributions apart by about 0.2 at 100 rows, 0.37 at 30), PSI on 10 "
            "bins cannot expect `psi_min_expected` rows per bin, and an event starts a "
            "retraining."
        ),
    )
    psi_min_expected: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description=(
            "PSI is computed only where each bin can expect at least this many of the "
            "batch's rows (its share of the reference times the batch's rows); categories "
            "that cannot are pooled into one bin. Below it PSI is not assessed for the "
            "column and the report says why. 10: an empty bin's term alone is about 0.7 (its "
            "share is floored), and a bin expecting 5 rows is empty once in 150 batches, one "
            "expecting 10 once in 22,000."
        ),
    )
    pvalue_correction: Literal["bonferroni", "none"] = Field(
        default="bonferroni",
        description=(
            "`bonferroni`: each test's p-value is compared with its threshold divided by the "
            "number of tests the batch runs (KS or chi-square and the missing rate per "
            "feature, the prediction's and the label's tests), so a batch like the reference "
            "raises a false alarm at most at the threshold's rate; `none`: at that rate per "
            "test. Holm's method would decide the same batches (its first step is "
            "Bonferroni's) and only name more drifted columns."
        ),
    )
    prediction_drift: bool = Field(
        default=True,
        description=(
            "Also compare the model's scores on the batch with its scores on the test split "
            "(KS; PSI reported), and a classifier's predicted classes with those it predicted "
            "there (chi-square)."
        ),
    )
    missing_drift: bool = Field(
        default=True,
        description=(
            "Also test whether each feature's missing rate rose above the reference's "
            "(Fisher's exact test, one-sided, at `thresholds.missing_pvalue`)."
        ),
    )
    label_drift: bool = Field(
        default=True,
        description=(
            "With labels: compare the label distribution with the training labels (a "
            "classifier's as its classes, by chi-square; a regression's by KS)."
        ),
    )
    performance_decay: bool = Field(
        default=True,
        description="With labels: compare the model's metric on the batch with its test metric.",
    )
    metric: str | None = Field(
        default=None,
        description="Metric of the performance check (default: `gate.metric`).",
    )
    min_labelled_rows: int = Field(
        default=100,
        gt=0,
        le=1_000_000_000,
        description=(
            "Fewer labelled rows than this: performance is reported as not assessed. Fixed, "
            "not scaled with the batch: a decay starts a retraining, and a metric on fewer "
            "rows varies by about the default limit from batch to batch (a ROC AUC on 100 "
            "rows has a standard error near 0.04)."
        ),
    )
    bins: int = Field(
        default=10,
        ge=2,
        le=1000,
        description=(
            "Quantile bins per numeric feature in the reference profile (fixed when the model "
            "is trained; PSI uses the profile's bins)."
        ),
    )
    sample_size: int = Field(
        default=10_000,
        ge=100,
        le=1_000_000,
        description=(
            "Values per numeric column kept, sorted, in the reference profile; the KS test is "
            "exact against this sample (fixed when the model is trained)."
        ),
    )
    chunk_rows: int = Field(
        default=250_000,
        gt=0,
        le=100_000_000,
        description="Rows of the batch read and compared at a time; bounds memory.",
    )
    schedule: CronSchedule | None = Field(
        default=None,
        description=(
            "Cron schedule of the monitoring deployment (default: none; it runs after each "
            "scored batch)."
        ),
    )
    log_schedule: CronSchedule | None = Field(
        default=LOG_MONITOR_SCHEDULE,
        description=(
            "With `endpoint.log` (a project folder), `stemma serve` also deploys a monitor of "
            "the endpoint's prediction log on this cron schedule (UTC): each run compares the "
            "last `log_days` complete days with the reference, joined with the labels the "
            "endpoint received (or `labels`). Keep it after midnight UTC by more than "
            "`endpoint.log.rotate_s`, so the day's last part is written. Null: no such "
            "deployment."
        ),
    )
    log_days: int = Field(
        default=LOG_MONITOR_DAYS,
        ge=1,
        le=366,
        description=(
            "Complete days (UTC) of the endpoint's prediction log each scheduled run compares "
            "(1: the day before)."
        ),
    )

    @field_validator("statistics")
    @classmethod
    def _distinct(cls, value: MonitorStatisticsSpec) -> MonitorStatisticsSpec:
        for kind in ("numeric", "categorical"):
            names = getattr(value, kind)
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} lists a statistic more than once: {names}")
        return value
