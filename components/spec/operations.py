"""The spec's sections for operating a model: monitor, evaluate (shadow, canary), quantize."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from stemma.components.platform.deployments import LOG_MONITOR_DAYS, LOG_MONITOR_SCHEDULE
from stemma.components.spec.limits import (
    MetricDrop,
    MetricDropLimit,
    MetricMargin,
    PositiveMetricDrop,
    default_drop,
    scaled_minimum,
)
from stemma.components.spec.sections import CronSchedule, ModelReference, Section

#: Default limits on a metric's drop, per section: a percentage of the reference for
#: metrics in the target's units (rmse, mae), an amount in the metric's units for the
#: others. The relative defaults are about the absolute ones' share of a typical ROC AUC
#: (0.005 of 0.85 is 0.6%).
QUANTIZE_DROP = {"percent": 1.0, "absolute": 0.005}
MONITOR_DROP = {"percent": 5.0, "absolute": 0.05}
CANARY_DROP = {"percent": 2.0, "absolute": 0.02}
#: The most labelled rows the default minimums ask for (the fixed minimums of old).
SHADOW_LABELLED_CAP = 2000
CANARY_LABELLED_CAP = 200

#: Quantization methods, in the order `stemma run quantize` reports them.
QUANTIZE_METHODS = (
    "int8_dynamic",
    "int8_weight_only",
    "bf16",
    "fp16",
    "float8_dynamic",
    "ort_int8_dynamic",
    "ort_fp16",
)


def _known_quantize_method(value: str) -> str:
    if value not in QUANTIZE_METHODS:
        close = difflib.get_close_matches(value, QUANTIZE_METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown method {value!r}; {hint}choose from {', '.join(QUANTIZE_METHODS)}"
        )
    return value


QuantizeMethod = Annotated[str, AfterValidator(_known_quantize_method)]


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
        if self.max_metric_drop is not None:
            return self.max_metric_drop
        return default_drop(metric, **MONITOR_DROP)


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


class ShadowSpec(Section):
    """Shadow evaluation: the challenger scores the champion's rows; only the champion serves."""

    min_labelled_rows: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description=(
            "Fewer labelled rows than this: the decision is `wait` (not enough evidence). "
            "Default: 20% of the batch's rows, at least 30 and at most 2000. 30 is about the "
            "fewest rows a bootstrap interval can be trusted on; 20%, because labels that "
            "cover a small share of a batch are seldom a random sample of it; 2000 is enough "
            "for any batch. The interval itself then says whether the rows suffice."
        ),
    )
    margin: MetricMargin = Field(
        default=0.0,
        validate_default=True,
        description=(
            "`promote` needs the lower bound of the metric improvement (challenger over "
            "champion, in the metric's better direction) above this: a number in the "
            "metric's units (`0.01`) or a percentage of the champion's metric (`1%`); "
            "negative tolerates a slightly worse challenger."
        ),
    )
    max_error_rate: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description=(
            "Share of rows the challenger fails on (not scored, NaN/inf, or constant output) "
            "above which it is rejected whatever the labels say."
        ),
    )
    segments: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        max_length=8,
        description="Feature columns to compare per value as well as overall, e.g. `[elevel]`.",
    )
    auto_promote: bool = Field(
        default=False,
        description=(
            "On `promote`, move the champion alias to the challenger (compare-and-set against "
            "the champion that was shadowed); otherwise only record the decision."
        ),
    )

    def labelled_rows_needed(self, rows: int) -> int:
        """``min_labelled_rows``, or its default for a batch of ``rows`` rows."""
        if self.min_labelled_rows is not None:
            return self.min_labelled_rows
        return scaled_minimum(rows, SHADOW_LABELLED_CAP)


