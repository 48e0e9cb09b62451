"""The pipeline spec: one YAML file per pipeline, validated as a whole before anything runs.

Every section is a pydantic model with ``extra="forbid"``, typed and bounded fields and a
description (shown in ``stemma schema``, editors and the Prefect UI). :func:`load_spec`
collects *every* problem (schema errors, paths, duplicate columns, unknown expectations,
model classes that do not import) into one :class:`~.errors.SpecError` whose lines read
``credit.yaml:14 train.epochs: must be greater than 0``.

Hostile files are refused before they cost anything. The YAML is read with a loader that
knows only plain YAML (mappings, lists, strings, numbers, booleans, null: a ``!!python/...``
tag is refused, never run) and that stops at :data:`MAX_SPEC_BYTES` bytes of file,
:data:`MAX_SPEC_DEPTH` levels of nesting and :data:`MAX_SPEC_NODES` values counted with
every alias expanded (a "billion laughs" file stops after a few thousand), so each is
refused in milliseconds with one line naming the file and line. ``--set`` values go through
the same loader.

Every path of the spec (:data:`PATH_FIELDS`, and any path a run is given besides, through
:meth:`LoadedSpec.resolve`) must resolve, with ``..`` and symlinks followed, inside the
project root or inside one of the folders ``pipeline.allowed_roots`` names.

This module imports no heavy library (torch, mlflow, great_expectations, prefect), so that
``stemma validate`` stays fast.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from stemma.components.errors import SpecError

#: Metrics a gate can use, per task, and whether a higher value is better.
METRIC_DIRECTIONS: dict[str, dict[str, bool]] = {
    "binary": {
        "roc_auc": True,
        "pr_auc": True,
        "accuracy": True,
        "f1": True,
        "precision": True,
        "recall": True,
        "log_loss": False,
        "brier": False,
    },
    "regression": {"rmse": False, "mae": False, "r2": True},
}

#: Architectures Stemma ships, by registered name.
BUILTIN_ARCHITECTURES = ("mlp",)

#: Largest spec file (and ``--set`` value) read, in bytes; a real spec is a few KiB.
MAX_SPEC_BYTES = 1024 * 1024
#: Deepest nesting of mappings and lists in a spec; real specs nest five levels at most.
MAX_SPEC_DEPTH = 32
#: Most values (scalars, mappings, lists) a spec may hold with its aliases expanded: an
#: alias may repeat a value, not multiply the spec a billion times.
MAX_SPEC_NODES = 20_000

#: Every field of the spec that names a file or folder, as YAML paths.
PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("data", "path"),
    ("score", "input"),
    ("score", "output"),
    ("monitor", "input"),
    ("monitor", "labels"),
    ("evaluate", "labels"),
    ("retrain", "batches"),
    ("retrain", "labels"),
)

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=_NAME.pattern),
]


class PipelineSpec(_Section):
    """Names the pipeline and where it is tracked."""

    name: Name = Field(description="Pipeline name; used in run names and lineage records.")
    experiment: Name | None = Field(
        default=None, description="MLflow experiment that holds the runs (default: the name)."
    )
    model_name: Name | None = Field(
        default=None,
        description="Registered model name in the MLflow model registry (default: the name).",
    )
    allowed_roots: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "Folders outside the project that the spec's paths (and the paths a run is given) "
            "may point into, e.g. `[/mnt/data]`; absolute, or relative to the project root. "
            "Every other path must resolve inside the project root, `..` and symlinks followed."
        ),
    )

    @field_validator("allowed_roots")
    @classmethod
    def _not_the_filesystem_root(cls, value: list[str]) -> list[str]:
        for folder in value:
            if (
                Path(folder).is_absolute()
                and Path(folder).resolve() == Path(folder).resolve().parent
            ):
                raise ValueError(f"{folder!r} is the filesystem root; name the folder to allow")
        return value

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.model_name or self.name


class FeaturesSpec(_Section):
    """The input columns of the model, by kind."""

    numeric: list[str] = Field(
        default_factory=list,
        description="Numeric feature columns; standardised on the training split.",
    )
    categorical: list[str] = Field(
        default_factory=list,
        description="Categorical feature columns; one-hot encoded with the training split's vocabulary.",
    )

    @property
    def all(self) -> list[str]:
        return [*self.numeric, *self.categorical]


class SplitSpec(_Section):
    """How the table is split into training, validation and test rows."""

    method: Literal["random", "time"] = Field(
        default="random",
        description="`random`: a seeded shuffle; `time`: the latest rows by `time_column` are the test set.",
    )
    test_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Fraction of rows held out for the test split."
    )
    validation_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Fraction of the remaining rows used for early stopping.",
    )
    seed: int = Field(default=7, ge=0, le=2**32 - 1, description="Seed of the random split.")
    time_column: str | None = Field(
        default=None, description="Column that orders rows in time; required when method is `time`."
    )


class DataSpec(_Section):
    """The training table and its columns."""

    path: str = Field(
        description="Data file (Parquet or CSV), relative to the project root; tracked by DVC."
    )
    format: Literal["auto", "parquet", "csv"] = Field(
        default="auto", description="File format; `auto` picks it from the file extension."
    )
    task: Literal["binary", "regression"] = Field(
        default="binary", description="Prediction task: binary classification or regression."
    )
    target: str = Field(min_length=1, description="Label column.")
    id: str | None = Field(default=None, description="Entity id column; never used as a feature.")
    features: FeaturesSpec = Field(description="Feature columns by kind.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/validation/test split.")


Expectation = dict[str, dict[str, Any]]


class ModelSpec(_Section):
    """The network: a built-in architecture or any `nn.Module` by import path."""

    architecture: str = Field(
        default="mlp",
        description=(
            "`mlp`, or `package.module:Class` for your own `torch.nn.Module`; it is built as "
            "`Class(n_inputs=..., n_outputs=..., **params)`."
        ),
    )
    hidden: list[Annotated[int, Field(gt=0, le=65536)]] = Field(
        default_factory=lambda: [64, 32],
        max_length=16,
        description="Hidden layer widths of the `mlp` architecture.",
    )
    dropout: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Dropout after each hidden layer."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for a custom architecture's constructor.",
    )

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in BUILTIN_ARCHITECTURES and not _IMPORT_PATH.match(value):
            raise ValueError(
                f"must be one of {', '.join(BUILTIN_ARCHITECTURES)} or an import path "
                f"`package.module:Class`, got {value!r}"
            )
        return value


class EarlyStoppingSpec(_Section):
    """Stop when the validation loss stops improving, and keep the best epoch's weights."""

    patience: int = Field(
        default=3, ge=1, le=1000, description="Epochs without improvement before training stops."
    )
    min_delta: float = Field(
        default=0.0, ge=0.0, description="Smallest decrease of the validation loss that counts."
    )


