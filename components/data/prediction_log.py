"""The online endpoint's prediction log, read as input: its day folders and their parts.

The endpoint (``endpoint.log``) writes every scored row and every label it receives as
Parquet parts in one folder per day::

    <endpoint.log.path>/predictions/<YYYY-MM-DD>/part-<YYYYMMDDTHHMMSSffffff>-<hex>.parquet
    <endpoint.log.path>/shadow/<YYYY-MM-DD>/part-....parquet
    <endpoint.log.path>/labels/<YYYY-MM-DD>/part-....parquet

A part appears whole (it is written under a name starting with ``.`` and renamed), so a
reader takes the ``.parquet`` files of a day folder whose names start with neither ``.``
nor ``_``. A day is the UTC date of a part's first row. A row of ``predictions`` holds
the model's input columns, the id column (as text), and the columns the endpoint adds
(:data:`LOG_COLUMNS`, the names its writer reserves, and for a multiclass model
:func:`probability_columns`); a row of ``labels`` the id (as text), the target and
``stemma_time``. The monitoring and retraining flows take ``predictions`` (or one of its
day folders) as a batch and ``labels`` as its labels.

The answer's columns, the same as batch scoring's and the model's own:

- binary: ``prediction`` (int64, 1 where the score reaches the threshold) and ``score``
  (float64, the probability of class 1);
- multiclass: ``prediction`` (the likeliest class: int64 when the classes are whole
  numbers, else string), ``score`` (float64, that class's probability) and one float64
  ``probability_<class>`` column per class, for the classes of the model served when the
  endpoint started (a later version's other classes are not logged; restart the endpoint
  to log them);
- regression: ``score`` (float64, the predicted value).

A row whose model output was not finite has null in all of them. A ``shadow`` row holds
the id, the request's columns (``stemma_*``) and the shadow version's answer columns.
A ``labels`` row's target is int64 (binary: 0 or 1), float64 (regression), or for a
multiclass model the label as sent, as text (``label_text``): a class, or a raw label
``data.labels`` maps to one, matched as training matches them; a label of neither is
logged too, and the endpoint counts it as unknown.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from stemma.components.data.tables import file_md5, listing_md5
from stemma.components.errors import DataError

#: The log's folders: scored rows, the shadow model's scores of them, and labels.
PREDICTIONS = "predictions"
SHADOW = "shadow"
LABELS = "labels"
#: Columns the endpoint adds to each logged row: none of them is an input of the model.
PREDICTION_COLUMN = "prediction"
SCORE_COLUMN = "score"
REQUEST_ID_COLUMN = "stemma_request_id"
ROW_COLUMN = "stemma_row"
TIME_COLUMN = "stemma_time"
MODEL_VERSION_COLUMN = "stemma_model_version"
VARIANT_COLUMN = "stemma_variant"
LATENCY_COLUMN = "stemma_latency_ms"
LOG_COLUMNS = (
    PREDICTION_COLUMN,
    SCORE_COLUMN,
    REQUEST_ID_COLUMN,
    ROW_COLUMN,
    TIME_COLUMN,
    MODEL_VERSION_COLUMN,
    VARIANT_COLUMN,
    LATENCY_COLUMN,
)
#: A multiclass model's probability of each class: ``probability_<class>`` (the model's
#: output columns, model.preprocessing's ``PROBABILITY_PREFIX``).
PROBABILITY_PREFIX = "probability_"
#: Values of VARIANT_COLUMN: who answered a row (the champion, or a running canary's
#: challenger), and the shadow's scores of answered rows.
CHAMPION_VARIANT = "champion"
CANARY_VARIANT = "canary"
SHADOW_VARIANT = "shadow"
#: A day folder's name (UTC).
DAY_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}$")
PART_SUFFIX = ".parquet"
#: Files that make a folder a batch folder rather than one of the log's.
DATA_SUFFIXES = (".parquet", ".csv")
KINDS = (PREDICTIONS, SHADOW, LABELS)


class NothingLoggedError(DataError):
    """The prediction log holds no row in the window asked for."""


def id_text(value: object) -> str | None:
    """An id as the log stores it: text; a whole number as its digits (7.0 as ``"7"``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def probability_columns(classes: Sequence[int | str]) -> list[str]:
    """The log's probability column of each class, in the classes' order (multiclass)."""
    return [f"{PROBABILITY_PREFIX}{name}" for name in classes]


def is_log_folder(path: Path) -> bool:
    """Whether ``path`` is one of the log's folders (``predictions``, ``labels``): no data
    file of its own, and ``YYYY-MM-DD`` day folders, or none yet in a log the endpoint
    made (it makes ``predictions`` and ``labels`` side by side before any row comes)."""
    path = Path(path)
    if not path.is_dir():
        return False
    entries = [entry for entry in path.iterdir() if not entry.name.startswith((".", "_"))]
    if any(entry.is_file() and entry.suffix.lower() in DATA_SUFFIXES for entry in entries):
        return False
    if any(entry.is_dir() and DAY_NAME.match(entry.name) for entry in entries):
        return True
    return not entries and path.name in KINDS and (path.parent / PREDICTIONS).is_dir()


def day_folders(path: Path) -> list[Path]:
    """The day folders of a log folder, oldest first."""
    return sorted(
        entry for entry in Path(path).iterdir() if entry.is_dir() and DAY_NAME.match(entry.name)
    )


def day_parts(day: Path) -> list[Path]:
    """The finished parts of one day folder, in name (time) order."""
    return data_files(day, (PART_SUFFIX,))


def data_files(folder: Path, suffixes: Sequence[str] = DATA_SUFFIXES) -> list[Path]:
    """The files of a folder with one of ``suffixes`` (in any case) whose names start with
    neither ``.`` nor ``_`` (files being written, markers), in name order."""
    return sorted(
        entry
        for entry in Path(folder).iterdir()
        if entry.is_file()
        and entry.suffix.lower() in suffixes
        and not entry.name.startswith((".", "_"))
    )


def log_parts(path: Path) -> list[Path]:
    """Every finished part of a log folder (all its days), oldest day first."""
    return [part for day in day_folders(path) for part in day_parts(day)]


def select_days(path: Path, days: int | None, *, today: date | None = None) -> list[Path]:
    """The day folders of a log folder to read: every one, or those of the last ``days``
    complete days (the ``days`` dates before today, UTC; today's is still being written).

    Raises:
        DataError: ``days`` is below 1.
        NothingLoggedError: no finished part in the log, or none in the window.
    """
    if days is not None and days < 1:
        raise DataError(f"days must be at least 1, got {days}", ["the last N complete days"])
    folders = [folder for folder in day_folders(path) if day_parts(folder)]
    if not folders:
        raise NothingLoggedError(
            f"{path}: nothing was logged yet",
            [f"parts are read from its day folders, {path}/YYYY-MM-DD/part-*.parquet"],
        )
    if days is None:
        return folders
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days)
    chosen = [folder for folder in folders if first <= date.fromisoformat(folder.name) < today]
    if not chosen:
        window = first.isoformat() if days == 1 else f"{first} to {today - timedelta(days=1)}"
        raise NothingLoggedError(
            f"{path}: nothing was logged on {window} (UTC)",
            [
                f"the log's days: {', '.join(folder.name for folder in folders[-5:])}",
                "a day is monitored once it is over; name a day folder to read it sooner",
            ],
        )
    return chosen


def folder_digest(folder: Path, files: Sequence[Path]) -> tuple[str, list[str]]:
    """The content digest of ``files`` under ``folder``, and the md5 of each file.

    One file: its md5. Several: the ``<md5>.dir`` digest DVC would record for ``folder``
    if it held exactly those files (paths relative to it), so a day folder has the digest
    a batch folder of the same files has. Files are hashed in threads (hashlib releases
    the GIL).
    """
    workers = max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        md5s = list(pool.map(file_md5, files))
    if len(files) == 1:
        return md5s[0], md5s
    entries = [
        {"md5": md5, "relpath": Path(path).relative_to(folder).as_posix()}
        for path, md5 in zip(files, md5s, strict=True)
    ]
    return listing_md5(entries), md5s