class CanaryGuardsSpec(Section):
    """What each canary step checks before the challenger gets more traffic."""

    max_error_rate: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the challenger's rows it fails on (not scored, NaN/inf, constant output) "
            "above which the canary rolls back."
        ),
    )
    max_score_psi: float = Field(
        default=0.25,
        gt=0.0,
        le=100.0,
        description="Population stability index of the challenger's scores against the control's above which the canary rolls back.",
    )
    max_metric_drop: MetricDropLimit | None = Field(
        default=None,
        description=(
            "Roll back when the challenger is worse than the champion on the same labelled rows "
            "by more than this with confidence (upper bound of the improvement below -this): a "
            "number in the metric's units (`0.02`) or a percentage of the champion's metric "
            "(`2%`). Default: 2% for metrics in the target's units (rmse, mae), 0.02 for the "
            "others. A relative limit of a reference of 0 is 0."
        ),
    )
    max_latency_ratio: float | None = Field(
        default=None,
        gt=1.0,
        le=1000.0,
        description="Roll back when the challenger's time per row exceeds the champion's by this factor (null: not checked).",
    )
    min_rows: int = Field(
        default=100,
        ge=1,
        le=1_000_000_000,
        description=(
            "Fewer rows in the challenger's arm than this: hold the step (not enough "
            "evidence). Fixed, not scaled with the batch: on fewer rows one failed row is "
            "over the 1% error rate, and the scores' PSI is noise (a sample of 50 rows drawn "
            "like the control's exceeds a PSI of 0.25 about 3 times in 10; of 100 rows, "
            "less than once in 100), false rollbacks both. With small batches choose larger "
            "steps (a 500-row batch needs a step of at least 0.2)."
        ),
    )
    min_labelled_rows: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description=(
            "Labelled rows of the challenger's arm needed before the metric guard counts. "
            "Default: 20% of the arm's rows, at least 30 and at most 200 (see "
            "`evaluate.shadow.min_labelled_rows`)."
        ),
    )
    require_labels: bool = Field(
        default=True,
        description="The step that would promote the challenger holds until its metric guard could be evaluated.",
    )

    def metric_drop(self, metric: str) -> MetricDrop:
        """``max_metric_drop``, or its default for ``metric``."""
        if self.max_metric_drop is not None:
            return self.max_metric_drop
        return default_drop(metric, **CANARY_DROP)

    def labelled_rows_needed(self, arm_rows: int) -> int:
        """``min_labelled_rows``, or its default for an arm of ``arm_rows`` rows."""
        if self.min_labelled_rows is not None:
            return self.min_labelled_rows
        return scaled_minimum(arm_rows, CANARY_LABELLED_CAP)


class CanarySpec(Section):
    """Canary release: a growing share of entities is served by the challenger, batch by batch."""

    steps: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.05, 0.25, 0.5, 1.0],
        min_length=1,
        max_length=20,
        description=(
            "Share of entities the challenger serves at each step, one step per batch; "
            "increasing and ending at 1.0, where the challenger is promoted if its guards hold."
        ),
    )
    bake_batches: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Batches still watched after the promotion; a breach then rolls the champion back.",
    )
    max_holds: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Batches a step may hold for lack of evidence before the canary is ended.",
    )
    guards: CanaryGuardsSpec = Field(
        default_factory=CanaryGuardsSpec, description="The checks of every step."
    )


class EvaluateSpec(Section):
    """Evaluation of a challenger on production batches: shadow, then canary."""

    labels: str | None = Field(
        default=None,
        description=(
            "Labels of production batches (a Parquet/CSV file or folder with the id and target "
            "columns), relative to the project root; rows are joined by `data.id`."
        ),
    )
    confidence: float = Field(
        default=0.95,
        ge=0.5,
        lt=1.0,
        description="Level of the paired-bootstrap interval of the metric difference.",
    )
    bootstrap_resamples: int = Field(
        default=1000,
        ge=100,
        le=100_000,
        description="Bootstrap resamples behind each interval.",
    )
    seed: int = Field(
        default=0, ge=0, le=2**32 - 1, description="Seed of the bootstrap resampling."
    )
    shadow: ShadowSpec = Field(default_factory=ShadowSpec, description="Shadow evaluation.")
    canary: CanarySpec = Field(default_factory=CanarySpec, description="Canary release.")