class DistributedSpec(_Section):
    """Distributed data-parallel training: torchrun starts one training process per device."""

    nproc_per_node: int = Field(
        default=2,
        ge=1,
        le=64,
        description=(
            "Training processes on this machine (torchrun's `--nproc_per_node`): on CUDA one "
            "per GPU; on the CPU they share the cores. Each takes 1/N of every batch, so "
            "`batch_size` stays the batch of one optimisation step."
        ),
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto",
        description="Collective backend; `auto`: nccl when training on CUDA, gloo on the CPU.",
    )


class TrainSpec(_Section):
    """The training loop."""

    epochs: int = Field(default=20, gt=0, le=10_000, description="Maximum number of epochs.")
    batch_size: int = Field(
        default=512, gt=0, le=1_048_576, description="Rows per optimisation step."
    )
    learning_rate: float = Field(
        default=1e-3, gt=0.0, le=10.0, description="Optimiser learning rate."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="L2 weight decay.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(default="adam", description="Optimiser.")
    seed: int = Field(
        default=7, ge=0, le=2**32 - 1, description="Seed of weights, shuffling and dropout."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto` trains on CUDA when available, else on the CPU."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="`auto`: bf16 autocast on CUDA, fp32 on the CPU."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default_factory=EarlyStoppingSpec,
        description="Early stopping on the validation loss; `null` trains every epoch.",
    )
    distributed: DistributedSpec | None = Field(
        default=None,
        description="Distributed data-parallel training with torchrun; `null`: one process.",
    )


class GateSpec(_Section):
    """The bar a new model must clear before it gets an alias."""

    metric: str = Field(
        default="roc_auc", description="Primary test-split metric the gate compares."
    )
    minimum: float | None = Field(
        default=None, description="Lowest acceptable value (for metrics where higher is better)."
    )
    maximum: float | None = Field(
        default=None, description="Highest acceptable value (for losses and errors)."
    )
    margin_over_champion: float = Field(
        default=0.0,
        ge=-1.0,
        le=1.0,
        description="How much better than the current champion, on the same test rows, the model must be.",
    )
    untrusted_champion: Literal["fail", "ignore"] = Field(
        default="fail",
        description=(
            "When the champion's files do not match the digests recorded at registration (or it "
            "has none, or names a foreign architecture): `fail` fails the gate closed; `ignore` "
            "gates as if there were no champion."
        ),
    )


_CRON = re.compile(r"^(@(yearly|annually|monthly|weekly|daily|hourly)|(\S+\s+){4}\S+)$")
_MODEL_REFERENCE = re.compile(r"^models:/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_-]+|/[0-9]+)$")


_SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|ucx)://[^\s/]+$")


class DaskSpec(_Section):
    """The Dask cluster batch scoring fans out to when `score.runner` is `dask`."""

    address: str | None = Field(
        default=None,
        description=(
            "Scheduler of a running Dask cluster, e.g. `tcp://10.0.0.5:8786` (its workers must "
            "reach the input, the output folder and the MLflow registry); `null` starts a "
            "local cluster on 127.0.0.1 for the run and closes it afterwards."
        ),
    )
    workers: int = Field(
        default=2, ge=1, le=256, description="Worker processes of the local cluster."
    )
    threads_per_worker: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Threads per worker of the local cluster. Each thread scores one range of chunks "
            "at a time with one torch thread, so `workers` x `threads_per_worker` bounds the "
            "cores the model uses."
        ),
    )
    chunks_per_task: int = Field(
        default=8,
        ge=1,
        le=1_000_000,
        description=(
            "Chunks per Prefect task: a Parquet file is split into tasks of this many chunks, "
            "a CSV file is one task."
        ),
    )

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not _SCHEDULER_ADDRESS.match(value):
            raise ValueError(
                f"must be a Dask scheduler address like `tcp://host:8786`, got {value!r}"
            )
        return value


