"""The spec's sections for training and scoring: pipeline, data, model, train, gate, score.

Every section is a frozen pydantic model with ``extra="forbid"`` and described fields.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from stemma.components.platform.refs import ModelRefError, parse_model_ref

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
    "multiclass": {
        "roc_auc": True,  # macro average of one-vs-rest
        "accuracy": True,
        "f1_macro": True,
        "f1_weighted": True,
        "precision_macro": True,
        "recall_macro": True,
        "top2_accuracy": True,
        "log_loss": False,
    },
    "regression": {"rmse": False, "mae": False, "r2": True},
}

#: Tasks that predict a class (their outputs are probabilities).
CLASSIFICATION_TASKS = ("binary", "multiclass")

#: A class or a raw label value as a spec holds it.
ClassValue = Annotated[str, Field(min_length=1, max_length=256)] | int | bool

#: Architectures Stemma ships, by registered name.
BUILTIN_ARCHITECTURES = ("mlp",)

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=NAME_PATTERN.pattern),
]


CRON = re.compile(r"^(@(yearly|annually|monthly|weekly|daily|hourly)|(\S+\s+){4}\S+)$")
SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|ucx)://[^\s/]+$")


def check_cron(value: str | None) -> str | None:
    """``value`` when it is a cron expression with five fields (or None)."""
    if value is not None and not CRON.match(value.strip()):
        raise ValueError(f"must be a cron expression with five fields, got {value!r}")
    return value


def check_architecture_name(value: str) -> str:
    """``value`` when it names a built-in architecture or an import path ``module:Class``."""
    if value not in BUILTIN_ARCHITECTURES and not IMPORT_PATH.match(value):
        raise ValueError(
            f"must be one of {', '.join(BUILTIN_ARCHITECTURES)} or an import path "
            f"`package.module:Class`, got {value!r}"
        )
    return value


def check_model_reference(value: str) -> str:
    """``value`` when it is a ``models:/`` reference MLflow can resolve."""
    try:
        parse_model_ref(value)
    except ModelRefError as error:
        raise ValueError(
            "must look like `models:/<name>@<alias>` or `models:/<name>/<version>`, "
            f"got {value!r} ({error.details[0]})"
        ) from None
    return value


CronSchedule = Annotated[str, AfterValidator(check_cron)]
ModelReference = Annotated[str, AfterValidator(check_model_reference)]
ArchitectureName = Annotated[str, AfterValidator(check_architecture_name)]


class PipelineSpec(Section):
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
            path = Path(folder)
            if path.is_absolute() and path.resolve() == path.resolve().parent:
                raise ValueError(f"{folder!r} is the filesystem root; name the folder to allow")
        return value

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.model_name or self.name


class FeaturesSpec(Section):
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


class SplitSpec(Section):
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


class DataSpec(Section):
    """The training table and its columns."""

    path: str = Field(
        description="Data file (Parquet or CSV), relative to the project root; tracked by DVC."
    )
    format: Literal["auto", "parquet", "csv"] = Field(
        default="auto", description="File format; `auto` picks it from the file extension."
    )
    task: Literal["binary", "multiclass", "regression"] = Field(
        default="binary",
        description=(
            "Prediction task: `binary` (a 0/1 target, or one `labels` maps to 0/1), "
            "`multiclass` (one of several classes; softmax and cross-entropy) or `regression`."
        ),
    )
    target: str = Field(min_length=1, description="Label column.")
    classes: list[ClassValue] | None = Field(
        default=None,
        min_length=2,
        max_length=1000,
        description=(
            "Multiclass only: the classes in output order, e.g. `[setosa, versicolor, "
            "virginica]`. Left out, they are the training split's distinct labels, sorted, and "
            "are recorded with the model."
        ),
    )
    labels: dict[ClassValue, ClassValue] | None = Field(
        default=None,
        max_length=10_000,
        description=(
            "Maps raw values of the label column to classes, e.g. `{yes: 1, no: 0}` for a "
            "binary target or `{Y: good, N: bad}`. Every raw value in the training data must be "
            "mapped; an unmapped label in production data is counted and left out."
        ),
    )
    id: str | None = Field(default=None, description="Entity id column; never used as a feature.")
    features: FeaturesSpec = Field(description="Feature columns by kind.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/validation/test split.")

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None:
            seen: set[str] = set()
            repeated = [c for c in value if str(c) in seen or seen.add(str(c))]  # type: ignore[func-returns-value]
            if repeated:
                raise ValueError(f"classes must be distinct; repeated: {repeated}")
        return value

    @model_validator(mode="after")
    def _task_fits_classes(self) -> DataSpec:
        if self.classes is not None and self.task != "multiclass":
            raise ValueError("`classes` is for `task: multiclass` only")
        if self.labels is not None and self.task == "regression":
            raise ValueError("`labels` maps classes; a regression target takes numbers as they are")
        if self.labels is not None and self.task == "binary":
            bad = sorted({str(v) for v in self.labels.values() if v not in (0, 1)})
            if bad:
                raise ValueError(f"a binary target's labels map to 0 or 1; got {', '.join(bad)}")
        if self.labels is not None and self.classes is not None:
            known = {str(c) for c in self.classes}
            unknown = sorted({str(v) for v in self.labels.values()} - known)
            if unknown:
                raise ValueError(f"`labels` maps to {', '.join(unknown)}, not in `classes`")
        return self


Expectation = dict[str, dict[str, Any]]


class ModelSpec(Section):
    """The network: a built-in architecture or any `nn.Module` by import path."""

    architecture: ArchitectureName = Field(
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


class EarlyStoppingSpec(Section):
    """Stop when the validation loss stops improving, and keep the best epoch's weights."""

    patience: int = Field(
        default=3, ge=1, le=1000, description="Epochs without improvement before training stops."
    )
    min_delta: float = Field(
        default=0.0, ge=0.0, description="Smallest decrease of the validation loss that counts."
    )


class DistributedSpec(Section):
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


class TrainSpec(Section):
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


class GateSpec(Section):
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
    outside_alias_moves: Literal["warn", "refuse"] = Field(
        default="warn",
        description=(
            "When the champion alias was moved outside `stemma promote` (the MLflow UI's alias "
            "pencil, another tool): `warn` says so in every flow that reads it and in "
            "`stemma status`; `refuse` also stops those flows until Stemma moves it."
        ),
    )


class DaskSpec(Section):
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
        if value is not None and not SCHEDULER_ADDRESS.match(value):
            raise ValueError(
                f"must be a Dask scheduler address like `tcp://host:8786`, got {value!r}"
            )
        return value


class ScoreSpec(Section):
    """Batch scoring with a registered model (nightly by default)."""

    input: str = Field(
        default="production/batches",
        description=(
            "Parquet or CSV file, or a folder of them, relative to the project root. Production "
            "batches live outside the DVC-tracked training data (`data/`), so a new batch "
            "never changes the training data's version."
        ),
    )
    output: str = Field(
        default="outputs/scores",
        description="Folder of the Parquet parts, the rejects and the `_SUCCESS` manifest.",
    )
    model: ModelReference | None = Field(
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
    schedule: CronSchedule = Field(
        default="0 2 * * *", description="Cron schedule of the nightly scoring deployment."
    )


class RetrainSpec(Section):
    """Continuous training: when to retrain and on which production data."""

    schedule: CronSchedule | None = Field(
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
        default="production/labels",
        description=(
            "Folder of label files for production batches, joined to them by the id column "
            "(outside the DVC-tracked training data)."
        ),
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
