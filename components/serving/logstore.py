"""Where the endpoint's log writes its parts, and the columns each kind of part holds.

The layout, the names of the columns the log adds and ids as text are those
:mod:`.data.prediction_log` reads.

:func:`log_schemas` fixes the columns and types of the ``predictions``, ``shadow`` and
``labels`` parts; :func:`part_name` the day folder and file name of a part;
:class:`FolderStore` and :class:`S3Store` write a part so that it appears whole or not at
all (a temporary name and a rename in a folder, one upload on S3).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stemma.components.data.prediction_log import (
    KINDS,
    LABELS,
    LATENCY_COLUMN,
    LOG_COLUMNS,
    MODEL_VERSION_COLUMN,
    PREDICTION_COLUMN,
    PREDICTIONS,
    REQUEST_ID_COLUMN,
    ROW_COLUMN,
    SCORE_COLUMN,
    SHADOW,
    TIME_COLUMN,
    VARIANT_COLUMN,
    probability_columns,
)
from stemma.components.errors import SpecError, StemmaError
from stemma.components.platform import locks
from stemma.components.platform.files import (
    TEMP_PREFIX,
    fsync_folder,
    temporary_writer_pid,
    write_file_atomically,
)
from stemma.components.runtime.loading import first_line

#: The names the log's writer reserves: no feature may take one.
RESERVED_COLUMNS = LOG_COLUMNS
TIME_TYPE = pa.timestamp("us", tz="UTC")
#: MLflow signature types as the Arrow types the log stores.
SIGNATURE_TYPES: dict[str, pa.DataType] = {
    "double": pa.float64(),
    "float": pa.float32(),
    "long": pa.int64(),
    "integer": pa.int32(),
    "string": pa.string(),
    "boolean": pa.bool_(),
    "binary": pa.binary(),
    "datetime": pa.timestamp("us"),
}
#: Environment variables naming the S3 endpoint, first found wins (default: AWS itself).
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class LogError(StemmaError):
    """The endpoint's log cannot be written where the spec says."""