class ScoreSpec(_Section):
    """Batch scoring with a registered model (nightly by default)."""

    input: str = Field(
        default="data/batches",
        description="Parquet or CSV file, or a folder of them, relative to the project root.",
    )
    output: str = Field(
        default="outputs/scores",
        description="Folder of the Parquet parts, the rejects and the `_SUCCESS` manifest.",
    )
    model: str | None = Field(
        default=None,
        description=(
            "Model to score with, `models:/<name>@<alias>` or `models:/<name>/<version>` "
            "(default: the pipeline's model @champion)."
        ),
    )
    chunk_rows: int = Field(
        default=200_000,
        gt=0,
        le=10_000_000,
        description="Rows read, scored and written at a time; bounds memory, one part per chunk.",
    )
    invalid_rows: Literal["reject", "error"] = Field(
        default="reject",
        description=(
            "Rows with a missing or non-finite value the model needs: `reject` writes them to "
            "the rejects with a reason; `error` stops the run."
        ),
    )
    unknown_categories: Literal["reject", "error", "score"] = Field(
        default="reject",
        description=(
            "A categorical value the model never saw: `reject` or `error` as above, `score` "
            "encodes it as unknown (all-zero one-hot) and scores the row."
        ),
    )
    extra_columns: Literal["ignore", "error"] = Field(
        default="ignore",
        description="Input columns the model does not use: listed and ignored, or an error.",
    )
    threads: int | None = Field(
        default=None,
        gt=0,
        le=256,
        description=(
            "CPU threads for the model (default: one per core but one, which leaves a core to "
            "reading, hashing and writing)."
        ),
    )
    runner: Literal["local", "dask"] = Field(
        default="local",
        description=(
            "`local`: one process scores every chunk; `dask`: one Prefect task per range of "
            "chunks on a Dask cluster (`score.dask`). Both write the same bytes."
        ),
    )
    dask: DaskSpec = Field(
        default_factory=DaskSpec, description="The Dask cluster of `runner: dask`."
    )
    schedule: str = Field(
        default="0 2 * * *", description="Cron schedule of the nightly scoring deployment."
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not _CRON.match(value.strip()):
            raise ValueError(f"must be a cron expression with five fields, got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not _MODEL_REFERENCE.match(value):
            raise ValueError(
                f"must look like `models:/<name>@<alias>` or `models:/<name>/<version>`, got {value!r}"
            )
        return value


class RetrainSpec(_Section):
    """Continuous training: when to retrain and on which production data."""

    schedule: str | None = Field(
        default="0 3 * * *",
        description="Cron schedule of the retraining deployment (null: only on drift or by hand).",
    )
    on_drift: bool = Field(
        default=True,
        description="Retrain when the drift monitor emits `stemma.drift.detected` for this pipeline.",
    )
    batches: str | None = Field(
        default=None,
        description="Folder of scored production batches (default: the spec's `score.input`).",
    )
    labels: str = Field(
        default="data/labels",
        description="Folder of label files for production batches, joined to them by the id column.",
    )
    min_new_rows: int = Field(
        default=1000,
        gt=0,
        le=1_000_000_000,
        description="Fewer newly labelled rows than this: the run exits early and says so.",
    )
    promote: Literal["shadow", "never"] = Field(
        default="shadow",
        description=(
            "`shadow`: promote the new model only when its shadow evaluation decides `promote`; "
            "`never`: stop after registration and shadow, for a person to decide."
        ),
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not _CRON.match(value.strip()):
            raise ValueError(f"must be a cron expression with five fields, got {value!r}")
        return value


NumericStatistic = Literal["psi", "ks"]
CategoricalStatistic = Literal["psi", "chi2", "jensen_shannon"]


class MonitorStatisticsSpec(_Section):
    """Which statistics compare a batch with the reference, per kind of column."""

    numeric: list[NumericStatistic] = Field(
        default_factory=lambda: list[NumericStatistic](["psi", "ks"]),
        min_length=1,
        max_length=2,
        description=(
            "`psi`: population stability index on the reference's quantile bins; `ks`: "
            "two-sample Kolmogorov-Smirnov test against the reference's stored sample."
        ),
    )
    categorical: list[CategoricalStatistic] = Field(
        default_factory=lambda: list[CategoricalStatistic](["psi", "chi2"]),
        min_length=1,
        max_length=3,
        description=(
            "`psi` on the category frequencies, `chi2`: chi-square test of homogeneity, "
            "`jensen_shannon`: Jensen-Shannon distance (base 2, 0 to 1)."
        ),
    )


class MonitorThresholdsSpec(_Section):
    """When a statistic counts as drift: a column drifts when any of its statistics does."""

    psi: float = Field(
        default=0.2,
        gt=0.0,
        le=10.0,
        description="Drift when the PSI is at least this (0.1: moderate shift, 0.2: significant).",
    )
    ks_pvalue: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description="Drift when the Kolmogorov-Smirnov p-value is below this.",
    )
    chi2_pvalue: float = Field(
        default=0.01,
        gt=0.0,
        lt=1.0,
        description="Drift when the chi-square p-value is below this.",
    )
    jensen_shannon: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Drift when the Jensen-Shannon distance is at least this.",
    )
    max_metric_drop: float = Field(
        default=0.05,
        gt=0.0,
        le=1_000_000.0,
        description=(
            "Performance decay when the labelled batch's metric is worse than the reference "
            "(test split) by at least this, in the metric's units."
        ),
    )


class MonitorSpec(_Section):
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
    model: str | None = Field(
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
        default=1,
        ge=1,
        le=1_000_000_000,
        description=(
            "Batches with fewer rows are not compared: the report says drift was not "
            "assessed and no drift event is sent. A batch with no rows is never drift."
        ),
    )
    pvalue_correction: Literal["bonferroni", "none"] = Field(
        default="bonferroni",
        description=(
            "`bonferroni`: each test's p-value is compared with its threshold divided by the "
            "number of tests in the batch, so a batch like the reference raises a false alarm "
            "at most at the threshold's rate; `none`: at that rate per test."
        ),
    )
    prediction_drift: bool = Field(
        default=True,
        description="Also compare the model's scores on the batch with its reference scores.",
    )
    label_drift: bool = Field(
        default=True,
        description="With labels: compare the label distribution with the training labels.",
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
        description="Fewer labelled rows than this: performance is reported as not assessed.",
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
    schedule: str | None = Field(
        default=None,
        description=(
            "Cron schedule of the monitoring deployment (default: none; it runs after each "
            "scored batch)."
        ),
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not _CRON.match(value.strip()):
            raise ValueError(f"must be a cron expression with five fields, got {value!r}")
        return value

    @field_validator("model")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not _MODEL_REFERENCE.match(value):
            raise ValueError(
                f"must look like `models:/<name>@<alias>` or `models:/<name>/<version>`, got {value!r}"
            )
        return value

    @field_validator("statistics")
    @classmethod
    def _distinct(cls, value: MonitorStatisticsSpec) -> MonitorStatisticsSpec:
        for kind in ("numeric", "categorical"):
            names = getattr(value, kind)
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} lists a statistic more than once: {names}")
        return value


class ShadowSpec(_Section):
    """Shadow evaluation: the challenger scores the champion's rows; only the champion serves."""

    min_labelled_rows: int = Field(
        default=2000,
        ge=1,
        le=1_000_000_000,
        description="Fewer labelled rows than this: the decision is `wait` (not enough evidence).",
    )
    margin: float = Field(
        default=0.0,
        ge=-1.0,
        le=1.0,
        description=(
            "`promote` needs the lower bound of the metric improvement (challenger over "
            "champion, in the metric's better direction) above this."
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


class CanaryGuardsSpec(_Section):
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
    max_metric_drop: float = Field(
        default=0.02,
        ge=0.0,
        le=1_000_000.0,
        description=(
            "Roll back when the challenger is worse than the champion on the same labelled rows "
            "by more than this with confidence (upper bound of the improvement below -this)."
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
        description="Fewer rows in the challenger's arm than this: hold the step (not enough evidence).",
    )
    min_labelled_rows: int = Field(
        default=200,
        ge=1,
        le=1_000_000_000,
        description="Labelled rows of the challenger's arm needed before the metric guard counts.",
    )
    require_labels: bool = Field(
        default=True,
        description="The step that would promote the challenger holds until its metric guard could be evaluated.",
    )


class CanarySpec(_Section):
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


class EvaluateSpec(_Section):
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


#: Quantization methods, in the order `stemma run quantize` reports them.
QUANTIZE_METHODS = ("int8_dynamic", "int8_weight_only", "bf16", "fp16", "float8_dynamic")


def _known_quantize_method(value: str) -> str:
    if value not in QUANTIZE_METHODS:
        close = difflib.get_close_matches(value, QUANTIZE_METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown method {value!r}; {hint}choose from {', '.join(QUANTIZE_METHODS)}"
        )
    return value


QuantizeMethod = Annotated[str, AfterValidator(_known_quantize_method)]


class QuantizeSpec(_Section):
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
            "Variants to build: `int8_dynamic` and `int8_weight_only` (torchao), `bf16`, "
            "`fp16`; `float8_dynamic` is GPU-only and skipped on a CPU."
        ),
    )
    max_metric_drop: float = Field(
        default=0.005,
        ge=0.0,
        le=1.0,
        description="Largest loss of the gate metric on the held-out rows a variant may show.",
    )
    min_speedup: float = Field(
        default=1.2,
        gt=0.0,
        le=1000.0,
        description="Smallest speed-up over the fastest fp32 runtime a variant must show.",
    )
    batch_rows: int | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description=(
            "Rows per timed forward pass (default: the scoring engine's forward batch, "
            "8,192 rows, or score.chunk_rows when smaller)."
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
        description="torch threads while timing (the scoring engine runs each batch on one).",
    )
    compile: bool = Field(
        default=True,
        description="Also time every model compiled with torch.compile; the faster runtime counts.",
    )
    model: str | None = Field(
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

    @field_validator("model")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and not _MODEL_REFERENCE.match(value):
            raise ValueError(
                f"must look like `models:/<name>@<alias>` or `models:/<name>/<version>`, got {value!r}"
            )
        return value


class Spec(_Section):
    """A Stemma pipeline: the data, its checks, the model, its training, gate and scoring."""

    pipeline: PipelineSpec = Field(description="Names of the pipeline, experiment and model.")
    data: DataSpec = Field(description="The training table.")
    checks: list[Expectation] = Field(
        default_factory=list,
        description=(
            "Great Expectations expectations, each a one-key mapping "
            "`expect_...: {kwargs}`; all must pass before training."
        ),
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="How the network is trained.")
    gate: GateSpec = Field(default_factory=GateSpec, description="The registration gate.")
    score: ScoreSpec = Field(
        default_factory=ScoreSpec, description="Nightly batch scoring with the champion."
    )
    retrain: RetrainSpec | None = Field(
        default=None,
        description="Continuous training on new labelled production data (scheduled and on drift).",
    )
    monitor: MonitorSpec | None = Field(
        default=None,
        description="Drift monitoring of production batches (defaults apply when absent).",
    )
    evaluate: EvaluateSpec | None = Field(
        default=None,
        description="Shadow and canary evaluation of a challenger (defaults apply when absent).",
    )
    quantize: QuantizeSpec | None = Field(
        default=None,
        description="Post-training quantization of registered models (defaults apply when absent).",
    )


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from."""

    spec: Spec
    path: Path
    root: Path
    raw: dict[str, Any]
    overrides: tuple[str, ...] = ()

    def resolve(self, relative: str | Path) -> Path:
        """A path of the spec (or one a run was given), resolved against the project root.

        Raises:
            SpecError: the path resolves outside the project root and outside every
                folder of ``pipeline.allowed_roots``.
        """
        problem = path_problem(relative, self.root, self.spec.pipeline.allowed_roots)
        if problem:
            raise SpecError(f"{self.path.name}: {problem}")
        path = Path(relative)
        return path if path.is_absolute() else self.root / path


def path_problem(
    value: str | Path, root: Path, allowed_roots: Sequence[str | Path] = ()
) -> str | None:
    """Why ``value`` may not be used as a path of a project at ``root``, or None.

    The path is resolved against the root with ``..`` and symlinks followed, so neither a
    relative climb nor a link inside the project reaches a folder it may not.
    """
    project = root.resolve()
    resolved = (project / value).resolve()
    folders = [project, *((project / folder).resolve() for folder in allowed_roots)]
    if any(resolved.is_relative_to(folder) for folder in folders):
        return None
    return (
        f"{value} resolves outside the project ({resolved}); to allow it, add its folder "
        "to pipeline.allowed_roots"
    )


# ---------------------------------------------------------------------------------------
# Reading YAML within limits


class SpecLimitError(yaml.MarkedYAMLError):
    """The YAML is refused: too deep, too many values with aliases expanded, or a tag that
    would build something other than plain data."""


_YAML_TAG_PREFIX = "tag:yaml.org,2002:"


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with the spec's nesting and expanded-size limits enforced while
    the document is composed (before any value is built), so a hostile file costs no more
    than its limits."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        # Values under each composed node, aliases expanded, by node identity.
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        # PyYAML's C and pure-Python marks differ only in the stubs.
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._aliases += 1
            if id(node) not in self._sizes:
                raise SpecLimitError(
                    problem=f"alias *{event.anchor} refers to a value that contains it",
                    problem_mark=mark,
                )
            return node
        if self._depth >= MAX_SPEC_DEPTH:
            raise SpecLimitError(
                problem=f"nesting deeper than {MAX_SPEC_DEPTH} levels",
                problem_mark=mark,
            )
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return node
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(item)] for item in node.value)
        else:
            size = 1
        if size > MAX_SPEC_NODES:
            how = " once aliases are expanded" if self._aliases else ""
            raise SpecLimitError(
                problem=f"more than {MAX_SPEC_NODES:,} values{how}",
                problem_mark=node.start_mark,
            )
        self._sizes[id(node)] = size
        return node


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    tag = str(node.tag)
    shown = "!!" + tag.removeprefix(_YAML_TAG_PREFIX) if tag.startswith(_YAML_TAG_PREFIX) else tag
    raise SpecLimitError(
        problem=(
            f"tag {shown} is not allowed: a spec holds plain YAML (mappings, lists, strings, "
            "numbers, booleans, null)"
        ),
        problem_mark=node.start_mark,
    )


_BoundedLoader.add_constructor(None, _refuse_tag)


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse spec YAML within the spec's limits; return the value and its composed node.

    Raises:
        SpecLimitError: over :data:`MAX_SPEC_BYTES`, :data:`MAX_SPEC_DEPTH` or
            :data:`MAX_SPEC_NODES`, a recursive alias, or a tag that is not plain YAML.
        yaml.YAMLError: the text is not valid YAML.
    """
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        raise SpecLimitError(problem=f"larger than {_kib(MAX_SPEC_BYTES)}, the most a spec may be")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        value = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return value, node


def _kib(size: int) -> str:
    return f"{size // 1024:,} KiB"


# ---------------------------------------------------------------------------------------
# Locating YAML paths


class _Locator:
    """Maps a YAML path (``("train", "epochs")``) to its line in the file."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def line(self, loc: Sequence[str | int]) -> int | None:
        node = self._root
        best: int | None = node.start_mark.line + 1 if node is not None else None
        for key in loc:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == str(key):
                        best = key_node.start_mark.line + 1
                        node = value_node
                        break
                else:
                    return best
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
                if key >= len(node.value):
                    return best
                node = node.value[key]
                best = node.start_mark.line + 1
            else:
                return best
        return best


@dataclass(frozen=True)
class Problem:
    """One problem with a spec: where it is and what is wrong."""

    loc: tuple[str | int, ...]
    message: str
    line: int | None = None
    source: str | None = None

    def render(self, file_name: str) -> str:
        where = f"{file_name}:{self.line}" if self.line else file_name
        dotted = _dotted(self.loc) or "(top level)"
        origin = f" (from {self.source})" if self.source else ""
        return f"{where} {dotted}: {self.message}{origin}"


def _dotted(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _keys_at(loc: Sequence[str | int]) -> list[str]:
    """The keys the spec allows in the section at ``loc`` (empty when it is not a section)."""
    model: Any = Spec
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        # Optional sections (`X | None`) are models too: take the model out of the union.
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _pydantic_message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    message = str(error["msg"])
    if kind == "extra_forbidden":
        loc = tuple(error["loc"])
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(loc[:-1]), n=1)
        hint = f"did you mean `{close[0]}`?" if close else "check the spelling"
        return f"unknown key (not part of the spec; {hint})"
    if kind == "missing":
        return "required but missing"
    # pydantic prefixes validator messages with "Value error, "
    message = message.removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    # "Input should be greater than 0" reads better in a spec as "must be greater than 0".
    message = re.sub(r"^input should (be|have)\b", r"must \1", message)
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        message = f"{message}, got {error.get('input')!r}"
    return message


# ---------------------------------------------------------------------------------------
# Overrides


def apply_overrides(
    raw: Mapping[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Problem], dict[tuple[str, ...], str]]:
    """Apply ``key.path=value`` overrides to a raw spec mapping, without mutating it.

    Values are parsed as YAML (``3`` is an int, ``[1, 2]`` a list, ``null`` None).

    Returns:
        The new mapping, problems with malformed overrides, and for each overridden
        path the override text (so errors can name it).
    """
    result: dict[str, Any] = _deep_copy(raw)
    problems: list[Problem] = []
    origins: dict[tuple[str, ...], str] = {}
    for item in overrides:
        key, sep, value_text = item.partition("=")
        path = tuple(part for part in key.strip().split(".") if part)
        if not sep or not path:
            problems.append(
                Problem((), f"override {_shorten(item)!r} must look like `section.key=value`")
            )
            continue
        if len(path) > MAX_SPEC_DEPTH:
            problems.append(
                Problem(
                    (),
                    f"override key {_shorten(key)!r}: nesting deeper than {MAX_SPEC_DEPTH} levels",
                )
            )
            continue
        try:
            value = load_yaml(value_text)[0] if value_text.strip() else None
        except SpecLimitError as error:
            problems.append(Problem(path, f"override value refused: {error.problem}"))
            continue
        except yaml.YAMLError as error:
            problems.append(
                Problem(path, f"override value {value_text!r} is not valid YAML: {error}")
            )
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
        origins[path] = f"--set {item}"
    return result, problems, origins


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------
# Loading


def find_project_root(config_path: Path) -> Path:
    """The project root: the nearest folder above the config holding `data.dvc`, `.dvc` or `.git`.

    Falls back to the current directory, so a spec outside any project resolves its
    paths the way a user typing them in a shell would expect.
    """
    for folder in [config_path.resolve().parent, *config_path.resolve().parents]:
        if (
            (folder / "data.dvc").exists()
            or (folder / ".dvc").is_dir()
            or (folder / ".git").exists()
        ):
            return folder
    return Path.cwd()


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    check_paths: bool = True,
    check_imports: bool = True,
    check_expectations: bool = True,
) -> LoadedSpec:
    """Read, override and validate a spec; report every problem at once.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings applied on top of the file.
        check_paths: also check that data paths exist.
        check_imports: also import a model given as ``module:Class``.
        check_expectations: also check expectation types and kwargs against the catalogue.

    Raises:
        SpecError: with one line per problem, each naming file, line and YAML path.
    """
    config_path = Path(path)
    file_name = config_path.name
    try:
        # Read one byte past the limit: a huge file (or /dev/zero) is refused unread.
        with config_path.open("rb") as handle:
            content = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{config_path}: no such spec file") from None
    except OSError as error:
        raise SpecError(f"{config_path}: cannot read the spec: {error.strerror}") from None
    if len(content) > MAX_SPEC_BYTES:
        raise SpecError(
            f"{config_path}: refused: larger than {_kib(MAX_SPEC_BYTES)}, the most a spec may be"
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{config_path}: refused: not UTF-8 text (byte {error.start} cannot be decoded)"
        ) from None

    try:
        raw, root_node = load_yaml(text)
    except SpecLimitError as error:
        mark = error.problem_mark
        where = f"{config_path}:{mark.line + 1}" if mark is not None else str(config_path)
        raise SpecError(f"{where}: refused: {error.problem}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file_name}:{mark.line + 1}" if mark is not None else file_name
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(f"{config_path}: not valid YAML", [f"{where} {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(
            f"{config_path}: the spec must be a mapping of sections",
            [f"{file_name}:1 (top level): got {type(raw).__name__}"],
        )

    merged, problems, origins = apply_overrides(raw, overrides)
    locator = _Locator(root_node)

    def located(loc: tuple[str | int, ...], message: str) -> Problem:
        # An override explains a problem at its own path, below it (a bad value inside
        # a section it set) or above it (a key it added to a section that forbids it).
        origin = next(
            (
                text
                for key, text in origins.items()
                if tuple(loc[: len(key)]) == key or key[: len(loc)] == tuple(loc)
            ),
            None,
        )
        return Problem(loc, message, None if origin else locator.line(loc), origin)

    spec: Spec | None = None
    try:
        spec = Spec.model_validate(merged)
    except ValidationError as error:
        for item in error.errors():
            problems.append(located(tuple(item["loc"]), _pydantic_message(item)))

    root = find_project_root(config_path)
    # Cross-section checks run on every section that is valid on its own, so a typo in
    # `train` does not hide a missing data file: every problem is reported at once.
    sections = _model_sections(spec) if spec is not None else _valid_sections(merged)
    for loc, message in _semantic_problems(
        sections,
        root,
        check_paths=check_paths,
        check_imports=check_imports,
        check_expectations=check_expectations,
    ):
        problems.append(located(loc, message))

    if problems:
        problems.sort(key=lambda p: (p.line or 0, _dotted(p.loc)))
        noun = "problem" if len(problems) == 1 else "problems"
        raise SpecError(
            f"{config_path}: {len(problems)} {noun} in the spec",
            [p.render(file_name) for p in problems],
        )
    assert spec is not None
    return LoadedSpec(
        spec=spec, path=config_path, root=root, raw=merged, overrides=tuple(overrides)
    )


def _model_sections(spec: Spec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in Spec.model_fields}


def _valid_sections(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Each top-level section that validates on its own (defaults for absent ones)."""
    sections: dict[str, Any] = {}
    for name, field in Spec.model_fields.items():
        try:
            if name in raw and field.annotation is not None:
                sections[name] = TypeAdapter(field.annotation).validate_python(raw[name])
            elif not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
        except ValidationError:
            continue
    return sections


def semantic_problems(
    spec: Spec,
    root: Path,
    *,
    check_paths: bool = True,
    check_imports: bool = True,
    check_expectations: bool = True,
) -> list[tuple[tuple[str | int, ...], str]]:
    """Problems a schema cannot express: consistency between sections, files, imports."""
    return _semantic_problems(
        _model_sections(spec),
        root,
        check_paths=check_paths,
        check_imports=check_imports,
        check_expectations=check_expectations,
    )


def _semantic_problems(
    sections: Mapping[str, Any],
    root: Path,
    *,
    check_paths: bool,
    check_imports: bool,
    check_expectations: bool,
) -> list[tuple[tuple[str | int, ...], str]]:
    problems = _path_problems(sections, root)
    outside = {loc for loc, _ in problems}
    data: DataSpec | None = sections.get("data")
    if data is not None:
        problems += _data_problems(
            data, root, check_paths=check_paths and ("data", "path") not in outside
        )
        gate: GateSpec | None = sections.get("gate")
        if gate is not None:
            problems += _gate_problems(gate, data.task)
        monitor: MonitorSpec | None = sections.get("monitor")
        if monitor is not None:
            problems += _monitor_problems(monitor, data)
        evaluate: EvaluateSpec | None = sections.get("evaluate")
        if evaluate is not None:
            problems += _evaluate_problems(evaluate, data)
    quantize: QuantizeSpec | None = sections.get("quantize")
    if quantize is not None:
        problems += _quantize_problems(quantize)
    checks: list[Expectation] = sections.get("checks") or []
    problems += _check_problems(checks, check_expectations=check_expectations)
    train: TrainSpec | None = sections.get("train")
    if train is not None:
        problems += _train_problems(train)
    model: ModelSpec | None = sections.get("model")
    if model is not None and check_imports and _IMPORT_PATH.match(model.architecture):
        message = import_problem(model.architecture)
        if message:
            problems.append((("model", "architecture"), message))
    return problems


def _path_problems(
    sections: Mapping[str, Any], root: Path
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every path field that resolves outside the project and the allowed roots."""
    pipeline: PipelineSpec | None = sections.get("pipeline")
    allowed = pipeline.allowed_roots if pipeline is not None else []
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for section_name, field_name in PATH_FIELDS:
        value = getattr(sections.get(section_name), field_name, None)
        if isinstance(value, str):
            message = path_problem(value, root, allowed)
            if message:
                problems.append(((section_name, field_name), message))
    return problems


def _data_problems(
    data: DataSpec, root: Path, *, check_paths: bool
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    features = data.features
    if not features.all:
        problems.append(
            (("data", "features"), "declare at least one numeric or categorical feature")
        )
    seen: dict[str, tuple[str | int, ...]] = {}
    for kind in ("numeric", "categorical"):
        for index, column in enumerate(getattr(features, kind)):
            loc: tuple[str | int, ...] = ("data", "features", kind, index)
            if column in seen:
                first = _dotted(seen[column])
                problems.append(
                    (loc, f"column {column!r} is declared more than once (first at {first})")
                )
            else:
                seen[column] = loc
    for role in ("target", "id"):
        column = getattr(data, role)
        if column is not None and column in seen:
            problems.append((("data", role), f"column {column!r} is also declared as a feature"))
    if data.id is not None and data.id == data.target:
        problems.append((("data", "id"), "the id column cannot be the target"))

    split = data.split
    if split.method == "time" and not split.time_column:
        problems.append((("data", "split", "time_column"), "required when split.method is `time`"))
    if split.time_column and split.time_column in seen:
        problems.append((("data", "split", "time_column"), "the time column cannot be a feature"))
    if split.test_fraction + split.validation_fraction * (1 - split.test_fraction) >= 0.95:
        problems.append(
            (("data", "split"), "test and validation fractions leave almost nothing to train on")
        )

    if check_paths:
        data_path = Path(data.path) if Path(data.path).is_absolute() else root / data.path
        if not data_path.exists():
            problems.append(
                (
                    ("data", "path"),
                    f"{data_path} does not exist (generate or fetch it first: `stemma data generate` "
                    "for the worked example, `dvc pull` for a DVC remote)",
                )
            )
        elif (
            data.format == "auto"
            and data_path.is_file()
            and data_path.suffix.lower() not in (".parquet", ".csv")
        ):
            problems.append(
                (
                    ("data", "format"),
                    f"cannot tell the format of {data_path.name}; set parquet or csv",
                )
            )

    return problems


def _evaluate_problems(
    evaluate: EvaluateSpec, data: DataSpec
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    if data.id is None:
        problems.append(
            (
                ("data", "id"),
                "required by `evaluate`: shadow and canary evaluation join rows by the id column",
            )
        )
    features = data.features.all
    seen: set[str] = set()
    for index, column in enumerate(evaluate.shadow.segments):
        loc: tuple[str | int, ...] = ("evaluate", "shadow", "segments", index)
        if column not in features:
            problems.append(
                (
                    loc,
                    f"{column!r} is not a feature column; segment by one of {', '.join(features)}",
                )
            )
        elif column in seen:
            problems.append((loc, f"{column!r} is listed more than once"))
        seen.add(column)
    steps = evaluate.canary.steps
    if any(later <= earlier for earlier, later in pairwise(steps)):
        problems.append(
            (("evaluate", "canary", "steps"), f"must increase step by step, got {steps}")
        )
    if steps and steps[-1] != 1.0:
        problems.append(
            (
                ("evaluate", "canary", "steps"),
                f"must end at 1.0 (the step at which the challenger is promoted), got {steps[-1]}",
            )
        )
    return problems


def _quantize_problems(quantize: QuantizeSpec) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    seen: set[str] = set()
    for index, method in enumerate(quantize.methods):
        if method in seen:
            problems.append((("quantize", "methods", index), f"method {method!r} is listed twice"))
        seen.add(method)
    return problems


def _train_problems(train: TrainSpec) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    distributed = train.distributed
    if distributed is None:
        return problems
    loc: tuple[str | int, ...] = ("train", "distributed")
    if distributed.backend == "nccl" and train.device == "cpu":
        problems.append(
            (
                (*loc, "backend"),
                "nccl needs CUDA, but train.device is cpu: use gloo (or auto) on the CPU",
            )
        )
    if distributed.nproc_per_node > train.batch_size:
        problems.append(
            (
                (*loc, "nproc_per_node"),
                f"{distributed.nproc_per_node} processes cannot share a batch of "
                f"{train.batch_size} rows (train.batch_size): each needs at least one row",
            )
        )
    return problems


def _gate_problems(gate: GateSpec, task: str) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    metrics = METRIC_DIRECTIONS[task]
    if gate.metric not in metrics:
        problems.append(
            (
                ("gate", "metric"),
                f"{gate.metric!r} is not a {task} metric; choose one of {', '.join(metrics)}",
            )
        )
    else:
        higher_is_better = metrics[gate.metric]
        if higher_is_better and gate.maximum is not None:
            problems.append(
                (("gate", "maximum"), f"{gate.metric} is better when higher: set `minimum` instead")
            )
        if not higher_is_better and gate.minimum is not None:
            problems.append(
                (("gate", "minimum"), f"{gate.metric} is better when lower: set `maximum` instead")
            )

    return problems


def _monitor_problems(
    monitor: MonitorSpec, data: DataSpec
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    declared = data.features.all
    for index, column in enumerate(monitor.features or []):
        if column not in declared:
            problems.append(
                (
                    ("monitor", "features", index),
                    f"{column!r} is not a feature of data.features ({', '.join(declared)})",
                )
            )
    monitored = len(monitor.features) if monitor.features is not None else len(declared)
    if monitor.features is not None and not monitor.features:
        problems.append((("monitor", "features"), "list at least one feature, or leave it out"))
    elif monitor.min_drifted_features > monitored:
        problems.append(
            (
                ("monitor", "min_drifted_features"),
                f"must be at most the {monitored} monitored features",
            )
        )
    metrics = METRIC_DIRECTIONS[data.task]
    if monitor.metric is not None and monitor.metric not in metrics:
        problems.append(
            (
                ("monitor", "metric"),
                f"{monitor.metric!r} is not a {data.task} metric; choose one of {', '.join(metrics)}",
            )
        )
    return problems


def _check_problems(
    checks: list[Expectation], *, check_expectations: bool
) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for index, check in enumerate(checks):
        if len(check) != 1:
            problems.append(
                (("checks", index), "each check is a one-key mapping `expect_...: {kwargs}`")
            )
    if check_expectations and checks:
        from stemma.components.data.checks import expectation_problems

        wellformed = [(i, c) for i, c in enumerate(checks) if len(c) == 1]
        for index, message in expectation_problems([c for _, c in wellformed]):
            original_index, check = wellformed[index]
            (name,) = check
            problems.append((("checks", original_index, name), message))

    return problems


def import_problem(import_path: str) -> str | None:
    """Why ``module:Class`` cannot be used as a model class, or None when it can."""
    module_name, _, class_name = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure is the user's to see
        return f"cannot import module {module_name!r}: {type(error).__name__}: {error}"
    cls = getattr(module, class_name, None)
    if cls is None:
        return f"module {module_name!r} has no attribute {class_name!r}"
    if not isinstance(cls, type):
        return f"{import_path} is not a class"
    try:
        import torch  # only reached for custom architectures, which import torch themselves
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not issubclass(cls, torch.nn.Module):
        return f"{import_path} is not a torch.nn.Module"
    return None


def flatten(spec: Spec) -> dict[str, str]:
    """The spec as flat ``section.key -> value`` strings (for MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            out[prefix] = (
                yaml.safe_dump(value, default_flow_style=True, width=10_000)
                .strip()
                .removesuffix("...")
                .strip()
            )

    walk("", spec.model_dump(mode="json"))
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the spec, every field described."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Stemma pipeline spec"
    return schema
