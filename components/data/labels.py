"""The one reader of labels: the target by id, from a Parquet or CSV file or folder, or the
endpoint's logged labels (``<endpoint.log.path>/labels``, a folder per day)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.data import prediction_log
from stemma.components.errors import DataError
from stemma.components.spec import DataSpec

#: File types a labels folder may hold.
LABEL_SUFFIXES = (".parquet", ".csv")
#: Ids shown in an error message.
MAX_IDS_SHOWN = 5


def label_text(value: object) -> str:
    """A label as text, the same for 1, 1.0, numpy's 1 and "1"; booleans as true/false.
    Label maps (``data.labels``) and classes are matched on this form."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating) and math.isfinite(value) and value == round(value):
        return str(int(value))
    return str(value)


def labels_are_classes(data: DataSpec) -> bool:
    """Whether the spec's labels are classes that :func:`read_labels` takes as they are
    (``classes=True``): a multiclass task, or a label map (``data.labels``)."""
    return data.task == "multiclass" or data.labels is not None


def read_labels(
    path: Path | Sequence[Path],
    id_column: str | None,
    target: str,
    *,
    task: str | None = None,
    missing: Literal["drop", "error"] = "drop",
    classes: bool = False,
) -> pd.DataFrame:
    """Every label of a file, a folder of files or a list of files, as one table.

    A label repeated with the same value counts once. A row whose label is empty has not
    arrived yet and is dropped (``missing="drop"``) or refused (``missing="error"``).
    Labels the endpoint logged carry the time each arrived (``stemma_time``): an id labelled
    twice keeps its latest label, a correction of the earlier one.

    With ``classes`` (a multiclass task, or a label map: ``data.labels``) the labels are
    classes, text or numbers, and come back as they are: the model's
    ``Preprocessor.class_codes`` maps them, and a label that is no class of the model is
    counted there as unknown, not refused here.

    Args:
        path: a Parquet or CSV file, a folder of them (top level, names not starting with
            ``_`` or ``.``), the log's ``labels`` folder (every day), or a list of files.
        id_column: the column that identifies rows (``data.id``).
        target: the label column (``data.target``).
        task: ``binary`` also refuses labels other than 0 and 1 (without ``classes``).
        missing: what an empty label means.
        classes: the labels are classes (text allowed), mapped by the model later.

    Returns:
        Columns ``id_column`` and ``target``, one row per id, in file order.

    Raises:
        DataError: no id column in the spec; the path does not exist; a file is unreadable
            or lacks the id or target column (every file is checked before one is read);
            an id has two different labels; a label is not a number (or not 0/1 for a
            binary task), unless ``classes``; an empty label with ``missing="error"``.
    """
    if id_column is None:
        raise DataError(
            "labels are joined to the batch by the id column, and the spec names none",
            ["set data.id to the column that identifies rows in batches and labels"],
        )
    files = label_files(path)
    _check_columns(files, id_column, target, where=_describe(path))
    logged = bool(files) and all(
        prediction_log.TIME_COLUMN in _schema(file).names for file in files
    )
    columns = [id_column, target, *([prediction_log.TIME_COLUMN] if logged else [])]
    frames = [_read(file, columns) for file in files]
    labels = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame({id_column: [], target: []})
    )
    labels = labels[labels[id_column].notna()]
    if logged:
        labels = _latest(labels, id_column)
    empty = labels[target].isna()
    if empty.any():
        if missing == "error":
            raise DataError(
                f"{int(empty.sum())} labels are missing",
                [f"{id_column} {_shown(labels.loc[empty, id_column])}"],
            )
        labels = labels[~empty]
    if not classes:
        _check_numbers(labels[target], _describe(path), task)
    labels = labels.drop_duplicates()
    repeated = labels[id_column][labels[id_column].duplicated()]
    if not repeated.empty:
        raise DataError(
            f"{_describe(path)}: {repeated.nunique()} ids have two different labels",
            [f"e.g. {id_column} {_shown(repeated)}", "keep one label per id"],
        )
    return labels.reset_index(drop=True)


def _check_numbers(labels: pd.Series, where: str, task: str | None) -> None:
    """Labels that are not classes must be numbers, and 0 or 1 for a binary task."""
    if len(labels) and not pd.api.types.is_numeric_dtype(labels):
        raise DataError(
            f"{where}: labels in {labels.name!r} are not numbers",
            [
                f"found {_shown(labels)}",
                "labels that name classes need data.task: multiclass or a label map (data.labels)",
            ],
        )
    if task == "binary" and not labels.isin([0, 1]).all():
        raise DataError(
            f"{where}: binary labels must be 0 or 1",
            [f"found {_shown(labels[~labels.isin([0, 1])])} in {labels.name}"],
        )


def _latest(labels: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Each id's latest logged label (a stable sort keeps file order among equal times)."""
    time = prediction_log.TIME_COLUMN
    ordered = labels.sort_values(time, kind="stable")
    return ordered.drop_duplicates(id_column, keep="last").sort_index().drop(columns=[time])


def label_files(path: Path | Sequence[Path]) -> list[Path]:
    """The files of a labels file, folder, log ``labels`` folder, or list.

    Raises:
        DataError: the path does not exist.
    """
    if not isinstance(path, str | Path):
        return [Path(item) for item in path]
    path = Path(path)
    if path.is_file():
        return [path]
    if prediction_log.is_log_folder(path):
        return prediction_log.log_parts(path)
    if not path.is_dir():
        raise DataError(
            f"no such labels file or folder: {path} does not exist",
            ["pass the labels with --labels, or set evaluate.labels"],
        )
    return prediction_log.data_files(path, LABEL_SUFFIXES)


def _check_columns(files: Sequence[Path], id_column: str, target: str, *, where: str) -> None:
    problems = []
    lacking: set[str] = set()
    for file in files:
        present = set(_schema(file).names)
        absent = [column for column in (id_column, target) if column not in present]
        if absent:
            lacking.update(absent)
            role = " and ".join(
                f"{'id' if column == id_column else 'target'} column {column!r}"
                for column in absent
            )
            columns = ", ".join(sorted(present)) or "none"
            problems.append(f"{file.name}: no {role} (its columns: {columns})")
    if problems:
        raise DataError(
            f"{where}: {len(problems)} label file(s) lack column(s) "
            f"{', '.join(sorted(lacking))}: the labels cannot be joined to the batch",
            [*problems, f"a labels file holds {id_column!r} and {target!r}"],
        )


def _schema(path: Path) -> pa.Schema:
    try:
        if path.suffix.lower() == ".csv":
            with pacsv.open_csv(path) as reader:
                return reader.schema
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable labels file", [_first_line(error)]) from error


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".csv":
            options = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=True)
            table = pacsv.read_csv(path, convert_options=options)
        else:
            table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read it", [_first_line(error)]) from error
    return table.to_pandas()


def _describe(path: Path | Sequence[Path]) -> str:
    if isinstance(path, str | Path):
        return str(path)
    names = [Path(item).name for item in path]
    return names[0] if len(names) == 1 else f"{len(names)} label files"


def _shown(values: pd.Series) -> str:
    return ", ".join(str(value) for value in pd.unique(values)[:MAX_IDS_SHOWN])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
