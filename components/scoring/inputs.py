"""The input of a scoring: its files, their schemas against the model's signature, its digest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.data.tables import file_md5
from stemma.components.errors import DataError
from stemma.components.runtime.loading import ScoringModel, first_line

#: Input formats, by file suffix.
INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
#: Policies for rows with missing or non-finite values, and for unknown categories.
INVALID_ROW_POLICIES = ("reject", "error")
UNKNOWN_CATEGORY_POLICIES = ("reject", "error", "score")
EXTRA_COLUMN_POLICIES = ("ignore", "error")
#: How many rows, files or columns an error message names before it summarises.
MAX_NAMED = 5
#: How many schema problems an error lists (one screen).
MAX_PROBLEMS_SHOWN = 20
#: Bytes per CSV block (the streaming reader infers types from the first one).
CSV_BLOCK_BYTES = 4 << 20


def input_files(path: Path) -> list[Path]:
    """The files to score: ``path`` itself, or the Parquet or CSV files at a folder's top level.

    Files whose names start with ``_`` or ``.`` are skipped (markers, temporary files), and
    so are subfolders; the files come sorted by name, which fixes their part numbers.

    Raises:
        DataError: the path does not exist, is a file of another format, holds no Parquet
            or CSV file, or mixes both formats.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in INPUT_FORMATS:
            raise DataError(
                f"{path}: cannot score a {path.suffix or 'suffix-less'} file",
                [f"score.input must be a {' or '.join(INPUT_FORMATS)} file, or a folder of them"],
            )
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder", ["check score.input or --input"])
    files = sorted(
        (
            item
            for item in path.iterdir()
            if item.is_file()
            and not item.name.startswith(("_", "."))
            and item.suffix.lower() in INPUT_FORMATS
        ),
        key=lambda item: item.name,
    )
    if not files:
        raise DataError(
            f"{path}: the folder holds no {' or '.join(INPUT_FORMATS)} files",
            ["files starting with _ or . and subfolders are not read"],
        )
    kinds = sorted({file_format(item) for item in files})
    if len(kinds) > 1:
        examples = {
            kind: next(item.name for item in files if file_format(item) == kind) for kind in kinds
        }
        raise DataError(
            f"{path}: the folder mixes {' and '.join(kinds)} files",
            [f"e.g. {name} ({kind})" for kind, name in examples.items()]
            + ["keep one format per input folder"],
        )
    return files


def file_format(path: Path) -> str:
    """``parquet`` or ``csv``, by the file's suffix."""
    return INPUT_FORMATS[path.suffix.lower()]


def read_schema(path: Path) -> pa.Schema:
    """The file's Arrow schema: the Parquet footer, or the types of a CSV's first block."""
    try:
        if file_format(path) == "parquet":
            return pq.read_schema(path)
        with pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
        ) as reader:
            return reader.schema
    except (pa.ArrowException, OSError) as error:
        raise DataError(
            f"{path}: not a readable {file_format(path)} file", [first_line(error)]
        ) from error


def plain_type(arrow_type: pa.DataType) -> pa.DataType:
    """A dictionary type's value type; any other type as it is."""
    return arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type


def is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def is_text(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or (getattr(pa.types, "is_string_view", lambda _: False)(arrow_type))
    )


#: Arrow types each MLflow signature type accepts; types not listed must match by name.
_ACCEPTS: dict[str, Callable[[pa.DataType], bool]] = {
    "double": is_number,
    "float": is_number,
    "long": pa.types.is_integer,
    "integer": pa.types.is_integer,
    "string": is_text,
    "boolean": pa.types.is_boolean,
    "datetime": lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
}


def _accepts(mlflow_type: str, arrow_type: pa.DataType) -> bool:
    arrow_type = plain_type(arrow_type)
    if pa.types.is_null(arrow_type):
        # A column with no value at all: its rows meet the invalid-row policy, by name.
        return True
    check = _ACCEPTS.get(mlflow_type)
    return check(arrow_type) if check else str(arrow_type) == mlflow_type


def check_input_schema(
    files: Sequence[Path],
    model: ScoringModel,
    *,
    id_column: str | None,
    extra_columns: str,
) -> list[str]:
    """Compare every file's schema with the model's signature before any row is scored.

    Only schemas are read (Parquet footers, a CSV's first block). A signature type
    ``double`` accepts any integer or floating column, ``long`` integers only, ``string``
    text, ``boolean`` booleans only; a column with no values at all (null type) passes,
    and its rows then meet the invalid-row policy.

    Args:
        files: from :func:`input_files`.
        model: the model to score with.
        id_column: the column that identifies rows (copied to the output), or None.
        extra_columns: ``ignore`` (return them) or ``error``.

    Returns:
        The columns that are neither in the signature nor the id column, in the order first
        seen (the caller reports them as ignored).

    Raises:
        DataError: one error listing every missing column, wrong type and missing id
            column (and every extra column with ``extra_columns="error"``), by file.
        ValueError: an unknown ``extra_columns`` policy.
    """
    check_policy("extra_columns", extra_columns, EXTRA_COLUMN_POLICIES)
    expected = dict(model.signature_columns)
    problems: list[tuple[str, str]] = []  # (file name, problem)
    extra_problems: list[tuple[str, str]] = []
    extras: list[str] = []
    for path in files:
        schema = read_schema(path)
        present = {field.name: field.type for field in schema}
        missing = [
            f"{name} ({kind})" for name, kind in model.signature_columns if name not in present
        ]
        if missing:
            problems.append(
                (path.name, f"missing {plural(len(missing), 'column')}: {', '.join(missing)}")
            )
        for name, kind in model.signature_columns:
            if name in present and not _accepts(kind, present[name]):
                problems.append(
                    (path.name, f"column {name} is {present[name]}, the model needs {kind}")
                )
        if id_column is not None and id_column not in present:
            problems.append((path.name, f"missing the id column {id_column}"))
        unused = [name for name in present if name not in expected and name != id_column]
        if unused:
            extra_problems.append(
                (path.name, f"extra {plural(len(unused), 'column')}: {', '.join(unused)}")
            )
        extras.extend(name for name in unused if name not in extras)
    if extra_columns == "error":
        problems.extend(extra_problems)
    if problems:
        lines = [f"{name}: {problem}" for name, problem in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        lines.append(f"the model ({model.label}) takes: {_signature_text(model)}")
        if extra_columns == "error" and extra_problems:
            lines.append("set score.extra_columns: ignore to score files with extra columns")
        files_at_fault = {name for name, _ in problems}
        raise DataError(
            f"the input does not match the signature of {model.label}: "
            f"{plural(len(problems), 'problem')} in {plural(len(files_at_fault), 'file')}",
            lines,
        )
    return extras


def _signature_text(model: ScoringModel) -> str:
    return ", ".join(f"{name} ({kind})" for name, kind in model.signature_columns)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check_policy(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def input_digest(files: Sequence[Path]) -> tuple[str, list[str]]:
    """The content digest of the input and the md5 of each file.

    One file: its md5, as DVC records a file. Several: the ``<md5>.dir`` digest DVC would
    record for a folder holding exactly those files. Files are hashed in parallel threads
    (hashlib releases the GIL).
    """
    workers = max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        md5s = list(pool.map(file_md5, files))
    if len(files) == 1:
        return md5s[0], md5s
    entries = [{"md5": md5, "relpath": path.name} for path, md5 in zip(files, md5s, strict=True)]
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing, usedforsecurity=False).hexdigest() + ".dir", md5s


# ---------------------------------------------------------------------------------------
# Encoding a chunk: the numbers of Preprocessor.transform, from Arrow, with row validity