def part_name(first: float) -> tuple[str, str]:
    """The day folder and file name of a part whose first row came at ``first`` (epoch s)."""
    moment = datetime.fromtimestamp(first, UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%S%f")
    return moment.strftime("%Y-%m-%d"), f"part-{stamp}-{secrets.token_hex(4)}.parquet"


def log_schemas(
    signature_columns: Sequence[tuple[str, str]],
    task: str,
    *,
    id_column: str | None,
    target_column: str,
    classes: Sequence[int | str] = (),
) -> dict[str, pa.Schema]:
    """The columns and types of each kind's parts.

    Args:
        signature_columns: the served model's signature, ``(name, MLflow type)``.
        task: ``binary``, ``multiclass`` or ``regression``.
        id_column: the spec's id column, or None.
        target_column: the spec's label column.
        classes: a multiclass model's classes, in output order: one probability column
            each, and the prediction's type (int64 for whole numbers, else string).

    Raises:
        SpecError: a feature or the id column is named like a column of the log, or a
            feature's signature type has no Arrow type here.
    """
    reserved = reserved_columns(task, classes)
    problems = [
        f"the model's feature {name!r} is named like a column the endpoint's log adds"
        for name, _ in signature_columns
        if name in reserved
    ]
    if id_column in reserved:
        problems.append(f"data.id {id_column!r} is named like a column the endpoint's log adds")
    if any(name == id_column for name, _ in signature_columns):
        problems.append(f"data.id {id_column!r} is a feature of the model; an id never is one")
    unknown = [
        f"{name} ({kind})" for name, kind in signature_columns if kind not in SIGNATURE_TYPES
    ]
    if unknown:
        problems.append(f"features of types the log cannot store: {', '.join(unknown)}")
    if problems:
        raise SpecError(
            "the endpoint's log cannot hold the model's rows",
            [*problems, f"the log's own columns: {', '.join(reserved)}"],
        )
    features = [pa.field(name, SIGNATURE_TYPES[kind]) for name, kind in signature_columns]
    # Ids as text: every part then has one type whatever each caller sent (7 or "7").
    ids = [pa.field(id_column, pa.string())] if id_column else []
    answer = answer_fields(task, classes)
    request = [
        pa.field(REQUEST_ID_COLUMN, pa.string()),
        pa.field(ROW_COLUMN, pa.int32()),
        pa.field(TIME_COLUMN, TIME_TYPE),
        pa.field(MODEL_VERSION_COLUMN, pa.string()),
        pa.field(VARIANT_COLUMN, pa.string()),
    ]
    # A multiclass label is logged as sent (text), to be matched through data.labels as
    # training matches raw labels; one of no class is logged too (the endpoint counts it).
    target = {"binary": pa.int64(), "multiclass": pa.string()}.get(task, pa.float64())
    return {
        PREDICTIONS: pa.schema(
            [*features, *ids, *answer, *request, pa.field(LATENCY_COLUMN, pa.float64())]
        ),
        SHADOW: pa.schema([*ids, *request, *answer]),
        LABELS: pa.schema(
            [
                pa.field(id_column or "id", pa.string()),
                pa.field(target_column, target),
                pa.field(TIME_COLUMN, TIME_TYPE),
            ]
        ),
    }


def reserved_columns(task: str, classes: Sequence[int | str] = ()) -> tuple[str, ...]:
    """The columns the log adds to a row, which no feature may be named like."""
    if task != "multiclass":
        return RESERVED_COLUMNS
    return (*RESERVED_COLUMNS, *probability_columns(classes))


def answer_fields(task: str, classes: Sequence[int | str] = ()) -> list[pa.Field]:
    """The answer's columns of a task (:mod:`.data.prediction_log` describes them)."""
    if task == "binary":
        return [pa.field(PREDICTION_COLUMN, pa.int64()), pa.field(SCORE_COLUMN, pa.float64())]
    if task != "multiclass":
        return [pa.field(SCORE_COLUMN, pa.float64())]
    whole = all(isinstance(name, int) and not isinstance(name, bool) for name in classes)
    return [
        pa.field(PREDICTION_COLUMN, pa.int64() if whole and classes else pa.string()),
        pa.field(SCORE_COLUMN, pa.float64()),
        *(pa.field(name, pa.float64()) for name in probability_columns(classes)),
    ]


# ---------------------------------------------------------------------------------------
# Where parts go


class FolderStore:
    """Parts in a local folder, each written under a temporary name and renamed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.location = str(folder)

    def prepare(self) -> None:
        """Make the kinds' folders and remove temporary files of writers that are gone.

        Raises:
            LogError: the folder cannot be made.
        """
        try:
            for kind in KINDS:
                (self.folder / kind).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LogError(
                f"the endpoint's log cannot be written to {self.folder}",
                [first_line(error), "check endpoint.log.path and its permissions"],
            ) from None
        for kind in KINDS:
            for day in (self.folder / kind).iterdir():
                if day.is_dir():
                    remove_dead_temporaries(day)

    def write(self, kind: str, day: str, name: str, table: pa.Table) -> str:
        folder = self.folder / kind / day
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_folder(folder.parent)
        write_file_atomically(folder / name, lambda temporary: pq.write_table(table, temporary))
        return str(folder / name)


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` whose writer no longer runs; the removed."""
    removed = []
    for entry in folder.iterdir():
        pid = temporary_writer_pid(entry.name)
        if entry.name.startswith(TEMP_PREFIX) and (pid is None or not locks.process_is_alive(pid)):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class S3Store:
    """Parts under an S3 prefix, each uploaded complete in one request (S3 shows an
    object only once its upload completes)."""

    def __init__(self, url: str, environ: Mapping[str, str]) -> None:
        self.location = url.rstrip("/")
        self.prefix = self.location.removeprefix("s3://")
        self.endpoint_url = next(
            (environ[name] for name in S3_ENDPOINT_VARIABLES if environ.get(name)), None
        )
        self._filesystem: Any = None

    def prepare(self) -> None:
        try:
            import s3fs
        except ImportError:
            raise LogError(
                f"the endpoint's log cannot be written to {self.location}: s3fs is missing",
                ["install Stemma with its s3 extra: pip install 'stemma[s3]'"],
            ) from None
        self._filesystem = s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url, skip_instance_cache=True
        )

    def write(self, kind: str, day: str, name: str, table: pa.Table) -> str:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        key = f"{self.prefix}/{kind}/{day}/{name}"
        self._filesystem.pipe_file(key, sink.getvalue().to_pybytes())
        return f"s3://{key}"