class QuantizeSpec(Section):
    """Post-training quantization: variants of a registered fp32 model, measured and gated."""

    enabled: bool = Field(
        default=False,
        description="Quantize at the end of `stemma run train`, when the new model passed its gate.",
    )
    methods: list[QuantizeMethod] = Field(
        default_factory=lambda: ["int8_dynamic", "int8_weight_only", "bf16"],
        min_length=1,
        max_length=len(QUANTIZE_METHODS),
        description=(
            "Variants to build: `int8_dynamic` and `int8_weight_only` (torchao, on the eager "
            "backend), `bf16`, `fp16`, `ort_int8_dynamic` and `ort_fp16` (ONNX Runtime, on "
            "the model's exported graph); `float8_dynamic` is GPU-only and skipped on a CPU."
        ),
    )
    max_metric_drop: MetricDropLimit | None = Field(
        default=None,
        description=(
            "Largest loss of the gate metric on the held-out rows a variant may show: a "
            "number in the metric's units (`0.005`) or a percentage of the fp32 model's "
            "metric (`1%`). Default: 1% for metrics in the target's units (rmse, mae), 0.005 "
            "for the others. A relative limit of a reference of 0 is 0."
        ),
    )
    min_speedup: float = Field(
        default=1.2,
        gt=0.0,
        le=1000.0,
        description=(
            "Smallest speed-up over the fastest fp32 backend (eager or ONNX Runtime) a "
            "variant must show."
        ),
    )
    batch_rows: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description=(
            "Rows per timed run through the runtime (default: the scoring pipeline's "
            "forward batch, 8,192 rows, or score.chunk_rows when smaller)."
        ),
    )
    repeats: int = Field(
        default=20, ge=3, le=10_000, description="Timed runs per model; the median counts."
    )
    warmup: int = Field(
        default=3, ge=1, le=1000, description="Untimed runs per model before timing."
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Threads of torch and ONNX Runtime while timing, set once for the quantize run "
            "(the scoring pipeline runs each batch on one)."
        ),
    )
    model: ModelReference | None = Field(
        default=None,
        description=(
            "fp32 model to quantize, `models:/<name>@<alias>` or `models:/<name>/<version>` "
            "(default: the newest version that passed its gate)."
        ),
    )
    serve: bool = Field(
        default=False,
        description=(
            "Batch scoring serves the model's quantized variant `v<version>-quantized` when "
            "one passed its gate, else the fp32 model (and says why)."
        ),
    )

    def metric_drop(self, metric: str) -> MetricDrop:
        """``max_metric_drop``, or its default for ``metric``."""
        if self.max_metric_drop is not None:
            return self.max_metric_drop
        return default_drop(metric, **QUANTIZE_DROP)


#: Environment variable names a bearer token may be read from.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


#: Where the endpoint's log may go: a local folder, or an S3 bucket and prefix.
S3_LOG_PATH = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"


class EndpointLogSpec(Section):
    """The endpoint's log: scored rows, shadow scores and labels, as Parquet parts by day."""

    path: str = Field(
        default="outputs/endpoint-log",
        min_length=1,
        max_length=1024,
        description=(
            "Folder of the log, relative to the project root, or `s3://<bucket>/<prefix>` "
            "(credentials and endpoint from the usual AWS variables, `AWS_ENDPOINT_URL` "
            "included). It holds `predictions/`, `shadow/` and `labels/`, each a folder per "
            "UTC day of Parquet parts; a day of `predictions/` is a batch `stemma run "
            "monitor --batch` reads."
        ),
    )
    sample: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description=(
            "Share of prediction requests logged, chosen by request id (a request's rows "
            "and its shadow scores are logged together or not at all). Labels are all kept."
        ),
    )
    rotate_rows: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Rows of a part: a part is written once this many rows are buffered.",
    )
    rotate_s: float = Field(
        default=60.0,
        ge=0.05,
        le=86_400.0,
        description=(
            "Seconds a row waits at most before its part is written (and at shutdown): "
            "what a crash of the endpoint can lose."
        ),
    )
    max_buffered_rows: int = Field(
        default=100_000,
        ge=1,
        le=100_000_000,
        description=(
            "Rows held in memory per kind at most, waiting to be written; past it rows are "
            "dropped and counted (`stemma_endpoint_log_dropped_rows_total`), so the log "
            "never slows a request, and labels are answered 503."
        ),
    )

    @field_validator("path")
    @classmethod
    def _local_or_s3(cls, value: str) -> str:
        if "://" in value and not re.match(S3_LOG_PATH, value):
            raise ValueError(
                f"{value!r} is neither a local folder nor s3://<bucket>/<prefix> "
                "(the endpoint's log goes to a folder or to S3)"
            )
        return value

    @field_validator("max_buffered_rows")
    @classmethod
    def _holds_a_part(cls, value: int, info: ValidationInfo) -> int:
        rows = info.data.get("rotate_rows")
        if rows is not None and value < rows:
            raise ValueError(f"must be at least rotate_rows ({rows}), or no part would fill")
        return value


