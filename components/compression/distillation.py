"""Distillation: a smaller student network trained on a teacher's soft targets.

The student is the built-in MLP at smaller widths (by default half of each of an MLP
teacher's widths) or any ``package.module:Class`` from ``compress.distill.student``. It
learns, over the training split and optionally over unlabelled production rows, what the
teacher outputs for them, and becomes an ordinary fp32 Stemma model: the teacher's
preprocessor, a ``network.json`` config (:func:`student_config`) and weights, rebuilt with
:func:`~stemma.components.model.networks.build_network`.

Targets are plain targets of the training loop (:func:`~stemma.components.training.loop.
train_network`), whose losses are BCE with logits (binary), cross-entropy on probability
rows (multiclass) and MSE (regression):

- binary: ``sigmoid(teacher_logit / T)``; multiclass: ``softmax(teacher_logits / T)``;
  regression: the teacher's raw (standardised) output, with no temperature;
- on labelled rows, blended with the true label as ``alpha * soft + (1 - alpha) * hard``;
  production rows have no label and get the soft target alone.

The temperature softens what the student learns from, not what it serves: a classifier
student trains inside :class:`TemperedStudent`, whose forward is ``student(x) / T``, so the
loss compares ``student / T`` with ``teacher / T``. The inner student is what is returned
and stored, and its own logits approximate the teacher's logits; its probabilities are as
sharp as the teacher's, not softened by ``T``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from scipy.special import expit, softmax
from torch import nn

from stemma.components.data.tables import file_md5
from stemma.components.errors import CompressionError, DataError
from stemma.components.model import networks
from stemma.components.model.preprocessing import Preprocessor
from stemma.components.runtime.backends import EagerRuntime, Runtime, build_runtime
from stemma.components.runtime.loading import first_line
from stemma.components.scoring.inputs import (
    INFINITE,
    INPUT_FORMATS,
    MISSING,
    ChunkEncoder,
    file_format,
    input_files,
    is_number,
    plain_type,
)
from stemma.components.spec import CLASSIFICATION_TASKS, TrainSpec
from stemma.components.spec.compress import DistillSpec, StudentSpec
from stemma.components.training import loop

_LOG = logging.getLogger(__name__)

#: Where a spec sets the student's widths, for messages.
STUDENT_HIDDEN_FIELD = "compress.distill.student.hidden"
#: Where a spec names the production batches, for messages.
PRODUCTION_FIELD = "compress.distill.production_batches"
#: Rows of the zero batch a module teacher is tried on before its outputs are used.
_PROBE_ROWS = 2


@dataclass(frozen=True)
class DistillResult:
    """A trained student and how it was made.

    Attributes:
        network: the trained student, on the CPU, in eval mode (never the temperature
            wrapper: its outputs are logits on the teacher's scale).
        config: what :func:`~stemma.components.model.networks.build_network` rebuilds it
            from (``architecture``, ``hidden``, ``dropout``, ``params``).
        history: one row per training epoch (the training loop's rows; the losses are the
            distillation losses, against blended targets).
        parameters_teacher: the teacher's parameter count.
        parameters_student: the student's parameter count.
        rows: the rows it learnt from: ``{"train": n, "production": m}``.
        notes: what a reader of the result should know (a student that is not smaller than
            its teacher, settings that did not apply).
    """

    network: nn.Module
    config: dict[str, Any]
    history: list[dict[str, Any]]
    parameters_teacher: int
    parameters_student: int
    rows: dict[str, int]
    notes: tuple[str, ...]


class TemperedStudent(nn.Module):
    """A student whose outputs are divided by the temperature, for training only.

    Training ``TemperedStudent(student, T)`` on ``softmax(teacher / T)`` (or
    ``sigmoid(teacher / T)``) makes ``student(x) / T`` approach ``teacher(x) / T``, so the
    inner ``student`` approaches the teacher's own logits. Serve ``student``, not this.
    """

    def __init__(self, student: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0.0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        self.student = student
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x) / self.temperature


def count_parameters(network: nn.Module) -> int:
    """The number of values in a network's parameters (trainable or not)."""
    return sum(parameter.numel() for parameter in network.parameters())


def student_config(student: StudentSpec, teacher_config: Mapping[str, Any]) -> dict[str, Any]:
    """The student's network config, shaped as
    :func:`~stemma.components.model.networks.network_config` gives it.

    An ``mlp`` student without ``hidden`` gets half of each of an MLP teacher's hidden
    widths, rounded up (at least 1). A custom student (``package.module:Class``) is built
    with ``params``; its ``hidden`` is kept as given.

    Args:
        student: the spec's ``compress.distill.student``.
        teacher_config: the teacher's stored network config (its ``network.json``).

    Raises:
        CompressionError: an ``mlp`` student without ``hidden`` whose teacher is not an MLP
            with known widths (there is nothing to halve).
    """
    config: dict[str, Any] = {
        "architecture": student.architecture,
        "hidden": [int(width) for width in student.hidden or ()],
        "dropout": float(student.dropout),
        "params": dict(student.params),
    }
    if student.architecture != networks.MLP_ARCHITECTURE or student.hidden is not None:
        return config
    teacher_architecture = teacher_config.get("architecture", networks.MLP_ARCHITECTURE)
    teacher_hidden = teacher_config.get("hidden")
    if teacher_architecture != networks.MLP_ARCHITECTURE or teacher_hidden is None:
        raise CompressionError(
            f"the mlp student has no hidden widths, and the teacher ({teacher_architecture}) "
            "is not an MLP whose widths could be halved",
            [f"set {STUDENT_HIDDEN_FIELD} to the student's widths, e.g. [32, 16]"],
        )
    config["hidden"] = [max(1, math.ceil(int(width) / 2)) for width in teacher_hidden]
    return config


def soft_targets(teacher_raw: np.ndarray, task: str, temperature: float) -> np.ndarray:
    """The teacher's soft targets: what the student learns from each row.

    Args:
        teacher_raw: the teacher's raw outputs: logits ``(n,)`` or ``(n, 1)`` (binary),
            logits ``(n, classes)`` (multiclass), standardised values ``(n,)`` or
            ``(n, 1)`` (regression).
        task: ``binary``, ``multiclass`` or ``regression``.
        temperature: divides the logits before the sigmoid or softmax; not used for
            regression.

    Returns:
        float32: ``sigmoid(raw / T)`` as ``(n,)`` (binary), ``softmax(raw / T)`` row by row
        as ``(n, classes)`` (multiclass), the raw values as ``(n,)`` (regression).

    Raises:
        CompressionError: the teacher's outputs hold non-finite values.
        ValueError: an unknown task, a temperature that is not positive, or outputs of the
            wrong shape for the task.
    """
    _check_task(task)
    if not temperature > 0.0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    raw = np.asarray(teacher_raw, dtype=np.float64)
    bad = int((~np.isfinite(raw)).sum())
    if bad:
        raise CompressionError(
            f"the teacher gives {bad} missing or infinite outputs: there is nothing to learn from",
            ["check the teacher on these inputs (a diverged model, or inputs out of range)"],
        )
    if task == "multiclass":
        if raw.ndim != 2 or raw.shape[1] < 2:
            raise ValueError(f"multiclass outputs must be (rows, classes), got {raw.shape}")
        return softmax(raw / temperature, axis=1).astype(np.float32)
    values = _single_column(raw, task)
    if task == "binary":
        return expit(values / temperature).astype(np.float32)
    return values.astype(np.float32)


def blended_targets(soft: np.ndarray, hard: np.ndarray, task: str, alpha: float) -> np.ndarray:
    """``alpha * soft + (1 - alpha) * hard``, row by row.

    Args:
        soft: from :func:`soft_targets`.
        hard: the true targets as :meth:`Preprocessor.encode_target` gives them (0/1,
            one-hot rows, standardised values).
        task: ``binary``, ``multiclass`` or ``regression``.
        alpha: the soft targets' weight, in [0, 1].

    Returns:
        float32 targets shaped as ``soft``.

    Raises:
        ValueError: an unknown task, ``alpha`` outside [0, 1], or arrays that do not match.
    """
    _check_task(task)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft_values = np.asarray(soft, dtype=np.float64)
    hard_values = np.asarray(hard, dtype=np.float64)
    if task != "multiclass":
        soft_values = _single_column(soft_values, task)
        hard_values = _single_column(hard_values, task)
    if hard_values.shape != soft_values.shape:
        raise ValueError(
            f"soft targets {soft_values.shape} and true targets {hard_values.shape} differ in shape"
        )
    return (alpha * soft_values + (1.0 - alpha) * hard_values).astype(np.float32)


def training_targets(
    soft: np.ndarray,
    hard: np.ndarray,
    task: str,
    alpha: float,
    production_soft: np.ndarray | None = None,
) -> np.ndarray:
    """The student's training targets: the labelled rows blended, then the production rows'
    soft targets alone (they have no label).

    Args:
        soft: soft targets of the labelled rows.
        hard: their true targets.
        task: ``binary``, ``multiclass`` or ``regression``.
        alpha: the soft targets' weight on labelled rows.
        production_soft: soft targets of unlabelled production rows, or None.

    Returns:
        float32 targets: one row per labelled row, then one per production row.
    """
    labelled = blended_targets(soft, hard, task, alpha)
    if production_soft is None or len(production_soft) == 0:
        return labelled
    production = np.asarray(production_soft, dtype=np.float32).reshape((-1, *labelled.shape[1:]))
    return np.concatenate([labelled, production])


def distill_network(
    teacher: Runtime | nn.Module,
    config: Mapping[str, Any],
    *,
    n_inputs: int,
    n_outputs: int,
    settings: DistillSpec,
    train: TrainSpec,
    task: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    x_production: np.ndarray | None = None,
    checkpoint_dir: Path | None = None,
    progress: bool | None = None,
    parameters_teacher: int | None = None,
) -> DistillResult:
    """Train a student on the teacher's soft targets and return it.

    The student is built from ``config`` with ``train.seed`` and trained by the training
    loop for ``settings.epochs`` (default ``train.epochs``); validation targets are the same
    blend, so early stopping follows the distillation loss. Classifiers train through
    :class:`TemperedStudent`.

    Args:
        teacher: the teacher's :class:`~stemma.components.runtime.backends.Runtime`, or
            the teacher network (run eagerly where its parameters are).
        config: the student's network config, from :func:`student_config`.
        n_inputs, n_outputs: the preprocessed input width, which teacher and student
            share, and the raw outputs per row (one per class for multiclass, else one).
        settings, train, task: the spec's ``compress.distill``, ``train`` and task.
        x_train, y_train, x_val, y_val: the splits' inputs and true targets (as
            :meth:`Preprocessor.encode_target` gives them).
        x_production: unlabelled inputs (:func:`read_production_rows`): soft targets only.
        checkpoint_dir, progress: the training loop's checkpoint folder and progress bar.
        parameters_teacher: the teacher's parameter count, needed only for a runtime
            that holds no torch module (ONNX Runtime).

    Raises:
        CompressionError: the teacher does not take ``n_inputs`` columns or give
            ``n_outputs`` outputs, an input has another width, or the teacher's outputs
            are not finite.
        NetworkImportError: a custom student cannot be imported (from ``build_network``).
        TrainingError: the student cannot be built or trained (a wrong output width).
    """
    _check_inputs(task, n_inputs, x_train=x_train, x_val=x_val, x_production=x_production)
    runtime = _teacher_runtime(teacher, n_inputs)
    teacher_parameters = _teacher_parameters(teacher, runtime, parameters_teacher)
    student = networks.build_network(config, n_inputs, n_outputs, seed=train.seed)
    classifier = task in CLASSIFICATION_TASKS
    temperature = settings.temperature if classifier else 1.0
    soft = partial(_soft_targets_of, runtime, task, temperature, n_outputs)
    production = x_production if x_production is not None and len(x_production) else None
    production_soft = None if production is None else soft(production)
    targets = training_targets(soft(x_train), y_train, task, settings.alpha, production_soft)
    inputs = x_train if production is None else np.concatenate([x_train, production])
    val_targets = blended_targets(soft(x_val), y_val, task, settings.alpha)
    result = loop.train_network(
        TemperedStudent(student, temperature) if classifier else student,
        inputs,
        targets,
        x_val,
        val_targets,
        train=train.model_copy(update={"epochs": settings.epochs or train.epochs}),
        task=task,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
    trained = (result.network.student if classifier else result.network).eval()
    student_parameters = count_parameters(trained)
    return DistillResult(
        network=trained,
        config=dict(config),
        history=result.history,
        parameters_teacher=teacher_parameters,
        parameters_student=student_parameters,
        rows={"train": len(x_train), "production": len(inputs) - len(x_train)},
        notes=_notes(settings, train, task, teacher_parameters, student_parameters),
    )


def _soft_targets_of(
    runtime: Runtime, task: str, temperature: float, n_outputs: int, matrix: np.ndarray
) -> np.ndarray:
    """The teacher's soft targets for the rows of ``matrix``."""
    return soft_targets(_teacher_outputs(runtime, matrix, n_outputs), task, temperature)


def _notes(
    settings: DistillSpec, train: TrainSpec, task: str, teacher: int, student: int
) -> tuple[str, ...]:
    notes = []
    if student >= teacher:
        notes.append(
            f"the student has {student:,} parameters, not fewer than the teacher's "
            f"{teacher:,}: it is unlikely to be cheaper to run"
        )
    if task not in CLASSIFICATION_TASKS and "temperature" in settings.model_fields_set:
        notes.append(
            "compress.distill.temperature does not apply to regression: the student learnt "
            "the teacher's values as they are"
        )
    if train.distributed is not None:
        notes.append("train.distributed does not apply to distillation: it trained in one process")
    return tuple(notes)


def _check_task(task: str) -> None:
    if task not in (*CLASSIFICATION_TASKS, "regression"):
        raise ValueError(f"task must be binary, multiclass or regression, got {task!r}")


def _single_column(values: np.ndarray, task: str) -> np.ndarray:
    """``(n,)`` or ``(n, 1)`` as ``(n,)``."""
    if values.ndim == 2 and values.shape[1] == 1:
        return values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{task} values must be (rows,) or (rows, 1), got {values.shape}")
    return values


def _check_inputs(task: str, n_inputs: int, **matrices: np.ndarray | None) -> None:
    """A known task, and every input matrix two-dimensional with ``n_inputs`` columns."""
    _check_task(task)
    problems = [
        f"{name}: shape {np.shape(matrix)}"
        for name, matrix in matrices.items()
        if matrix is not None and (np.ndim(matrix) != 2 or np.shape(matrix)[1] != n_inputs)
    ]
    if problems:
        raise CompressionError(
            f"the inputs to distil on must be (rows, {n_inputs}) matrices, as the teacher takes",
            [*problems, "encode every split and production batch with the teacher's preprocessor"],
        )


def _teacher_runtime(teacher: Runtime | nn.Module, n_inputs: int) -> Runtime:
    """The teacher as a runtime that takes ``n_inputs`` columns.

    A module is run eagerly where its parameters are, in eval mode (on a private copy when
    the caller's is training, so theirs is never changed), after a probe batch that catches
    a width mismatch.
    """
    if isinstance(teacher, Runtime):
        if teacher.width != n_inputs:
            raise CompressionError(
                f"the teacher takes {teacher.width} input columns, the student {n_inputs}",
                ["teacher and student share the teacher's preprocessor: build both from it"],
            )
        return teacher
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"the teacher must be a Runtime or an nn.Module, got {type(teacher)}")
    first = next(teacher.parameters(), None)
    device = first.device.type if first is not None else "cpu"
    runtime = build_runtime(
        teacher, width=n_inputs, device=device, backend="eager", eager_reason="distillation"
    )
    try:
        runtime.run(np.zeros((_PROBE_ROWS, n_inputs), dtype=np.float32))
    except Exception as error:  # a width mismatch surfaces as whatever the layer raises
        raise CompressionError(
            f"the teacher network fails on a ({_PROBE_ROWS}, {n_inputs}) batch: "
            f"{type(error).__name__}: {error}",
            ["teacher and student share the teacher's preprocessor: build both from it"],
        ) from error
    return runtime


def _teacher_parameters(teacher: Runtime | nn.Module, runtime: Runtime, given: int | None) -> int:
    if given is not None:
        return int(given)
    if isinstance(teacher, nn.Module):
        return count_parameters(teacher)
    if isinstance(runtime, EagerRuntime):
        return count_parameters(runtime.network)
    raise ValueError(
        f"a {runtime.backend} teacher holds no torch module to count: pass parameters_teacher"
    )


def _teacher_outputs(runtime: Runtime, matrix: np.ndarray, n_outputs: int) -> np.ndarray:
    """The teacher's raw outputs, checked to be one row of ``n_outputs`` per input row."""
    raw = np.asarray(runtime.run(matrix))
    rows = len(matrix)
    fits = raw.shape == (rows, n_outputs) or (n_outputs == 1 and raw.shape == (rows,))
    if not fits:
        raise CompressionError(
            f"the teacher gives outputs of shape {raw.shape} for {rows} rows; the student has "
            f"{n_outputs} output(s) per row",
            ["the student's outputs follow the teacher's task: one per class, else one"],
        )
    return raw


# ---------------------------------------------------------------------------------------
# Unlabelled production rows


def read_production_rows(
    paths: Sequence[Path], preprocessor: Preprocessor
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Production rows to distil on, encoded with the teacher's preprocessor.

    Each path is a Parquet or CSV file, or a folder of them (its top-level files, in name
    order, one format per folder; names starting with ``_`` or ``.`` are skipped). Rows
    that :meth:`Preprocessor.transform` cannot encode (a missing or infinite numeric
    value) are dropped and counted; unknown or missing categories encode as all-zero
    blocks, as ``transform`` encodes them.

    Args:
        paths: the spec's ``compress.distill.production_batches``, resolved.
        preprocessor: the teacher's preprocessor.

    Returns:
        The float32 ``(rows, n_inputs)`` matrix of every kept row, in file order, and one
        record per file for lineage: ``path``, ``md5``, ``rows`` (kept) and ``dropped``,
        all as text.

    Raises:
        DataError: a path that does not exist, a file of another format, a file that cannot
            be read, or one that lacks a feature column or holds text in a numeric one.
    """
    encoder = ChunkEncoder(preprocessor)
    matrices = [np.zeros((0, preprocessor.n_inputs), dtype=np.float32)]
    records = []
    for path in paths:
        for file in _production_files(Path(path)):
            matrix, dropped = _encode_file(file, preprocessor, encoder)
            matrices.append(matrix)
            records.append(
                {
                    "path": str(file),
                    "md5": file_md5(file),
                    "rows": str(len(matrix)),
                    "dropped": str(dropped),
                }
            )
            if dropped:
                _LOG.warning(
                    "%s: dropped %d of %d rows with a missing or infinite numeric value",
                    file,
                    dropped,
                    dropped + len(matrix),
                )
    return np.concatenate(matrices), records


def _production_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder", [f"check {PRODUCTION_FIELD} (or remove the entry)"]
        )
    if path.is_file() and path.suffix.lower() not in INPUT_FORMATS:
        raise DataError(
            f"{path}: cannot read a {path.suffix or 'suffix-less'} file as production rows",
            [f"{PRODUCTION_FIELD} takes {' or '.join(INPUT_FORMATS)} files, or folders of them"],
        )
    return input_files(path)


def _encode_file(
    path: Path, preprocessor: Preprocessor, encoder: ChunkEncoder
) -> tuple[np.ndarray, int]:
    """A file's encoded rows and how many rows were dropped."""
    features = [*preprocessor.numeric, *preprocessor.categorical]
    table = _read_table(path)
    missing = [name for name in features if name not in table.column_names]
    wrong = [
        f"{name} is {table.schema.field(name).type}, not a number"
        for name in preprocessor.numeric
        if name in table.column_names and not _numeric_type(table.schema.field(name).type)
    ]
    if missing or wrong:
        details = [f"missing feature columns: {', '.join(missing)}"] if missing else []
        raise DataError(
            f"{path}: cannot encode these production rows with the teacher's preprocessor",
            [*details, *wrong, f"the teacher reads: {', '.join(features)}"],
        )
    columns = encoder.columns(table.select(features))
    numeric = set(preprocessor.numeric)
    unusable = [
        problem.mask
        for problem in columns.problems
        if problem.column in numeric and problem.kind in (MISSING, INFINITE)
    ]
    if unusable:
        keep = ~np.logical_or.reduce(unusable)
        columns = columns.take(keep)
    return encoder.matrix(columns, 0, columns.rows), table.num_rows - columns.rows


def _read_table(path: Path) -> pa.Table:
    try:
        if file_format(path) == "parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(
            f"{path}: not a readable {file_format(path)} file",
            [first_line(error), f"check or remove it from {PRODUCTION_FIELD}"],
        ) from error


def _numeric_type(arrow_type: pa.DataType) -> bool:
    value_type = plain_type(arrow_type)
    return is_number(value_type) or pa.types.is_boolean(value_type) or pa.types.is_null(value_type)
