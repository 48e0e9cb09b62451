"""The online endpoint's prediction log as evidence: which days to judge, their rows, labels.

The layout and its parts are :mod:`~.data.prediction_log`'s: ``predictions/``,
``shadow/`` and ``labels/``, each a folder per UTC day of Parquet parts. A run is given
the log folder (every day) or one day folder of it (``<log>/predictions/<YYYY-MM-DD>``:
that day only; labels are always read from every day, since a row's label arrives days
after the row). Every part a run reads is checked for the columns it needs before a row
is read, and each day is identified by the digest of its parts, so a lineage record can
name it and a canary recognises a day it has judged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stemma.components.data.labels import read_labels
from stemma.components.data.prediction_log import (
    DAY_NAME,
    KINDS,
    LABELS,
    LATENCY_COLUMN,
    PREDICTIONS,
    REQUEST_ID_COLUMN,
    TIME_COLUMN,
    day_folders,
    day_parts,
    folder_digest,
    id_text,
)
from stemma.components.errors import DataError
from stemma.components.evaluation.rows import LABEL
from stemma.components.runtime.loading import first_line

#: A day is judged once this long has passed since it ended (UTC): the endpoint writes a
#: row's part at most ``endpoint.log.rotate_s`` after the row, so by then none is to come.
DAY_SETTLE = timedelta(minutes=15)
#: Parts (and values) an error message names at most.
MAX_SHOWN = 5


@dataclass(frozen=True)
class LogFolder:
    """A prediction log, and the one day of it a run was given (None: every day)."""

    root: Path
    day: str | None = None

    def describe(self) -> str:
        return f"{self.root / PREDICTIONS / self.day}" if self.day else f"{self.root}"


@dataclass(frozen=True)
class LogDay:
    """The finished parts of one day folder of one of the log's folders.

    Attributes:
        stream: ``predictions``, ``shadow`` or ``labels``.
        path: the day folder.
        parts: its finished parts, in time order.
        digest: md5 of the one part, or the ``<md5>.dir`` digest of them all.
        files: each part's md5, by name.
    """

    stream: str
    path: Path
    parts: tuple[Path, ...]
    digest: str
    files: dict[str, str]

    @property
    def day(self) -> str:
        return self.path.name


def open_log(path: str | Path) -> LogFolder:
    """The log ``path`` names: the log folder itself, or one day folder in it.

    Raises:
        DataError: the path is on S3, missing, or neither a log folder (holding
            ``predictions/``, ``shadow/`` or ``labels/``) nor one of its day folders.
    """
    text = str(path)
    if text.startswith("s3://"):
        raise DataError(
            f"{text}: the log is on S3, and judging reads a local folder",
            [f"copy it first, e.g. aws s3 sync {text} endpoint-log, then --log endpoint-log"],
        )
    path = Path(path)
    if not path.is_dir():
        raise DataError(
            f"{path}: no such log folder",
            ["--log names the endpoint's log folder (endpoint.log.path) or a day folder of it"],
        )
    if DAY_NAME.match(path.name) and path.parent.name in KINDS:
        return LogFolder(path.parent.parent, path.name)
    if any((path / stream).is_dir() for stream in KINDS):
        return LogFolder(path)
    raise DataError(
        f"{path}: not a prediction log",
        [
            f"a log folder holds {', '.join(f'{s}/' for s in KINDS)} with a folder per "
            "UTC day (YYYY-MM-DD) of Parquet parts",
            "or name one day: <log>/predictions/YYYY-MM-DD",
        ],
    )


def stream_days(log: LogFolder, stream: str, *, every_day: bool = False) -> list[LogDay]:
    """The day folders of one of the log's folders that hold a finished part, oldest first.

    Args:
        log: from :func:`open_log`.
        stream: ``predictions``, ``shadow`` or ``labels``.
        every_day: every day even when the run was given one (labels).
    """
    folder = log.root / stream
    if not folder.is_dir():
        return []
    days = []
    for day in day_folders(folder):
        if log.day is not None and not every_day and day.name != log.day:
            continue
        parts = day_parts(day)
        if parts:
            digest, md5s = folder_digest(day, parts)
            files = {part.name: md5 for part, md5 in zip(parts, md5s, strict=True)}
            days.append(LogDay(stream, day, tuple(parts), digest, files))
    return days


def days_digest(days: Sequence[LogDay]) -> str | None:
    """One digest of several days of a log (every part, by its path under the log folder)."""
    if not days:
        return None
    root = days[0].path.parent.parent
    digest, _ = folder_digest(root, [part for day in days for part in day.parts])
    return digest


def complete_days(
    days: Sequence[LogDay], *, now: datetime | None = None
) -> tuple[list[LogDay], list[LogDay]]:
    """The days that are over (:data:`DAY_SETTLE` past their end), and those still written."""
    now = now or datetime.now(UTC)
    over: list[LogDay] = []
    open_: list[LogDay] = []
    for day in days:
        end = datetime.combine(date.fromisoformat(day.day), datetime.min.time(), UTC)
        (over if now >= end + timedelta(days=1) + DAY_SETTLE else open_).append(day)
    return over, open_


def read_log_rows(
    days: Sequence[LogDay], columns: Sequence[str], *, optional: Sequence[str] = ()
) -> pd.DataFrame:
    """The rows of the days' parts: the named columns, and those of ``optional`` every part
    has (a column some part lacks is left out).

    Raises:
        DataError: a part is unreadable or lacks one of ``columns`` (every part is checked
            before a row is read).
    """
    schemas = check_columns(days, columns)
    extra = [
        column
        for column in dict.fromkeys(optional)
        if column not in columns and all(column in schema.names for schema in schemas.values())
    ]
    wanted = list(dict.fromkeys([*columns, *extra]))
    tables = [_read_part(pq.read_table, part, columns=wanted) for part in schemas]
    if not tables:
        return pd.DataFrame({column: [] for column in wanted})
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def check_columns(days: Sequence[LogDay], columns: Sequence[str]) -> dict[Path, pa.Schema]:
    """Every part's schema, once each part is known to hold ``columns``.

    Raises:
        DataError: a part is unreadable or lacks one of ``columns``, naming the parts.
    """
    schemas = {part: _read_part(pq.read_schema, part) for day in days for part in day.parts}
    problems = [
        f"{part.parent.parent.name}/{part.parent.name}/{part.name}: no {', '.join(missing)}"
        for part, schema in schemas.items()
        if (missing := [column for column in columns if column not in schema.names])
    ]
    if problems:
        raise DataError(
            f"{len(problems)} of {len(schemas)} parts of the prediction log lack columns "
            "the evaluation needs",
            [
                *problems[:MAX_SHOWN],
                *(
                    [f"... and {len(problems) - MAX_SHOWN} more"]
                    if len(problems) > MAX_SHOWN
                    else []
                ),
                "the endpoint writes them (endpoint.log); parts of another writer cannot be judged",
            ],
        )
    return schemas


def _read_part(read: Callable[..., Any], part: Path, **options: Any) -> Any:
    """``read`` (``pq.read_schema``, ``pq.read_table``) of a part; DataError if unreadable."""
    try:
        return read(part, **options)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{part}: not a readable Parquet part", [first_line(error)]) from error


def read_log_labels(
    log: LogFolder, *, id_column: str, target: str, task: str, classes: bool = False
) -> tuple[pd.DataFrame | None, list[LogDay]]:
    """The labels the endpoint received, every day of them: the id and ``label``, one per id.

    A label sent again for an id replaces the earlier one (the latest ``stemma_time``
    counts): a correction wins. None when no label has arrived yet. Read by
    :func:`~.data.labels.read_labels`, as every label is; with ``classes`` (a multiclass
    task, or a label map) as they arrived, for :func:`~.rows.encode_labels`.

    Raises:
        DataError: a part lacks the id, the target or the time; a label is not a number, or
            not 0 or 1 for a binary task (without ``classes``).
    """
    days = stream_days(log, LABELS, every_day=True)
    if not days:
        return None, []
    parts = list(check_columns(days, [id_column, target, TIME_COLUMN]))
    frame = read_labels(parts, id_column, target, task=task, classes=classes)
    return frame.rename(columns={target: LABEL}).reset_index(drop=True), days


def ids_as_logged(labels: pd.DataFrame | None, id_column: str) -> pd.DataFrame | None:
    """Labels whose ids are numbers, with the ids as the log stores them: text, a whole
    number as its digits (``7`` and ``7.0`` as ``"7"``), so that they join logged rows."""
    if labels is None or not pd.api.types.is_numeric_dtype(labels[id_column]):
        return labels
    return labels.assign(**{id_column: [id_text(value) for value in labels[id_column].tolist()]})


def served_latency(frame: pd.DataFrame) -> dict[str, float]:
    """Percentiles of the time the endpoint took to answer the requests of ``frame`` (ms):
    one value per request, ``latency_ms_p50``/``p95``/``p99``; empty without one."""
    if frame.empty or LATENCY_COLUMN not in frame:
        return {}
    values = frame.drop_duplicates(REQUEST_ID_COLUMN)[LATENCY_COLUMN].to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    return {f"latency_ms_p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def latest_per_id(frame: pd.DataFrame, id_column: str) -> tuple[pd.DataFrame, int]:
    """One row per entity, its latest (``stemma_time``); rows without an id are all kept.

    Returns:
        The rows, and how many earlier rows of a repeated id were left out.
    """
    ordered = frame.sort_values(TIME_COLUMN, kind="stable")
    missing = ordered[id_column].isna()
    repeated = ordered[id_column].duplicated(keep="last") & ~missing
    return ordered[~repeated].reset_index(drop=True), int(repeated.sum())