class EndpointShadowSpec(Section):
    """Live shadow: a version scores a sample of the endpoint's requests without answering."""

    alias: str = Field(
        default="challenger",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description=(
            "Alias of the version that shadows the served one; while it names no version, "
            "or the served one, nothing is shadowed."
        ),
    )
    sample: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Share of requests the shadow also scores.",
    )
    max_queue_rows: int = Field(
        default=1024,
        ge=1,
        le=10_000_000,
        description=(
            "Rows waiting for the shadow at most: shadow work runs only while no request "
            "waits for the model, and work beyond this is dropped and counted, so that "
            "shadowing never delays an answer."
        ),
    )


class EndpointSpec(Section):
    """The online endpoint (`stemma endpoint`): what it serves, where, and its limits."""

    alias: str = Field(
        default="champion",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description=(
            "Alias of the pipeline's registered model to serve; when it moves, the endpoint "
            "loads the new version and swaps to it."
        ),
    )
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=255,
        description=(
            "Address to listen on: loopback unless told otherwise (`0.0.0.0` exposes the "
            "endpoint to the network; set `token_env` then)."
        ),
    )
    port: int = Field(
        default=8080, ge=0, le=65535, description="TCP port (0: any free port, printed)."
    )
    max_batch_size: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Most rows coalesced into one model call.",
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=1000.0,
        description=(
            "Longest a request waits for others to share its model call, counted from its "
            "arrival; rows that queued while the model was busy go at once when it is free."
        ),
    )
    max_queue_rows: int = Field(
        default=4096,
        ge=1,
        le=10_000_000,
        description=(
            "Rows waiting for the model at most; a request beyond it is answered 503 with "
            "Retry-After at once."
        ),
    )
    max_rows_per_request: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Rows one request may hold (more: 413). At most max_queue_rows.",
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        le=256 << 20,
        description="Largest request body in bytes (more: 413).",
    )
    poll_s: float = Field(
        default=5.0,
        ge=0.05,
        le=3600.0,
        description="Seconds between checks of where the alias points.",
    )
    token_env: str | None = Field(
        default=None,
        pattern=ENV_NAME_PATTERN,
        description=(
            "Name of an environment variable holding a bearer token: when set, predictions "
            "and metrics need `Authorization: Bearer <token>`. The token itself never "
            "appears in a spec."
        ),
    )
    canary: bool = Field(
        default=True,
        description=(
            "While `stemma run canary` runs a step, route its share of entities to the "
            "challenger: by a stable hash of the row's `data.id` (or the request's "
            "`X-Stemma-Entity-Id` header), the same on every replica and after restarts. "
            "Rows without an id are served by the champion."
        ),
    )
    shadow: EndpointShadowSpec | None = Field(
        default=None,
        description=(
            "Score a sample of requests with another version too (the `challenger` alias "
            "by default), after the answer is sent, when the endpoint is otherwise idle; "
            "its scores go to the log (none when absent; `shadow: {}` takes the defaults)."
        ),
    )
    log: EndpointLogSpec | None = Field(
        default=None,
        description=(
            "Log every scored row (features, answer, version, latency), the shadow's "
            "scores and the labels `POST /v1/labels` receives, as Parquet parts (none "
            "when absent; `log: {}` takes the defaults)."
        ),
    )

    @field_validator("max_rows_per_request")
    @classmethod
    def _fits_the_queue(cls, value: int, info: ValidationInfo) -> int:
        queue = info.data.get("max_queue_rows")
        if queue is not None and value > queue:
            raise ValueError(
                f"must be at most max_queue_rows ({queue}), or no request that big could queue"
            )
        return value
