"""The spec's sections for operating a model: evaluate (shadow, canary), quantize, endpoint
(the monitor section is :mod:`.monitor`)."""

from __future__ import annotations

import difflib
import re
from typing import Annotated

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from stemma.components.spec.limits import (
    MetricDrop,
    MetricDropLimit,
    MetricMargin,
    default_drop,
    scaled_minimum,
)
from stemma.components.spec.sections import ModelReference, Section

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
        return self.min_labelled_rows or scaled_minimum(rows, SHADOW_LABELLED_CAP)


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
        return self.max_metric_drop or default_drop(metric, **CANARY_DROP)

    def labelled_rows_needed(self, arm_rows: int) -> int:
        """``min_labelled_rows``, or its default for an arm of ``arm_rows`` rows."""
        return self.min_labelled_rows or scaled_minimum(arm_rows, CANARY_LABELLED_CAP)


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
        return self.max_metric_drop or default_drop(metric, **QUANTIZE_DROP)


#: An alias of the pipeline's registered model, as the endpoint names one.
Alias = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]

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

    alias: Alias = Field(
        default="challenger",
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

    alias: Alias = Field(
        default="champion",
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
