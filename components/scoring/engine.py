"""Batch scoring: a registered model over Parquet or CSV files, in bounded memory, resumably.

The engine behind ``stemma run score``. :func:`load_scoring_model` rebuilds a registered
model from its three plain artifact files (no pickle, no ``mlflow.pyfunc``) and refuses
weights whose hash differs from the one recorded at registration;
:func:`check_input_schema` compares every input file's schema with the model's signature
before a row is read; :func:`score_files` streams the rows through the model a chunk at a
time and writes one Parquet part per chunk.

The output folder::

    part-00000-00000.parquet           chunk 0 of input file 0: id, prediction, score
    part-00000-00001.parquet           (the model and the input digest in its metadata)
    rejects/part-00000-00001.parquet   rows of that chunk that could not be scored, and why
    _PROGRESS.json                     the fingerprint of the scoring that writes here
    _SUCCESS                           the manifest, written last
    _LOCK, _LOCK.mutex                 who writes here now (see :mod:`.locks`)

Chunk ``k`` of file ``f`` holds rows ``k * chunk_rows`` to ``(k + 1) * chunk_rows - 1`` of
that file, and its bytes depend only on the fingerprint (model, input, settings). Every file
appears atomically (temporary name, fsync, rename), and a scored part is written after its
rejects part, so its presence marks the chunk done: a run killed at any point resumes from
the parts that exist and ends with the same bytes as a run that was never interrupted.

One scoring writes into a folder at a time: it holds the folder's lock (:mod:`.locks`)
from before it looks at the folder until the manifest is written, and a second one is
refused, naming the holder. The manifest is written only once every part it lists has been
read back from disk and matches the sha256 and row count it was written with; a folder
that is already complete is verified the same way before "nothing to do", and a part that
differs is removed and scored again.

The work overlaps in threads (pyarrow, numpy, hashlib and torch release the GIL): one
hashes the input, one reads chunks ahead, the calling thread checks and looks up each
chunk, ``threads`` threads encode, run the network and decode a row group at a time under
``torch.inference_mode`` (one TorchScript call each, which holds no GIL while it runs),
and one tabulates and encodes each part a row group at a time, as its rows are scored,
and writes it once the input's digest is known. Preprocessing works on Arrow and numpy
arrays directly; pandas is not involved. Memory is bounded by a few chunks, whatever the
size of the input.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.data.tables import file_md5
from stemma.components.errors import DataError
from stemma.components.model.preprocessing import Preprocessor
from stemma.components.platform import locks
from stemma.components.runtime.loading import (  # noqa: F401  (the scoring API re-exports them)
    LOGGED_MODEL_WEIGHTS_TAG,
    WEIGHTS_TAG,
    ScoringModel,
    UntrustedModelError,
    first_line,
    load_scoring_model,
    logged_model_id,
    sha256_file,
    verify_model_files,
)
from stemma.components.scoring import parquet_pages

if TYPE_CHECKING:
    from typing import TypeAlias

    from torch import nn

    #: TorchScript's scalar type (``Scalar`` in operator schemas), a name only its compiler
    #: knows: the batch script annotates an operator's argument with it.
    number: TypeAlias = float

_LOG = logging.getLogger(__name__)

#: Input formats, by file suffix.
INPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}
#: Name of the part (scored or rejected rows) of chunk ``chunk`` of input file ``file``.
PART_NAME = "part-{file:05d}-{chunk:05d}.parquet"
#: Folder of the rejects parts, inside the output folder.
REJECTS_DIR = "rejects"
#: The fingerprint of the scoring that writes into the folder, written before any part.
PROGRESS_FILE = "_PROGRESS.json"
#: The manifest, written last: its presence means the folder is complete.
SUCCESS_FILE = "_SUCCESS"
#: Prefix of files being written; they are renamed into place once complete.
TEMP_PREFIX = ".tmp-"
#: Layout version of the parts and the manifest; part of the fingerprint (2: integer and
#: float columns stored uncompressed, integers delta-encoded; 3: the prediction too; 4: row
#: groups of PART_ROW_GROUP_ROWS rows, the prediction and the score required columns, and
#: scores decoded by torch's logistic).
OUTPUT_FORMAT = 4
#: Equal-width bins of the score histogram (over [0, 1] for a binary model).
HISTOGRAM_BINS = 20
#: Prefix of the Parquet key-value metadata Stemma writes on every part.
METADATA_PREFIX = "stemma."
#: Policies for rows with missing or non-finite values, and for unknown categories.
INVALID_ROW_POLICIES = ("reject", "error")
UNKNOWN_CATEGORY_POLICIES = ("reject", "error", "score")
EXTRA_COLUMN_POLICIES = ("ignore", "error")
#: How many rows, files or columns an error message names before it summarises.
MAX_NAMED = 5
#: How many schema problems an error lists (one screen).
MAX_PROBLEMS_SHOWN = 20
#: Chunks read ahead of the model, and parts waiting to be written: bounds memory.
PREFETCH_CHUNKS = 2
PENDING_WRITES = 2
#: Widest span of integer category values matched through a lookup table (8 bytes a value).
LOOKUP_TABLE_MAX_SPAN = 1 << 16
#: Rows per forward pass: a batch's activations stay in the CPU cache. On a 2-core EPYC
#: the credit MLP ran 2-3x faster per row in batches of 8,192 than of 65,536.
FORWARD_BATCH_ROWS = 8_192
#: Rows per row group of a scored part (eight forward batches): the writer encodes a row
#: group as soon as its scores are done, so little of a part is left to write when the
#: model finishes its chunk. Fixed, so that a part's bytes do not depend on timing.
PART_ROW_GROUP_ROWS = 65_536
#: Size of the block whose release raises glibc's mmap threshold (its cap is 32 MiB).
MALLOC_WARMUP_BYTES = (32 << 20) - (64 << 10)
#: Largest table of category combinations the first layer of a one-hot kernel looks up
#: (1 MiB for a 64-wide layer: it stays in the CPU cache).
COMBINATION_TABLE_ROWS = 4_096
#: Rows of the random batch a fused or prepacked network must score like the original.
PROBE_ROWS = 64
#: Read buffer of the Parquet reader.
READ_BUFFER_BYTES = 1 << 20
#: Bytes per CSV block (the streaming reader infers types from the first one).
CSV_BLOCK_BYTES = 4 << 20
#: Output columns of a scored part, besides the id column.
PREDICTION_COLUMN = "prediction"
SCORE_COLUMN = "score"
#: Columns of a rejects part, besides the id column and the raw feature columns.
ROW_COLUMN = "row"
REASON_COLUMN = "reason"

_PART = re.compile(r"^part-(\d{5})-(\d{5})\.parquet$")


# ---------------------------------------------------------------------------------------
# The input


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
    kinds = sorted({_format(item) for item in files})
    if len(kinds) > 1:
        examples = {
            kind: next(item.name for item in files if _format(item) == kind) for kind in kinds
        }
        raise DataError(
            f"{path}: the folder mixes {' and '.join(kinds)} files",
            [f"e.g. {name} ({kind})" for kind, name in examples.items()]
            + ["keep one format per input folder"],
        )
    return files


def _format(path: Path) -> str:
    return INPUT_FORMATS[path.suffix.lower()]


def _read_schema(path: Path) -> pa.Schema:
    """The file's Arrow schema: the Parquet footer, or the types of a CSV's first block."""
    try:
        if _format(path) == "parquet":
            return pq.read_schema(path)
        with pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
        ) as reader:
            return reader.schema
    except (pa.ArrowException, OSError) as error:
        raise DataError(
            f"{path}: not a readable {_format(path)} file", [first_line(error)]
        ) from error


def _plain_type(arrow_type: pa.DataType) -> pa.DataType:
    return arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type


def _is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def _is_text(arrow_type: pa.DataType) -> bool:
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or (getattr(pa.types, "is_string_view", lambda _: False)(arrow_type))
    )


#: Arrow types each MLflow signature type accepts; types not listed must match by name.
_ACCEPTS: dict[str, Callable[[pa.DataType], bool]] = {
    "double": _is_number,
    "float": _is_number,
    "long": pa.types.is_integer,
    "integer": pa.types.is_integer,
    "string": _is_text,
    "boolean": pa.types.is_boolean,
    "datetime": lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    "binary": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
}


def _accepts(mlflow_type: str, arrow_type: pa.DataType) -> bool:
    arrow_type = _plain_type(arrow_type)
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
    _check_policy("extra_columns", extra_columns, EXTRA_COLUMN_POLICIES)
    expected = dict(model.signature_columns)
    problems: list[tuple[str, str]] = []  # (file name, problem)
    extra_problems: list[tuple[str, str]] = []
    extras: list[str] = []
    for path in files:
        schema = _read_schema(path)
        present = {field.name: field.type for field in schema}
        missing = [
            f"{name} ({kind})" for name, kind in model.signature_columns if name not in present
        ]
        if missing:
            problems.append(
                (path.name, f"missing {_plural(len(missing), 'column')}: {', '.join(missing)}")
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
                (path.name, f"extra {_plural(len(unused), 'column')}: {', '.join(unused)}")
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
            f"{_plural(len(problems), 'problem')} in {_plural(len(files_at_fault), 'file')}",
            lines,
        )
    return extras


def _signature_text(model: ScoringModel) -> str:
    return ", ".join(f"{name} ({kind})" for name, kind in model.signature_columns)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _check_policy(name: str, value: str, allowed: Sequence[str]) -> None:
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


#: Kinds of problem a row can have, and the policy that decides its fate.
_MISSING, _INFINITE, _UNKNOWN = "missing", "infinite", "unknown"


@dataclass(frozen=True)
class _Problem:
    """Rows of a chunk where one column cannot be used as the model needs it."""

    column: str
    kind: str  # _MISSING, _INFINITE or _UNKNOWN
    mask: np.ndarray  # bool, one per row of the chunk


@dataclass(frozen=True)
class _Columns:
    """A chunk's feature columns as numpy arrays, ready to be encoded batch by batch."""

    rows: int
    numeric: list[np.ndarray]  # raw values (integers, or floats with NaN where missing)
    codes: list[np.ndarray]  # one-hot position per categorical column, -1: unknown or missing
    all_known: list[bool]  # per categorical column: no -1 among its codes
    problems: list[_Problem]

    def take(self, keep: np.ndarray) -> _Columns:
        """Only the rows where ``keep`` is true (problems are not carried over)."""
        codes = [values[keep] for values in self.codes]
        return _Columns(
            rows=int(keep.sum()),
            numeric=[values[keep] for values in self.numeric],
            codes=codes,
            all_known=[bool((values >= 0).all()) for values in codes],
            problems=[],
        )


class _ChunkEncoder:
    """Encodes Arrow chunks exactly as :meth:`Preprocessor.transform` encodes frames.

    Numeric columns are standardised in float64 and stored as float32, categorical ones
    one-hot encoded with the training vocabulary; a value the vocabulary lacks encodes as
    an all-zero block. Unlike ``transform``, it does not raise on bad values: it reports
    missing, infinite and unknown values per column as row masks, and the caller applies
    the spec's policies.

    It works in two steps: :meth:`columns` checks and looks up a whole chunk (a few
    passes over each column), and :meth:`matrix` builds the network's input for a batch of
    rows, small enough to stay in the CPU cache until the network reads it.
    """

    def __init__(self, preprocessor: Preprocessor) -> None:
        self._numeric = preprocessor.numeric
        self._means = preprocessor.means
        self._stds = preprocessor.stds
        self._width = preprocessor.n_inputs
        self._categorical: list[tuple[str, int]] = []
        self.sizes = [len(vocabulary) for vocabulary in preprocessor.vocabularies]
        # Integer vocabularies: a lookup table over the values' span (one gather per row)
        # and, for float columns or a span too wide for a table, the sorted values for a
        # binary search. Text vocabularies: Arrow's hash lookup.
        self._tables: dict[str, tuple[int, np.ndarray]] = {}
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._texts: dict[str, pa.Array] = {}
        offset = len(preprocessor.numeric)
        for column, vocabulary in zip(
            preprocessor.categorical, preprocessor.vocabularies, strict=True
        ):
            self._categorical.append((column, offset))
            offset += len(vocabulary)
            self._texts[column] = pa.array([str(value) for value in vocabulary], pa.string())
            if not isinstance(vocabulary[0], int):
                continue
            values = np.asarray(vocabulary, dtype=np.int64)
            order = np.argsort(values, kind="stable")
            self._sorted[column] = (values[order], order)
            low, high = int(values.min()), int(values.max())
            if high - low < LOOKUP_TABLE_MAX_SPAN and low > np.iinfo(np.int64).min:
                # Position ``value - low + 1``; the -1 (unknown) at both ends is where every
                # value outside the span lands once the positions are clipped.
                table = np.full(high - low + 3, -1, dtype=np.int64)
                table[values - low + 1] = np.arange(len(values))
                self._tables[column] = (low, table)

    def columns(self, table: pa.Table) -> _Columns:
        """The chunk's features as arrays, and every missing, infinite or unknown value."""
        problems: list[_Problem] = []
        numeric = []
        for column in self._numeric:
            values = _float_values(table.column(column))
            if values.dtype.kind == "f":
                finite = np.isfinite(values)
                if not finite.all():
                    nan = np.isnan(values)
                    if nan.any():
                        problems.append(_Problem(column, _MISSING, nan))
                    if (~finite & ~nan).any():
                        problems.append(_Problem(column, _INFINITE, ~finite & ~nan))
            numeric.append(values)
        all_codes, all_known = [], []
        for column, _ in self._categorical:
            codes, missing = self._codes(column, table.column(column))
            known = codes >= 0
            all_codes.append(codes)
            all_known.append(bool(known.all()))
            if all_known[-1]:
                continue
            unknown = ~known
            if missing is not None and missing.any():
                problems.append(_Problem(column, _MISSING, missing))
                unknown &= ~missing
            if unknown.any():
                problems.append(_Problem(column, _UNKNOWN, unknown))
        return _Columns(table.num_rows, numeric, all_codes, all_known, problems)

    def matrix(self, columns: _Columns, start: int, stop: int) -> np.ndarray:
        """The float32 input matrix of rows ``start`` to ``stop - 1``."""
        rows = stop - start
        matrix = np.zeros((rows, self._width), dtype=np.float32)
        self._standardise(columns, start, stop, matrix)
        flat = matrix.reshape(-1)
        row_starts = np.arange(0, rows * self._width, self._width, dtype=np.int64)
        for (_, offset), codes, all_known in zip(
            self._categorical, columns.codes, columns.all_known, strict=True
        ):
            batch = codes[start:stop]
            if all_known:
                flat[row_starts + (batch + offset)] = 1.0
            else:
                known = batch >= 0
                flat[row_starts[known] + (batch[known] + offset)] = 1.0
        return matrix

    def numeric_block(self, columns: _Columns, start: int, stop: int) -> np.ndarray:
        """The numeric columns of :meth:`matrix` alone: float32, one column per feature."""
        block = np.empty((stop - start, len(self._numeric)), dtype=np.float32)
        self._standardise(columns, start, stop, block)
        return block

    def code_block(self, columns: _Columns, start: int, stop: int) -> np.ndarray:
        """Each categorical value's position in its column's vocabulary, a missing or
        unknown value as the vocabulary's size: int64, one row per column (so that each
        column is contiguous), as :class:`_OneHotKernel` reads it."""
        block = np.empty((len(self._categorical), stop - start), dtype=np.int64)
        for index, (codes, all_known, size) in enumerate(
            zip(columns.codes, columns.all_known, self.sizes, strict=True)
        ):
            batch = codes[start:stop]
            if all_known:
                block[index] = batch
            else:
                np.copyto(block[index], np.where(batch >= 0, batch, size))
        return block

    def _standardise(self, columns: _Columns, start: int, stop: int, out: np.ndarray) -> None:
        """Write the standardised numeric columns into the first columns of ``out``."""
        scratch = np.empty(stop - start, dtype=np.float64)
        for index, values in enumerate(columns.numeric):
            # float64 arithmetic, then float32, exactly as Preprocessor.transform does.
            np.subtract(values[start:stop], self._means[index], out=scratch)
            np.divide(scratch, self._stds[index], out=scratch)
            out[:, index] = scratch

    def _codes(self, column: str, values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
        """One-hot position of each value (-1: unknown or missing), and the missing mask."""
        arrow_type = _plain_type(values.type)
        if pa.types.is_null(arrow_type):
            return np.full(len(values), -1, dtype=np.int64), np.ones(len(values), dtype=bool)
        if pa.types.is_dictionary(values.type):
            values = values.cast(arrow_type)
        missing = _null_mask(values)
        if column in self._sorted and (_is_number(arrow_type) or pa.types.is_boolean(arrow_type)):
            if pa.types.is_boolean(arrow_type):
                values = values.cast(pa.int64())
            numbers = _numpy(values)
            if numbers.dtype.kind == "f":
                nan = np.isnan(numbers)
                missing = nan if missing is None else missing | nan
            elif column in self._tables and numbers.dtype != np.uint64:
                return self._looked_up(column, numbers), missing
            sorted_values, order = self._sorted[column]
            position = np.searchsorted(sorted_values, numbers)
            np.minimum(position, len(sorted_values) - 1, out=position)
            # Comparing as numbers makes 2.0 match 2 and 2.5 match nothing, as pandas does.
            found = sorted_values[position] == numbers
            return np.where(found, order[position], -1), missing
        if not _is_text(arrow_type):
            values = pc.cast(values, pa.string())
        found = pc.index_in(values, value_set=self._texts[column])
        codes = pc.fill_null(found, -1).to_numpy().astype(np.int64, copy=False)
        return codes, missing

    def _looked_up(self, column: str, numbers: np.ndarray) -> np.ndarray:
        """Codes by one clipped gather (faster than fancy indexing, and no range pass: a
        value outside the span, even one whose shift wraps around, clips to an end)."""
        low, table = self._tables[column]
        return np.take(table, numbers.astype(np.int64, copy=False) - (low - 1), mode="clip")


def _float_values(values: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as numpy: integers as they are, floats with NaN where missing."""
    arrow_type = _plain_type(values.type)
    if pa.types.is_null(arrow_type):
        return np.full(len(values), np.nan)
    if pa.types.is_dictionary(values.type) or pa.types.is_boolean(arrow_type):
        values = values.cast(pa.float64() if pa.types.is_boolean(arrow_type) else arrow_type)
    if values.null_count and not pa.types.is_floating(arrow_type):
        values = values.cast(pa.float64())
    # Nulls in a float column become NaN, which the caller reports as missing.
    return _numpy(values)


def _numpy(values: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: a view of its buffer when it has one chunk and no nulls (the
    chunked conversion copies even then: 0.16 ms per 200,000 doubles)."""
    if values.num_chunks == 1:
        return values.chunk(0).to_numpy(zero_copy_only=False)
    return values.to_numpy(zero_copy_only=False)


def _null_mask(values: pa.ChunkedArray) -> np.ndarray | None:
    if not values.null_count:
        return None
    return values.is_null().to_numpy(zero_copy_only=False)


def _reasons(table: pa.Table, problems: Sequence[_Problem], rows: np.ndarray) -> list[str]:
    """One reason per row in ``rows``: its problems, ``salary is missing; car=99 is not a known category``."""
    texts: list[list[str]] = [[] for _ in rows]
    for problem in problems:
        hit = problem.mask[rows]
        if not hit.any():
            continue
        where = np.flatnonzero(hit)
        if problem.kind == _UNKNOWN:
            taken = table.column(problem.column).take(pa.array(rows[where]))
            shown = pc.cast(taken, pa.string()).to_pylist()
            for position, value in zip(where, shown, strict=True):
                texts[position].append(f"{problem.column}={value} is not a known category")
        else:
            text = f"{problem.column} is {problem.kind}"
            for position in where:
                texts[position].append(text)
    return ["; ".join(parts) for parts in texts]


# ---------------------------------------------------------------------------------------
# Streaming the input


def _read_columns(model: ScoringModel, id_column: str | None) -> list[str]:
    columns = [id_column] if id_column is not None else []
    return columns + [name for name in model.feature_columns if name != id_column]


#: Arrow types CSV columns are read as, per signature type, so that every block of a file
#: gets the same type (the reader would otherwise fix the types from the first block).
_CSV_TYPES = {
    "double": pa.float64(),
    "float": pa.float64(),
    "long": pa.int64(),
    "integer": pa.int64(),
    "string": pa.string(),
    "boolean": pa.bool_(),
}


def _file_chunks(
    path: Path,
    columns: list[str],
    chunk_rows: int,
    csv_types: dict[str, pa.DataType],
    first_chunk: int = 0,
) -> Iterator[pa.Table]:
    """The file's rows as tables of exactly ``chunk_rows`` rows (the last one shorter),
    from chunk ``first_chunk`` on (a Parquet file skips the row groups before it unread)."""
    first_row = first_chunk * chunk_rows
    try:
        if _format(path) == "parquet":
            # Without pre-buffering: pyarrow keeps pre-buffered ranges until the file is
            # closed, so memory would grow with the file (measured), not the chunk.
            parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
            try:
                yield from _parquet_chunks(parquet, path, columns, chunk_rows, first_row)
            finally:
                parquet.close()
        else:
            with _open_csv(path, columns, csv_types) as reader:
                yield from _rechunk(
                    _skip_rows(reader, first_row) if first_row else reader, chunk_rows
                )
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read it", [first_line(error)]) from error


def _parquet_chunks(
    parquet: pq.ParquetFile, path: Path, columns: list[str], chunk_rows: int, first_row: int
) -> Iterator[pa.Table]:
    """Plain numeric columns decoded by `parquet_pages` (its Snappy is ~2x faster), the
    others by pyarrow; all by pyarrow, from the chunk it stopped at, where that module
    finds a page it does not decode."""

    def read(names: list[str], start: int) -> Iterator[pa.Table]:
        return _pyarrow_chunks(parquet, names, chunk_rows, start)

    fast = parquet_pages.fast_columns(parquet, columns, first_row)
    if fast:
        try:
            for table in parquet_pages.read_chunks(
                parquet, path, columns, fast, chunk_rows, first_row, read
            ):
                yield table
                first_row += table.num_rows
            return
        except parquet_pages.Unsupported as reason:
            _LOG.debug("%s: read by pyarrow from row %d on: %s", path, first_row, reason)
    yield from read(columns, first_row)


def _pyarrow_chunks(
    parquet: pq.ParquetFile, columns: list[str], chunk_rows: int, first_row: int
) -> Iterator[pa.Table]:
    """The columns from file row ``first_row`` on, read by pyarrow; the row groups before
    it are skipped unread."""
    first_group, skip = parquet_pages.locate_row(parquet.metadata, first_row)
    groups = list(range(first_group, parquet.metadata.num_row_groups)) if first_row else None
    # Decoding on the calling thread: the reader already runs beside the model, and
    # pyarrow's pool cost twice the CPU for the same batches (measured).
    batches = parquet.iter_batches(
        batch_size=chunk_rows, row_groups=groups, columns=columns, use_threads=False
    )
    return _rechunk(_skip_rows(batches, skip) if skip else batches, chunk_rows)


def _open_csv(path: Path, columns: list[str], csv_types: dict[str, pa.DataType]) -> Any:
    return pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        # An empty field is a missing value, for text columns too.
        convert_options=pacsv.ConvertOptions(
            include_columns=columns, column_types=csv_types, strings_can_be_null=True
        ),
    )


def _skip_rows(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches without their first ``rows`` rows."""
    for batch in batches:
        if rows >= batch.num_rows:
            rows -= batch.num_rows
            continue
        yield batch.slice(rows) if rows else batch
        rows = 0


def _rechunk(batches: Iterable[pa.RecordBatch], chunk_rows: int) -> Iterator[pa.Table]:
    """Regroup record batches of any size into tables of ``chunk_rows`` rows, without copying."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, chunk_rows)
            rest = table.slice(chunk_rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


class _Prefetch:
    """Runs an iterator in a background thread, ``depth`` items ahead of the consumer.

    pyarrow releases the GIL while it reads and decodes, so reading the next chunk
    overlaps with the model working on this one. Errors are raised in the consumer.
    """

    def __init__(self, iterator: Iterator[Any], depth: int) -> None:
        self._iterator = iterator
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        #: Set once the iterator is exhausted: what is left is queued, the thread idles.
        self.exhausted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stemma-score-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._iterator:
                if not self._put(("item", item)):
                    return
            self.exhausted.set()
            self._put(("end", None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(("error", error))
        finally:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()

    def _put(self, message: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        """Stop the thread and drop what it read ahead."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
        self._thread.join()


# ---------------------------------------------------------------------------------------
# Writing the output


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_atomically(path: Path, data: Any, *, sync_folder: bool = True) -> None:
    """Write bytes so that ``path`` never names a partial file: temp file, fsync, rename.

    Args:
        path: the file to write.
        data: bytes or any buffer.
        sync_folder: fsync the folder too, so that the rename itself survives a power
            loss. Parts skip it: the folders are synced once before the manifest is
            written, which is all the ordering a crash needs (a part whose rename was
            lost is scored again on resume).
    """
    temporary = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(handle, view)
            view = view[written:]
        os.fsync(handle)
    except BaseException:
        os.close(handle)
        temporary.unlink(missing_ok=True)
        raise
    os.close(handle)
    os.replace(temporary, path)
    if sync_folder:
        _fsync_folder(path.parent)


def _json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How a part's columns are encoded, for what they hold.

    Integer columns are delta-encoded and not compressed: sequential ids take a few bits
    each, and a 0/1 prediction two, at a third of the cost of a dictionary (measured on
    1M rows: 18 ms with a dictionary, 8 ms delta-encoded). Floats (scores) are
    near-unique: stored plain, uncompressed, as Snappy found nothing in them and cost 40%
    of the time to encode a part. The rejects' reasons repeat: dictionary-encoded and
    compressed. Other columns keep pyarrow's defaults, without trying a dictionary
    (string ids are near-unique too). Min/max statistics are kept for every column but
    the prediction and the score, whose ranges are the same in every part (0 to 1), so
    they could not let a reader skip one: they took 20% of the time to encode a part.
    """
    encoding: dict[str, str] = {}
    compression: dict[str, str] = {}
    for column in schema:
        if pa.types.is_integer(column.type):
            encoding[column.name], compression[column.name] = "DELTA_BINARY_PACKED", "none"
        elif pa.types.is_floating(column.type):
            encoding[column.name], compression[column.name] = "PLAIN", "none"
        else:
            compression[column.name] = "snappy"
    return {
        "write_statistics": [
            name for name in schema.names if name not in (PREDICTION_COLUMN, SCORE_COLUMN)
        ],
        "use_dictionary": [REASON_COLUMN] if REASON_COLUMN in schema.names else [],
        "compression": compression,
        "column_encoding": encoding or None,
    }


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A whole part's Parquet bytes (a rejects part), encoded by :func:`_parquet_options`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **_parquet_options(table.schema))
    return sink.getvalue()


def _write_part(path: Path, payload: pa.Buffer, rows: int) -> dict[str, Any]:
    entry = {
        "name": path.name,
        "rows": rows,
        "sha256": hashlib.sha256(memoryview(payload)).hexdigest(),
    }
    _write_atomically(path, payload, sync_folder=False)
    return entry


def _write_chunk(
    output_dir: Path, name: str, scored: pa.Buffer, rows: int, rejects: pa.Table | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write a chunk's rejects part (or remove a stale one), then its scored part (its
    Parquet bytes, holding ``rows`` rows)."""
    rejects_path = output_dir / REJECTS_DIR / name
    reject_entry = None
    if rejects is not None:
        rejects_path.parent.mkdir(exist_ok=True)
        reject_entry = _write_part(rejects_path, _parquet_bytes(rejects), rejects.num_rows)
    else:
        rejects_path.unlink(missing_ok=True)
    return _write_part(output_dir / name, scored, rows), reject_entry


def _existing_part(path: Path) -> dict[str, Any]:
    return {
        "name": path.name,
        "rows": pq.ParquetFile(path).metadata.num_rows,
        "sha256": sha256_file(path),
    }


def _part_fingerprint(path: Path) -> str | None:
    """The fingerprint a part was written under, or None when it is unreadable."""
    try:
        recorded = pq.ParquetFile(path).schema_arrow.metadata or {}
    except (pa.ArrowException, OSError):
        return None
    value = recorded.get(f"{METADATA_PREFIX}fingerprint".encode())
    return value.decode() if value is not None else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


# ---------------------------------------------------------------------------------------
# The output folder: fresh, complete, resumable or stale


def _is_ours(entry: Path, *, top: bool) -> bool:
    name = entry.name
    if name.startswith(TEMP_PREFIX):
        return True
    if _PART.match(name) and entry.is_file():
        return True
    return top and (
        (name == REJECTS_DIR and entry.is_dir())
        or (name in (PROGRESS_FILE, SUCCESS_FILE) and entry.is_file())
        or (locks.is_lock_entry(name) and entry.is_file())
    )


def _foreign_entries(output_dir: Path) -> list[str]:
    foreign = [entry.name for entry in output_dir.iterdir() if not _is_ours(entry, top=True)]
    rejects = output_dir / REJECTS_DIR
    if rejects.is_dir():
        foreign += [
            f"{REJECTS_DIR}/{entry.name}"
            for entry in rejects.iterdir()
            if not _is_ours(entry, top=False)
        ]
    return sorted(foreign)


def _remove_temporaries(output_dir: Path) -> None:
    """Remove temporary files whose writer is gone; a live writer's are left to it."""
    for folder in (output_dir, output_dir / REJECTS_DIR):
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith(TEMP_PREFIX) and not _writer_lives(entry.name):
                    entry.unlink(missing_ok=True)


def _writer_lives(name: str) -> bool:
    """Whether the process named in a temporary file's name (``.tmp-<pid>-...``) still runs
    here. A Dask worker of a job that has stopped may still be finishing a part."""
    pid = name[len(TEMP_PREFIX) :].partition("-")[0]
    return pid.isdigit() and locks.process_is_alive(int(pid))


def _invalidate(output_dir: Path, recorded: str | None) -> None:
    """Remove an earlier scoring's output; the manifest first, so it never outlives a part."""
    parts = sorted(entry.name for entry in output_dir.iterdir() if _PART.match(entry.name))
    _LOG.warning(
        "%s holds the output of another scoring (fingerprint %s): removing %s, its rejects and manifest",
        output_dir,
        (recorded or "unknown")[:12],
        _plural(len(parts), "part"),
    )
    (output_dir / SUCCESS_FILE).unlink(missing_ok=True)
    for name in parts:
        (output_dir / name).unlink()
    shutil.rmtree(output_dir / REJECTS_DIR, ignore_errors=True)
    _remove_temporaries(output_dir)
    (output_dir / PROGRESS_FILE).unlink(missing_ok=True)


def _holds_output(output_dir: Path) -> bool:
    """Whether the output folder holds anything (only ever what Stemma writes there).

    Raises:
        DataError: the output is a file, or the folder holds files Stemma did not write
            (nothing is removed then).
    """
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise DataError(f"{output_dir}: the output exists and is not a folder")
    foreign = _foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:MAX_NAMED]) + (
            f" and {len(foreign) - MAX_NAMED} more" if len(foreign) > MAX_NAMED else ""
        )
        raise DataError(
            f"{output_dir}: refusing to score into a folder that holds files Stemma did not write",
            [shown, "choose an empty or new folder for score.output (or --output), or move them"],
        )
    return any(not locks.is_lock_entry(entry.name) for entry in output_dir.iterdir())


def _prepare_output(output_dir: Path, fingerprint: str) -> tuple[str, bool, dict[str, Any] | None]:
    """Decide what to do with an output folder that holds Stemma's files.

    Returns:
        ``complete`` (this scoring is there, whole), ``resume`` (this scoring was
        interrupted) or ``fresh`` (another scoring's output was removed); whether output
        was removed; and the manifest when complete.
    """
    manifest = _read_json(output_dir / SUCCESS_FILE)
    progress = _read_json(output_dir / PROGRESS_FILE)
    recorded = (manifest or progress or {}).get("fingerprint")
    if manifest is not None and recorded == fingerprint:
        damaged = _damaged_parts(output_dir, manifest)
        if not damaged:
            return "complete", False, manifest
        # A manifest whose parts changed cannot be trusted: it goes first, then the chunks
        # whose parts differ, which are scored again; the parts that match are resumed.
        _LOG.warning(
            "%s: %s no longer %s what the manifest recorded (%s): scoring %s again",
            output_dir,
            _plural(len(damaged), "part"),
            "matches" if len(damaged) == 1 else "match",
            ", ".join(
                f"{name}: {problem}" for name, problem in sorted(damaged.items())[:MAX_NAMED]
            ),
            "it" if len(damaged) == 1 else "them",
        )
        (output_dir / SUCCESS_FILE).unlink()
        _remove_chunks(output_dir, damaged)
    if recorded == fingerprint:
        _remove_temporaries(output_dir)
        return "resume", False, None
    _invalidate(output_dir, recorded)
    return "fresh", True, None


def _part_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """How a part on disk differs from its manifest entry (read back whole), or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        return f"sha256 {digest[:12]}, recorded {str(entry.get('sha256'))[:12]}"
    try:
        rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    except (pa.ArrowException, OSError):
        return "not a Parquet file"
    if rows != entry.get("rows"):
        return f"{rows} rows, recorded {entry.get('rows')}"
    return None


def _remove_chunks(output_dir: Path, names: Iterable[str]) -> None:
    """Remove the parts of these chunks (names as :func:`_damaged_parts` gives them), the
    rejects part first, so that a rerun scores the chunks again."""
    for name in names:
        chunk = name.removeprefix(f"{REJECTS_DIR}/")
        (output_dir / REJECTS_DIR / chunk).unlink(missing_ok=True)
        (output_dir / chunk).unlink(missing_ok=True)


def _damaged_parts(output_dir: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """The parts (and rejects parts, as ``rejects/<name>``) that differ from the manifest.

    Every part is read back and hashed (in threads: hashlib releases the GIL), so a part
    changed, truncated or replaced since it was written is found, not trusted.
    """
    listed = [(part["name"], output_dir / part["name"], part) for part in manifest.get("parts", [])]
    listed += [
        (f"{REJECTS_DIR}/{part['name']}", output_dir / REJECTS_DIR / part["name"], part)
        for part in manifest.get("rejects", [])
    ]
    if not listed:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(listed), os.cpu_count() or 1)) as pool:
        problems = pool.map(lambda item: _part_problem(item[1], item[2]), listed)
        return {
            name: problem
            for (name, _, _), problem in zip(listed, problems, strict=True)
            if problem is not None
        }


# ---------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class ScoringResult:
    """What a call to :func:`score_files` did, and what the output folder holds.

    Attributes:
        output_dir: the output folder.
        manifest_path: its ``_SUCCESS`` manifest.
        manifest: the manifest's content.
        rows_input: rows in the input.
        rows_scored: rows in the scored parts.
        rows_rejected: rows in the rejects parts.
        parts_written: parts scored and written by this call.
        parts_skipped: parts an interrupted run had already written (resumed).
        already_complete: the folder already held this scoring; nothing was done.
        invalidated: the folder held another scoring's output (another model, input or
            settings), which was removed.
        extra_columns: input columns the model does not use (ignored).
        seconds: wall time of the call.
        rows_per_second: rows of the chunks scored by this call per second of wall time.
        chunk_latency_ms: ``p50``, ``p95`` and ``p99`` of the preprocessing plus model time
            per chunk scored by this call (empty when none was).
        score_histogram: ``edges`` and ``counts`` of the scores (also in the manifest).
        output_digest: sha256 of the manifest's bytes, a digest of the whole output.
    """

    output_dir: Path
    manifest_path: Path
    manifest: dict[str, Any]
    rows_input: int
    rows_scored: int
    rows_rejected: int
    parts_written: int
    parts_skipped: int
    already_complete: bool
    invalidated: bool
    extra_columns: list[str]
    seconds: float
    rows_per_second: float
    chunk_latency_ms: dict[str, float]
    score_histogram: dict[str, list[Any]]
    output_digest: str

    def summary(self) -> str:
        """One line for the end of a run."""
        model = self.manifest["model"]
        label = f"{model['name']} v{model['version']}"
        parts = _plural(len(self.manifest["parts"]), "part")
        if self.already_complete:
            return (
                f"{self.output_dir} already holds the scores of {label} for this input "
                f"({self.rows_scored:,} rows scored, {self.rows_rejected:,} rejected, {parts}): "
                "nothing to do"
            )
        resumed = f", {self.parts_skipped} resumed" if self.parts_skipped else ""
        return (
            f"scored {self.rows_scored:,} rows ({self.rows_rejected:,} rejected) with {label} "
            f"in {self.seconds:.1f} s ({_rate(self.rows_per_second)} rows/s) -> "
            f"{self.output_dir} ({parts}{resumed})"
        )


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


@dataclass
class _Tally:
    """What the scoring loop has produced so far."""

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejects: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows_per_file: list[int] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64))
    latencies: list[float] = field(default_factory=list)
    rows_this_call: int = 0
    written: int = 0
    skipped: int = 0


def default_model_threads() -> int:
    """Threads for the model by default while the input is read: one per core but one.

    The reader, the input's hasher and the writer run beside the model and together keep
    about one core busy; a model thread on that core too slowed the whole run down
    (measured on 2 cores: 10M rows in 2.20 s with one model thread, 2.61 s with two).
    Once the input is all read, the chunks left run on one thread per core: on 2 cores,
    1M rows in 200,000-row chunks took about 15% less time than with one model thread
    throughout.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def score_files(
    model: ScoringModel,
    files: Sequence[Path],
    output_dir: Path,
    *,
    id_column: str | None,
    chunk_rows: int,
    invalid_rows: str = "reject",
    unknown_categories: str = "reject",
    threads: int | None = None,
    progress: bool | None = None,
    lock_wait_seconds: float = 0.0,
) -> ScoringResult:
    """Score files chunk by chunk into Parquet parts, resuming an interrupted run.

    The schemas are checked first (:func:`check_input_schema`, extra columns ignored).
    Then each file is read ``chunk_rows`` rows at a time; chunk ``k`` of file ``f`` becomes
    ``part-<f>-<k>.parquet`` with the id column, ``prediction`` (binary) and ``score``, in
    input order, and its rows that cannot be scored go to ``rejects/part-<f>-<k>.parquet``
    with a ``reason`` (or stop the run, per the policies). The manifest ``_SUCCESS`` is
    written last.

    The output folder is keyed by a fingerprint of the model version, its weights, the
    input's digest and the settings: a folder complete for the same fingerprint is left as
    it is; an interrupted one is resumed from its parts; one holding another fingerprint's
    output is emptied first. Into an empty folder, scoring starts while the input is still
    being hashed, and nothing is written before the fingerprint is known.

    The call holds the folder's lock (:class:`.locks.FolderLock`) throughout: another
    scoring into the same folder is refused, naming this one. A complete folder is read
    back and checked against its manifest before it is reported complete; the manifest is
    written only after every part has been read back and matches what was written.

    Args:
        model: from :func:`load_scoring_model`.
        files: from :func:`input_files`.
        output_dir: the output folder (created when missing).
        id_column: the column copied to the output to identify rows, or None.
        chunk_rows: rows per chunk (and per part): bounds memory.
        invalid_rows: ``reject`` or ``error`` for rows with a missing or non-finite value
            (and a missing category).
        unknown_categories: ``reject``, ``error``, or ``score`` (encoded as unseen).
        threads: threads running the model (default: :func:`default_model_threads`, then
            one per core once the input is all read); each runs the network on its own
            batches with one torch thread (see :func:`_forward`), so the output does not
            depend on it. torch's thread setting is restored afterwards.
        progress: show a progress bar; None shows one when stderr is a terminal.
        lock_wait_seconds: how long to wait for another scoring that holds the folder
            (0: refuse at once).

    Returns:
        What was done and what the folder holds.

    Raises:
        DataError: a schema problem, an unreadable file, a row that cannot be scored under
            an ``error`` policy (naming file, rows and reasons), an output folder that
            holds files Stemma did not write or lies around the input, or a part that no
            longer matches what was written (it is removed: a rerun scores it again).
        FolderBusyError: another live process is writing into the folder (it is named).
        ValueError: an unknown policy, or a chunk size or thread count below 1.
    """
    started = time.perf_counter()
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    opened = _open_output(
        model,
        files,
        output_dir,
        id_column=id_column,
        chunk_rows=chunk_rows,
        invalid_rows=invalid_rows,
        unknown_categories=unknown_categories,
        lock_wait_seconds=lock_wait_seconds,
    )
    try:
        return _score_opened(
            model,
            opened,
            started,
            id_column=id_column,
            chunk_rows=chunk_rows,
            threads=threads,
            progress=progress,
        )
    finally:
        opened.release()


def _score_opened(
    model: ScoringModel,
    opened: _Opened,
    started: float,
    *,
    id_column: str | None,
    chunk_rows: int,
    threads: int | None,
    progress: bool | None,
) -> ScoringResult:
    """The part of :func:`score_files` done under the folder's lock."""
    import torch

    if opened.manifest is not None:
        return _result(
            opened.output_dir,
            opened.manifest,
            _Tally(),
            started,
            opened.extras,
            opened.invalidated,
            already_complete=True,
        )

    _raise_malloc_mmap_threshold()
    tally = _Tally(rows_per_file=[0] * len(opened.files))
    previous_threads = torch.get_num_threads()
    # Each model thread runs the network on its own batches, single-threaded (see _forward).
    torch.set_num_threads(1)
    try:
        _score_chunks(
            model,
            opened.files,
            opened.output_dir,
            tally,
            opened.hashing,
            done=opened.done,
            id_column=id_column,
            chunk_rows=chunk_rows,
            policies=opened.policies,
            show=sys.stderr.isatty() if progress is None else progress,
            workers=threads or default_model_threads(),
            tail_workers=threads or os.cpu_count() or 1,
        )
    finally:
        torch.set_num_threads(previous_threads)
    return _publish(
        model, opened, tally, id_column=id_column, chunk_rows=chunk_rows, started=started
    )


@dataclass(frozen=True)
class _Opened:
    """An output folder made ready for a scoring: checked, and emptied or resumed."""

    files: list[Path]
    output_dir: Path
    extras: list[str]
    policies: dict[str, str]
    hashing: Future[_Identity]
    invalidated: bool
    done: set[str]  # parts an interrupted run of the same scoring finished
    manifest: dict[str, Any] | None  # the manifest, when the folder is already complete
    lock: locks.FolderLock | None  # held by this process until the caller releases it

    def release(self) -> None:
        """Give the folder's lock back (when this process holds it)."""
        if self.lock is not None:
            self.lock.release()


def _open_output(
    model: ScoringModel,
    files: Sequence[Path],
    output_dir: Path,
    *,
    id_column: str | None,
    chunk_rows: int,
    invalid_rows: str,
    unknown_categories: str,
    lock_wait_seconds: float = 0.0,
) -> _Opened:
    """Check the arguments and the input's schemas, take the folder's lock, then decide
    what the folder needs. The caller releases ``lock`` of the result.

    Hashing the input starts in the background; it is waited for only when the folder
    already holds output (to tell whether it belongs to this scoring).
    """
    _check_policy("invalid_rows", invalid_rows, INVALID_ROW_POLICIES)
    _check_policy("unknown_categories", unknown_categories, UNKNOWN_CATEGORY_POLICIES)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if id_column in (PREDICTION_COLUMN, SCORE_COLUMN):
        raise DataError(f"the id column cannot be called {id_column!r}: the output uses that name")
    files = [Path(path) for path in files]
    if not files:
        raise DataError("nothing to score: no input files")
    output_dir = Path(output_dir)
    _refuse_output_around_input(files, output_dir)
    extras = check_input_schema(files, model, id_column=id_column, extra_columns="ignore")
    policies = {"invalid_rows": invalid_rows, "unknown_categories": unknown_categories}

    _holds_output(output_dir)  # refuses a folder with foreign files before taking it
    lock = locks.FolderLock(
        output_dir, purpose=f"scoring with {model.label}", wait_seconds=lock_wait_seconds
    ).acquire()
    try:
        # Looked at again under the lock: a scoring that held it may have written since.
        holds_output = _holds_output(output_dir)
        # Hashing the input reads all of it once; it runs beside the scoring when it can.
        hashing = _in_background(_identify, model, files, chunk_rows, id_column, policies)
        invalidated = False
        done: set[str] = set()
        manifest = None
        if holds_output:
            identity = hashing.result()
            state, invalidated, manifest = _prepare_output(output_dir, identity.fingerprint)
            if state == "resume":
                done = _finished_parts(output_dir, identity.fingerprint)
    except BaseException:
        lock.release()
        raise
    return _Opened(files, output_dir, extras, policies, hashing, invalidated, done, manifest, lock)


def _publish(
    model: ScoringModel,
    opened: _Opened,
    tally: _Tally,
    *,
    id_column: str | None,
    chunk_rows: int,
    started: float,
) -> ScoringResult:
    """Check the tally, then write the manifest that lists every part: the output is done."""
    files, output_dir, policies = opened.files, opened.output_dir, opened.policies
    identity = opened.hashing.result()
    _remove_strays(output_dir, tally)

    rows_scored = sum(entry["rows"] for entry in tally.parts.values())
    rows_rejected = sum(entry["rows"] for entry in tally.rejects.values())
    rows_input = sum(tally.rows_per_file)
    if rows_scored + rows_rejected != rows_input:  # an invariant, checked before it is published
        raise RuntimeError(
            f"scoring lost track of rows: {rows_input} read, {rows_scored} scored, "
            f"{rows_rejected} rejected"
        )
    if model.task == "binary":
        histogram = {
            "edges": _UNIT_EDGES.tolist(),
            "counts": tally.counts.tolist(),
        }
    else:
        histogram = _value_histogram([output_dir / name for name in sorted(tally.parts)])
    manifest = {
        "format": OUTPUT_FORMAT,
        "fingerprint": identity.fingerprint,
        "model": {
            "reference": model.reference,
            "uri": model.model_uri,
            "name": model.name,
            "version": model.version,
            "alias": model.alias,
            "run_id": model.run_id,
            "weights_sha256": model.weights_sha256,
            "task": model.task,
            "threshold": model.threshold,
        },
        "input": {
            "digest": identity.digest,
            "files": [
                {"path": str(path), "name": path.name, "md5": md5, "rows": rows}
                for path, md5, rows in zip(files, identity.md5s, tally.rows_per_file, strict=True)
            ],
        },
        "id_column": id_column,
        "chunk_rows": chunk_rows,
        "policies": policies,
        "columns": _output_columns(model, id_column),
        "parts": [tally.parts[name] for name in sorted(tally.parts)],
        "rejects": [tally.rejects[name] for name in sorted(tally.rejects)],
        "rows": {"input": rows_input, "scored": rows_scored, "rejected": rows_rejected},
        "score_histogram": histogram,
        "stemma_version": _stemma_version(),
    }
    # The parts' renames are made durable before the manifest that lists them.
    for folder in (output_dir / REJECTS_DIR, output_dir):
        if folder.is_dir():
            _fsync_folder(folder)
    # Read back from disk: the manifest vouches only for the bytes that are there.
    damaged = _damaged_parts(output_dir, manifest)
    if damaged:
        _remove_chunks(output_dir, damaged)
        raise DataError(
            f"{output_dir}: {_plural(len(damaged), 'part')} read back from disk "
            "differ from what was written; no manifest was written",
            [
                *(f"{name}: {problem}" for name, problem in sorted(damaged.items())[:MAX_NAMED]),
                "they were removed: run the scoring again to score those chunks again",
            ],
        )
    _write_atomically(output_dir / SUCCESS_FILE, _json_bytes(manifest))
    return _result(
        output_dir,
        manifest,
        tally,
        started,
        opened.extras,
        opened.invalidated,
        already_complete=False,
    )


# ---------------------------------------------------------------------------------------
# Fanning out: the same scoring, split into ranges of chunks that separate processes score


@dataclass(frozen=True)
class ChunkRange:
    """Chunks ``first_chunk`` to ``stop_chunk - 1`` of input file ``file_index``.

    ``stop_chunk`` None runs to the end of the file. A part's name and bytes depend only
    on its file and chunk numbers, so any split of the chunks into ranges writes the same
    output as :func:`score_files`.
    """

    file_index: int
    first_chunk: int = 0
    stop_chunk: int | None = None


@dataclass(frozen=True)
class ScoringPlan:
    """A scoring whose output folder is ready for its ranges to be scored anywhere.

    Made by :func:`plan_scoring`; small and picklable, so it travels to other processes.

    Attributes:
        files: the input files, in part-number order.
        output_dir: the output folder; ``_PROGRESS.json`` is already written there.
        id_column: the column copied to the output, or None.
        chunk_rows: rows per chunk.
        policies: ``invalid_rows`` and ``unknown_categories``.
        extras: input columns the model does not use.
        identity: the input's digests and the fingerprint every part carries.
        invalidated: another scoring's output was removed from the folder.
        done: parts an interrupted run of this scoring finished (they are not rescored).
        manifest: the manifest, when the folder already holds this scoring whole.
        started: ``time.perf_counter()`` when planning began (in the planning process).
        lock_token: names the folder's lock the planning process holds for the whole
            job (None when complete); ranges refuse to write unless it still holds.
    """

    files: tuple[Path, ...]
    output_dir: Path
    id_column: str | None
    chunk_rows: int
    policies: dict[str, str]
    extras: tuple[str, ...]
    identity: _Identity
    invalidated: bool
    done: frozenset[str]
    manifest: dict[str, Any] | None
    started: float
    lock_token: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the folder already holds this scoring: nothing to do."""
        return self.manifest is not None


@dataclass(frozen=True)
class RangeResult:
    """What scoring one :class:`ChunkRange` wrote (or found finished), for the manifest."""

    chunk_range: ChunkRange
    parts: dict[str, dict[str, Any]]
    rejects: dict[str, dict[str, Any]]
    rows: int  # input rows of the range's chunks
    counts: np.ndarray  # score histogram counts (binary)
    latencies: list[float]
    rows_scored_now: int  # rows of the chunks scored by this call (not resumed)
    written: int
    skipped: int


def plan_scoring(
    model: ScoringModel,
    files: Sequence[Path],
    output_dir: Path,
    *,
    id_column: str | None,
    chunk_rows: int,
    invalid_rows: str = "reject",
    unknown_categories: str = "reject",
    lock_wait_seconds: float = 0.0,
) -> ScoringPlan:
    """Everything :func:`score_files` does before its first chunk, for a fanned-out run.

    Checks the arguments and every file's schema, takes the folder's lock, hashes the
    input, then leaves the output folder as :func:`score_files` would: complete (nothing to
    do; the lock is given back at once), resumed (its finished parts are listed in
    ``done``), or emptied of another scoring's output, with the fingerprint in
    ``_PROGRESS.json`` before any part is written.

    This process holds the lock for the whole job, until :func:`finish_scoring` (or
    :func:`abandon_scoring`); the ranges, in any process, write under it. If this process
    dies, the lock is stale and the next scoring takes it over.

    Raises:
        DataError: as :func:`score_files`.
        FolderBusyError: another live process is writing into the folder.
        ValueError: an unknown policy, or a chunk size below 1.
    """
    started = time.perf_counter()
    opened = _open_output(
        model,
        files,
        output_dir,
        id_column=id_column,
        chunk_rows=chunk_rows,
        invalid_rows=invalid_rows,
        unknown_categories=unknown_categories,
        lock_wait_seconds=lock_wait_seconds,
    )
    try:
        if opened.manifest is None:
            _write_progress(opened.output_dir, opened.hashing)
        opened.hashing.result()
    except BaseException:
        opened.release()
        raise
    lock_token = None
    if opened.manifest is None and opened.lock is not None:
        lock_token = opened.lock.token
        with _JOB_LOCKS_GUARD:
            _JOB_LOCKS[lock_token] = opened.lock
    else:
        opened.release()  # nothing will be written
    return ScoringPlan(
        files=tuple(opened.files),
        output_dir=opened.output_dir,
        id_column=id_column,
        chunk_rows=chunk_rows,
        policies=opened.policies,
        extras=tuple(opened.extras),
        identity=opened.hashing.result(),
        invalidated=opened.invalidated,
        done=frozenset(opened.done),
        manifest=opened.manifest,
        started=started,
        lock_token=lock_token,
    )


#: Folder locks :func:`plan_scoring` took in this process, by token, until the job ends.
_JOB_LOCKS: dict[str, locks.FolderLock] = {}
_JOB_LOCKS_GUARD = threading.Lock()


def abandon_scoring(plan: ScoringPlan) -> None:
    """End a fanned-out job without a manifest: give the folder's lock back.

    The parts written so far stay; the next scoring of the folder resumes from them.
    Call it in the planning process when the job fails or is stopped. Does nothing for a
    complete plan, or one already finished or abandoned.
    """
    if plan.lock_token is None:
        return
    with _JOB_LOCKS_GUARD:
        lock = _JOB_LOCKS.pop(plan.lock_token, None)
    if lock is not None:
        lock.release()


def plan_ranges(plan: ScoringPlan, chunks_per_range: int) -> list[ChunkRange]:
    """Split the plan's chunks into ranges of at most ``chunks_per_range`` chunks.

    A Parquet file is split by its row count (its footer says how many chunks it has, and
    a range starts reading at the row group of its first chunk); a CSV file is one range,
    since reaching a chunk means reading every row before it.
    """
    if chunks_per_range < 1:
        raise ValueError(f"chunks_per_range must be at least 1, got {chunks_per_range}")
    ranges = []
    for index, path in enumerate(plan.files):
        if _format(path) != "parquet":
            ranges.append(ChunkRange(index))
            continue
        chunks = -(-pq.read_metadata(path).num_rows // plan.chunk_rows)
        for first in range(0, max(chunks, 1), chunks_per_range):
            stop = first + chunks_per_range
            ranges.append(ChunkRange(index, first, stop if stop < chunks else None))
    return ranges


def score_range(
    model: ScoringModel, plan: ScoringPlan, chunk_range: ChunkRange, *, threads: int = 1
) -> RangeResult:
    """Score one range of a plan's chunks into the plan's folder, each part atomically.

    Parts of the range that an interrupted run finished (``plan.done``) are counted, not
    rescored. Ranges of one plan may run at the same time in different processes: they
    write different parts.

    Args:
        model: the plan's model (its fingerprint must match the plan's).
        plan: from :func:`plan_scoring`, not complete.
        chunk_range: which chunks.
        threads: threads running the network, each with one torch thread.

    Raises:
        DataError: an unreadable file or a row that cannot be scored under an ``error`` policy.
        ValueError: the plan is complete, belongs to another model, or the range is outside it.
    """
    import torch

    if plan.complete:
        raise ValueError(f"{plan.output_dir} already holds this scoring: nothing to score")
    expected = _fingerprint(
        model, plan.identity.digest, plan.chunk_rows, plan.id_column, plan.policies
    )
    if expected != plan.identity.fingerprint:
        raise ValueError(
            f"the plan for {plan.output_dir} was made for another model than {model.label}"
        )
    if not 0 <= chunk_range.file_index < len(plan.files) or chunk_range.first_chunk < 0:
        raise ValueError(f"{chunk_range} is outside the plan's {len(plan.files)} files")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if plan.lock_token is not None:
        locks.check_holder(plan.output_dir, plan.lock_token)
    hashing: Future[_Identity] = Future()
    hashing.set_result(plan.identity)
    _raise_malloc_mmap_threshold()
    tally = _Tally(rows_per_file=[0] * len(plan.files))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _score_chunks(
            model,
            list(plan.files),
            plan.output_dir,
            tally,
            hashing,
            done=set(plan.done),
            id_column=plan.id_column,
            chunk_rows=plan.chunk_rows,
            policies=plan.policies,
            show=False,
            workers=threads,
            ranges=[chunk_range],
        )
    finally:
        torch.set_num_threads(previous_threads)
    return RangeResult(
        chunk_range=chunk_range,
        parts=tally.parts,
        rejects=tally.rejects,
        rows=tally.rows_per_file[chunk_range.file_index],
        counts=tally.counts,
        latencies=tally.latencies,
        rows_scored_now=tally.rows_this_call,
        written=tally.written,
        skipped=tally.skipped,
    )


def finish_scoring(
    model: ScoringModel, plan: ScoringPlan, results: Sequence[RangeResult]
) -> ScoringResult:
    """Write the manifest of a fanned-out scoring once every range is scored.

    The manifest is the one :func:`score_files` writes for the same scoring, byte for byte.
    The job's lock is given back whatever the outcome.

    Raises:
        DataError: a part read back differs from what its range wrote.
        ValueError: the results do not cover every chunk of every file exactly once.
    """
    try:
        return _finish_plan(model, plan, results)
    finally:
        abandon_scoring(plan)


def _finish_plan(
    model: ScoringModel, plan: ScoringPlan, results: Sequence[RangeResult]
) -> ScoringResult:
    if plan.manifest is not None:
        return _result(
            plan.output_dir,
            plan.manifest,
            _Tally(),
            plan.started,
            list(plan.extras),
            plan.invalidated,
            already_complete=True,
        )
    _check_coverage(plan, [result.chunk_range for result in results])
    hashing: Future[_Identity] = Future()
    hashing.set_result(plan.identity)
    opened = _Opened(
        files=list(plan.files),
        output_dir=plan.output_dir,
        extras=list(plan.extras),
        policies=plan.policies,
        hashing=hashing,
        invalidated=plan.invalidated,
        done=set(plan.done),
        manifest=None,
        lock=None,  # the job's, held by the planning process
    )
    tally = _Tally(rows_per_file=[0] * len(plan.files))
    for result in results:
        tally.parts.update(result.parts)
        tally.rejects.update(result.rejects)
        tally.rows_per_file[result.chunk_range.file_index] += result.rows
        tally.counts += result.counts
        tally.latencies.extend(result.latencies)
        tally.rows_this_call += result.rows_scored_now
        tally.written += result.written
        tally.skipped += result.skipped
    return _publish(
        model,
        opened,
        tally,
        id_column=plan.id_column,
        chunk_rows=plan.chunk_rows,
        started=plan.started,
    )


def _check_coverage(plan: ScoringPlan, ranges: Sequence[ChunkRange]) -> None:
    """Each file's ranges must run from chunk 0 to its end without gap or overlap."""
    for index, path in enumerate(plan.files):
        mine = sorted(
            (item for item in ranges if item.file_index == index), key=lambda r: r.first_chunk
        )
        position: int | None = 0
        for item in mine:
            if position is None or item.first_chunk != position:
                break
            position = item.stop_chunk
        else:
            if mine and position is None:
                continue
        raise ValueError(f"the scored ranges do not cover {path.name} exactly once: {mine}")


_MALLOC_THRESHOLD_RAISED = threading.Event()


def _raise_malloc_mmap_threshold() -> None:
    """Let glibc serve the model's per-batch buffers from its heap instead of fresh maps.

    glibc's malloc maps every block above its mmap threshold (128 KiB at start) afresh
    and unmaps it when freed, so every 1-2 MiB activation of a forward pass faults its
    pages in again; the threshold rises only when a larger mapped block is freed. Freeing
    one untouched block just under glibc's 32 MiB cap raises it at once, as the end of
    the first scoring in a process otherwise would. Measured on 10M rows in a fresh
    process: 1.6M fewer page faults and 3.8 s less system time. The block's pages are
    never touched, so it costs nothing; other allocators are unaffected.

    Once per process: the threshold never falls again, and once it is raised the block
    comes from the heap, whose release trims the heap's touched top (5-10 ms of CPU per
    call, measured between runs on 1M rows), to be faulted in again by the next run.
    """
    if _MALLOC_THRESHOLD_RAISED.is_set():
        return
    np.empty(MALLOC_WARMUP_BYTES, dtype=np.uint8)
    _MALLOC_THRESHOLD_RAISED.set()


@dataclass(frozen=True)
class _Identity:
    """What the output's bytes depend on, known once the input is hashed."""

    digest: str
    md5s: list[str]
    fingerprint: str
    metadata: dict[str, str]  # key-value metadata of every part, without the input file


def _identify(
    model: ScoringModel,
    files: list[Path],
    chunk_rows: int,
    id_column: str | None,
    policies: dict[str, str],
) -> _Identity:
    try:
        digest, md5s = input_digest(files)
    except OSError as error:
        raise DataError("cannot read the input to hash it", [first_line(error)]) from error
    fingerprint = _fingerprint(model, digest, chunk_rows, id_column, policies)
    metadata = {
        "model_uri": model.model_uri,
        "model_version": model.version,
        "weights_sha256": model.weights_sha256,
        "input_digest": digest,
        "fingerprint": fingerprint,
    }
    return _Identity(digest, md5s, fingerprint, metadata)


def _in_background(function: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``function(*args)`` in a daemon thread (which never delays the interpreter's exit)."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as error:  # delivered to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name="stemma-score-hash", daemon=True).start()
    return future


@dataclass(frozen=True)
class _ChunkScores:
    """A chunk on its way to the writer, whose scores may still be coming."""

    name: str
    input_file: str
    rows: int  # rows of the chunk, scored or rejected
    ids: pa.ChunkedArray | None  # the id column of every row (not the whole chunk)
    keep: np.ndarray | None  # rows scored, when some were rejected
    scores: _Scores  # float64 scores of the kept rows, batch by batch
    began: float  # when the chunk's checks began (time.perf_counter), for its latency
    rejects: dict[str, Any] | None  # columns of the rejects part


def _score_chunks(
    model: ScoringModel,
    files: list[Path],
    output_dir: Path,
    tally: _Tally,
    hashing: Future[_Identity],
    *,
    done: set[str],
    id_column: str | None,
    chunk_rows: int,
    policies: dict[str, str],
    show: bool,
    workers: int,
    tail_workers: int | None = None,
    ranges: Sequence[ChunkRange] | None = None,
) -> None:
    """The loop: read ahead in one thread; check and look up each chunk here; encode and
    run the network in ``workers`` threads, or ``tail_workers`` (default ``workers``) once
    the input is all read and the reader's core is free; tabulate and write in one more.
    ``ranges`` limits it to those chunks (default: every chunk of every file)."""
    from tqdm import tqdm

    encoder = _ChunkEncoder(model.preprocessor)
    run_network = network_runner(model.network, model.preprocessor.n_inputs)
    kernel = one_hot_kernel(model.network, model.preprocessor)
    columns = _read_columns(model, id_column)
    signature = dict(model.signature_columns)
    csv_types = {
        name: _CSV_TYPES[signature[name]]
        for name in model.feature_columns
        if signature.get(name) in _CSV_TYPES
    }

    def chunks() -> Iterator[tuple[int, int, pa.Table]]:
        for part in ranges if ranges is not None else map(ChunkRange, range(len(files))):
            first = part.first_chunk
            tables = _file_chunks(files[part.file_index], columns, chunk_rows, csv_types, first)
            if part.stop_chunk is not None:
                tables = itertools.islice(tables, max(part.stop_chunk - first, 0))
            for chunk_index, table in enumerate(tables, start=first):
                yield part.file_index, chunk_index, table

    total = None  # the bar's total, from the footers (not read when no bar is shown)
    if show and ranges is None and all(_format(path) == "parquet" for path in files):
        total = sum(pq.read_metadata(path).num_rows for path in files)
    bar = tqdm(
        total=total, unit="rows", unit_scale=True, desc=f"score {model.label}", disable=not show
    )
    reader = _Prefetch(chunks(), PREFETCH_CHUNKS)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemma-score-writer")
    pools = {
        size: ThreadPoolExecutor(max_workers=size, thread_name_prefix="stemma-score-model")
        for size in {workers, tail_workers or workers}
        if size > 1
    }
    pending: deque[Future[Any]] = deque()
    recorded = threading.Event()

    def progress() -> None:
        """Record the fingerprint before the first part (in the writer thread, which runs
        its tasks in order)."""
        if not recorded.is_set():
            _write_progress(output_dir, hashing)
            recorded.set()

    def collect(future: Future[Any]) -> None:
        written = future.result()
        if written is None:  # the progress file
            return
        part, rejected, counts, chunk = written
        tally.parts[part["name"]] = part
        if rejected is not None:
            tally.rejects[rejected["name"]] = rejected
        if counts is not None:
            tally.counts += counts
        tally.latencies.append(chunk.scores.finished() - chunk.began)
        tally.written += 1
        tally.rows_this_call += chunk.rows
        bar.update(chunk.rows)

    try:
        for file_index, chunk_index, table in reader:
            name = PART_NAME.format(file=file_index, chunk=chunk_index)
            tally.rows_per_file[file_index] += table.num_rows
            if name in done:
                _resume_part(output_dir, name, tally, binary=model.task == "binary")
                bar.update(table.num_rows)
                continue
            began = time.perf_counter()
            features = encoder.columns(table)
            first_row = chunk_index * chunk_rows
            reject_mask, relevant = _apply_policies(
                features.problems, policies, table, files[file_index], first_row
            )
            if reject_mask is not None:
                features = features.take(~reject_mask)
            size = tail_workers if tail_workers and reader.exhausted.is_set() else workers
            pool = pools.get(size)
            chunk = _ChunkScores(
                name=name,
                input_file=files[file_index].name,
                rows=table.num_rows,
                ids=table.column(id_column) if id_column is not None else None,
                keep=None if reject_mask is None else ~reject_mask,
                scores=_start_forward(
                    run_network, kernel, encoder, features, model.preprocessor, pool
                ),
                began=began,
                rejects=None
                if reject_mask is None
                else _rejects_columns(model, table, id_column, reject_mask, relevant, first_row),
            )
            # The writer takes the chunk at once and writes its rows as their scores come,
            # while the pool scores it and the next one is checked and looked up here.
            pending.append(
                writer.submit(_finish_chunk, output_dir, model, id_column, chunk, hashing, progress)
            )
            while len(pending) > PENDING_WRITES:
                collect(pending.popleft())
        pending.append(writer.submit(progress))  # when no chunk was left to score
        while pending:
            collect(pending.popleft())
    finally:
        reader.close()
        # Writes already submitted finish (each is atomic; the model threads they wait for
        # are still running), so rows that stop the run or a file that cannot be read
        # leave every chunk before them written, and a rerun resumes after them. Nothing
        # half-written remains.
        writer.shutdown(wait=True)
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _write_progress(output_dir: Path, hashing: Future[_Identity]) -> None:
    """Record the fingerprint before any part (unless it is already recorded)."""
    identity = hashing.result()
    path = output_dir / PROGRESS_FILE
    document = {
        "fingerprint": identity.fingerprint,
        "input_digest": identity.digest,
        "model_uri": identity.metadata["model_uri"],
        "format": OUTPUT_FORMAT,
    }
    if _read_json(path) != document:
        _write_atomically(path, _json_bytes(document))


def _finish_chunk(
    output_dir: Path,
    model: ScoringModel,
    id_column: str | None,
    chunk: _ChunkScores,
    hashing: Future[_Identity],
    progress: Callable[[], None],
) -> tuple[dict[str, Any], dict[str, Any] | None, np.ndarray | None, _ChunkScores]:
    """Tabulate and write a chunk (in the writer thread), a row group of
    :data:`PART_ROW_GROUP_ROWS` rows as soon as the batches holding its scores are done.

    The rows are encoded while the input may still be being hashed; the part's metadata
    (which holds the input's digest) goes into its footer once the hash is known, and
    ``progress`` records the fingerprint before the part is written.

    Returns:
        The scored part's manifest entry, the rejects part's (or None), the chunk's score
        histogram counts (binary; None for regression), and the chunk.
    """
    binary = model.task == "binary"
    ids = None
    if id_column is not None and chunk.ids is not None:
        ids = chunk.ids if chunk.keep is None else chunk.ids.filter(pa.array(chunk.keep))
        # One contiguous array, so the part's bytes do not depend on how reads were batched.
        ids = ids.combine_chunks()
    schema = _part_schema(model, None if ids is None else pa.field(id_column, ids.type))
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64) if binary else None
    rows = len(chunk.scores)
    sink = pa.BufferOutputStream()
    # The schema pyarrow would store (ARROW:schema) is added with the metadata, at the end.
    with pq.ParquetWriter(sink, schema, store_schema=False, **_parquet_options(schema)) as parquet:
        # A chunk whose rows were all rejected still gets one (empty) row group.
        for start in range(0, max(rows, 1), PART_ROW_GROUP_ROWS):
            stop = min(start + PART_ROW_GROUP_ROWS, rows)
            scores = chunk.scores.wait(stop)[start:stop]
            columns: list[Any] = [] if ids is None else [ids.slice(start, stop - start)]
            if counts is not None:
                counts += _unit_histogram(scores)
                columns.append(pa.array((scores >= model.threshold).astype(np.int64)))
            columns.append(pa.array(scores))
            parquet.write_table(pa.Table.from_arrays(columns, schema=schema))
        metadata = {**hashing.result().metadata, "input_file": chunk.input_file}
        parquet.add_key_value_metadata(_stored_schema(schema.with_metadata(_prefixed(metadata))))
    progress()
    rejects = None if chunk.rejects is None else _with_metadata(chunk.rejects, metadata)
    part, rejected = _write_chunk(output_dir, chunk.name, sink.getvalue(), rows, rejects)
    return part, rejected, counts, chunk


def _stored_schema(schema: pa.Schema) -> dict[str, str]:
    """The key-value metadata pyarrow's Parquet writer stores for ``schema``: the schema's
    own, then the schema itself, serialized and base64-encoded, as ``ARROW:schema``."""
    serialized = base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")
    metadata = {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}
    return {**metadata, "ARROW:schema": serialized}


def _part_schema(model: ScoringModel, id_field: pa.Field | None) -> pa.Schema:
    """A scored part's columns (:func:`_output_columns`); the scoring's metadata is added
    to the footer once the input is hashed (:func:`_finish_chunk`). The prediction and
    the score are never null: required columns, which spare the writer their definition
    levels (20% of the time to encode a part)."""
    types = {PREDICTION_COLUMN: pa.int64(), SCORE_COLUMN: pa.float64()}
    names = _output_columns(model, None if id_field is None else id_field.name)
    fields = [id_field] if id_field is not None else []
    fields += [pa.field(name, types[name], nullable=False) for name in names[len(fields) :]]
    return pa.schema(fields)


#: The runner of each network, by the network it was made from (see :func:`_runner`).
_RUNNERS: weakref.WeakKeyDictionary[Any, Callable[[Any], Any]] = weakref.WeakKeyDictionary()


def network_runner(network: nn.Module, width: int) -> Callable[[Any], Any]:
    """One forward pass as the scoring engine runs it: a feed-forward fp32 network as fused
    oneDNN layers, another fp32 network prepacked for oneDNN, each only where it computes
    the same; a quantized variant compiled when it was measured compiled.

    The quantize flow times the fp32 model this way, so a variant must beat what scoring
    would otherwise run. Takes and returns dense float32 tensors. The runner is kept per
    network object, which must not change afterwards (the network of a
    :class:`ScoringModel` never does).
    """
    if network not in _RUNNERS:
        _RUNNERS[network] = _runner(network, width)
    return _RUNNERS[network]


def engine_runner(network: nn.Module, preprocessor: Preprocessor) -> Callable[[Any], Any]:
    """The fp32 network as the scoring engine runs it, fed the dense input matrix.

    With a :func:`one_hot_kernel`, the kernel runs on the numeric and category blocks
    read back from the matrix (once per matrix: the quantize flow times one batch again
    and again, and the engine builds the blocks from the input columns, not from a
    matrix); otherwise :func:`network_runner`. The quantize flow times the fp32 model
    this way, so a variant must beat the engine's own path.
    """
    kernel = one_hot_kernel(network, preprocessor)
    if kernel is None:
        return network_runner(network, preprocessor.n_inputs)
    n_numeric = len(preprocessor.numeric)
    sizes = [len(vocabulary) for vocabulary in preprocessor.vocabularies]
    blocks: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, np.ndarray]] = {}

    def run(batch: Any) -> Any:
        key = (batch.data_ptr(), tuple(batch.shape))
        if key not in blocks:
            blocks.clear()
            blocks[key] = _blocks_of_matrix(batch.numpy(), n_numeric, sizes)
        return kernel(*blocks[key])

    return run


def _blocks_of_matrix(
    matrix: np.ndarray, n_numeric: int, sizes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The numeric block and the category codes (see :meth:`_ChunkEncoder.code_block`) of
    an input matrix; an all-zero one-hot block reads as unknown."""
    numeric = np.ascontiguousarray(matrix[:, :n_numeric], dtype=np.float32)
    codes = np.empty((len(sizes), len(matrix)), dtype=np.int64)
    offset = n_numeric
    for index, size in enumerate(sizes):
        block = matrix[:, offset : offset + size]
        codes[index] = np.where(block.max(axis=1) > 0, block.argmax(axis=1), size)
        offset += size
    return numeric, codes


def _runner(network: nn.Module, width: int) -> Callable[[Any], Any]:
    import copy

    import torch

    from stemma.components.quantization.variants import QuantizedNetwork, serving_module

    if isinstance(network, QuantizedNetwork):  # runs as it was measured: compiled or eager
        return serving_module(network, width)
    if not torch.backends.mkldnn.is_available():
        return network
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(PROBE_ROWS, width, generator=generator)
    with torch.inference_mode():
        expected = network(probe)

    def agrees(run: Callable[[Any], Any]) -> bool:
        with torch.inference_mode():
            return _same_outputs(run(probe), expected)

    candidates: list[Callable[[], Callable[[Any], Any] | None]] = [
        lambda: _fused_layers(network),
        lambda: _prepacked(copy.deepcopy(network)),
    ]
    for build in candidates:
        try:
            run = build()
            if run is not None and agrees(run):
                return run
        except Exception as error:  # an architecture oneDNN cannot run: try the next
            _LOG.debug("%s: %s", type(network).__name__, error)
    return network


def _same_outputs(got: Any, expected: Any) -> bool:
    """Whether an engine's outputs on a probe are the network's, to float rounding."""
    import torch

    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def _fused_layers(network: nn.Module) -> Callable[[Any], Any] | None:
    """A stack of ``Linear`` layers, each followed by an optional ``ReLU`` and ``Dropout``, as
    oneDNN inner products with their weights reordered once and the ReLU fused in.

    For layers as small as the credit MLP's, the separate ReLU passes and the conversions
    to and from oneDNN's tensor format cost as much as the products: fused, the network
    ran 1.36x faster per row than prepacked (:func:`_prepacked`) on a 2-core EPYC, with
    outputs within 3e-8. These are the kernels ``torch.compile`` emits for such layers on
    CPU, without compiling. None for any other architecture (or in training mode, where
    dropout is live).
    """
    from torch import nn

    layers = getattr(network, "layers", None)
    if not isinstance(layers, nn.Sequential) or network.training:
        return None
    fused = _fuse(list(layers))
    return None if fused is None else _fused_runner(fused)


#: A fused layer: its weight reordered for oneDNN, its bias, and its activation (``relu``
#: or ``none``), as ``torch.ops.mkldnn._linear_pointwise`` takes them.
_FusedLayer = tuple[Any, Any, str]


def _fuse(layers: Sequence[nn.Module]) -> list[_FusedLayer] | None:
    """The layers as :func:`_fused_layers` runs them (None where one is of another kind)."""
    import torch
    from torch import nn

    fused: list[_FusedLayer] = []
    for layer in layers:
        if isinstance(layer, nn.Linear):
            if layer.bias is None or layer.weight.dtype != torch.float32:
                return None
            weight = torch.ops.mkldnn._reorder_linear_weight(
                layer.weight.detach(), FORWARD_BATCH_ROWS
            )
            fused.append((weight, layer.bias.detach(), "none"))
        elif isinstance(layer, nn.ReLU) and fused and fused[-1][2] == "none":
            fused[-1] = (fused[-1][0], fused[-1][1], "relu")
        elif isinstance(layer, nn.Dropout | nn.Identity):
            continue  # the identity in eval mode
        else:
            return None
    return fused or None


def _fused_runner(fused: Sequence[_FusedLayer]) -> Callable[[Any], Any]:
    import torch

    linear = torch.ops.mkldnn._linear_pointwise

    def run(batch: Any) -> Any:
        for weight, bias, activation in fused:
            batch = linear(batch, weight, bias, activation, [], "")
        return batch

    return run


class _OneHotKernel:
    """A feed-forward network whose first layer reads the categorical columns by position.

    A ``Linear`` layer multiplying one-hot blocks adds one column of its weight per
    category, so for every combination of categories the sum of those columns can be
    tabulated once: here the categorical columns are grouped so that each group's table
    of combinations stays small (:data:`COMBINATION_TABLE_ROWS` rows at most, the
    credit example's three columns make one table of 1,260), and the first layer is one
    table row per group (the first group's rows hold the bias) with the product of the
    numeric block added in place by one matrix multiply-add, which took 15% less time
    per row than a separate product and sum (measured on the credit MLP). The other
    layers run as :func:`_fused_layers` runs them. It computes what the network computes on
    :meth:`_ChunkEncoder.matrix` without building the one-hot matrix: on the credit MLP
    (6 numeric and 34 one-hot inputs) the first layer does a sixth of the
    multiplications, and encoding plus forward took about 20% less time per row than
    the fused network on the whole matrix (measured on a 2-core EPYC). Outputs agree
    with the network to float rounding (checked on a probe by :func:`one_hot_kernel`).
    """

    def __init__(
        self, first: nn.Linear, rest: Sequence[nn.Module], n_numeric: int, sizes: Sequence[int]
    ) -> None:
        import torch
        from torch import nn

        weight = first.weight.detach()
        # (numeric columns, width): the numeric block's product accumulates onto the rows
        # looked up (one matrix multiply-add, no separate sum).
        self.numeric_weight = weight[:, :n_numeric].T.contiguous() if n_numeric else None
        # Each column's weight columns, then a zero column for an unknown or missing value.
        blocks, offset = [], n_numeric
        for size in sizes:
            columns = weight[:, offset : offset + size].T
            blocks.append(torch.cat([columns, columns.new_zeros(1, columns.shape[1])]))
            offset += size
        # (member columns, their radices, the table of their combinations), per group.
        self.groups: list[tuple[list[int], list[int], Any]] = []
        for members in _combination_groups([size + 1 for size in sizes]):
            table = blocks[members[0]]
            for member in members[1:]:
                # Rows ordered as the mixed-radix number (code of the first, ..., of the last).
                table = (table[:, None, :] + blocks[member][None, :, :]).reshape(-1, table.shape[1])
            if not self.groups and first.bias is not None:
                table = table + first.bias.detach()  # the bias, once: in the first table
            radices = [sizes[member] + 1 for member in members]
            self.groups.append((members, radices, table.contiguous()))
        # Dropout is the identity in eval mode.
        rest = [layer for layer in rest if not isinstance(layer, nn.Dropout | nn.Identity)]
        self.relu = bool(rest) and isinstance(rest[0], nn.ReLU)
        if self.relu:
            rest = rest[1:]
        fused = _fuse(rest) if rest else None
        if rest and fused is None:
            raise ValueError("the layers after the first are not a fusable stack")
        # The layers after the first (and its ReLU), fused.
        self.rest_layers: list[_FusedLayer] = fused or []
        self._rest = _fused_runner(fused) if fused else None

    def __call__(self, numeric: np.ndarray, codes: np.ndarray) -> Any:
        """Raw outputs for a batch: ``numeric`` (rows, numeric columns) float32 as
        :meth:`_ChunkEncoder.numeric_block` gives it, ``codes`` (categorical columns,
        rows) as :meth:`_ChunkEncoder.code_block` does."""
        import torch

        (members, radices, table), *others = self.groups
        hidden = table.index_select(0, torch.from_numpy(_group_index(codes, members, radices)))
        for members, radices, table in others:
            hidden += table.index_select(0, torch.from_numpy(_group_index(codes, members, radices)))
        if self.numeric_weight is not None:
            hidden.addmm_(torch.from_numpy(numeric), self.numeric_weight)
        if self.relu:
            hidden.relu_()
        return hidden if self._rest is None else self._rest(hidden)


def _group_index(codes: np.ndarray, members: Sequence[int], radices: Sequence[int]) -> np.ndarray:
    """Each row's row in a group's table: its members' codes as one mixed-radix number."""
    index = codes[members[0]]
    if len(members) > 1:
        index = index * radices[1] + codes[members[1]]
        for member, radix in zip(members[2:], radices[2:], strict=True):
            index *= radix
            index += codes[member]
    return index


def _combination_groups(radices: Sequence[int]) -> list[list[int]]:
    """Consecutive columns grouped while the product of their radices (values + unknown)
    stays within :data:`COMBINATION_TABLE_ROWS`; a wider column is a group of its own."""
    groups: list[list[int]] = []
    rows = 0
    for index, radix in enumerate(radices):
        if groups and rows * radix <= COMBINATION_TABLE_ROWS:
            groups[-1].append(index)
            rows *= radix
        else:
            groups.append([index])
            rows = radix
    return groups


#: The one-hot kernel of each network (None: it has none), by the network it was made from.
_KERNELS: weakref.WeakKeyDictionary[Any, _OneHotKernel | None] = weakref.WeakKeyDictionary()


def one_hot_kernel(network: nn.Module, preprocessor: Preprocessor) -> _OneHotKernel | None:
    """The :class:`_OneHotKernel` of an fp32 feed-forward network that has categorical
    inputs, when it gives the network's outputs on a probe; otherwise None (the network
    then runs on the whole input matrix). Kept per network object, like
    :func:`network_runner`."""
    if network not in _KERNELS:
        _KERNELS[network] = _build_one_hot_kernel(network, preprocessor)
    return _KERNELS[network]


def _build_one_hot_kernel(network: nn.Module, preprocessor: Preprocessor) -> _OneHotKernel | None:
    import torch
    from torch import nn

    from stemma.components.quantization.variants import QuantizedNetwork

    layers = getattr(network, "layers", None)
    stack = list(layers) if isinstance(layers, nn.Sequential) else []
    first = stack[0] if stack else None
    if (
        isinstance(network, QuantizedNetwork)
        or not preprocessor.categorical
        or not isinstance(first, nn.Linear)
        or first.bias is None
        or first.weight.dtype != torch.float32
        or first.in_features != preprocessor.n_inputs
        or network.training
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    n_numeric = len(preprocessor.numeric)
    sizes = [len(vocabulary) for vocabulary in preprocessor.vocabularies]
    try:
        kernel = _OneHotKernel(first, stack[1:], n_numeric, sizes)
        generator = torch.Generator().manual_seed(0)
        numeric = torch.randn(PROBE_ROWS, n_numeric, generator=generator)
        # Every column's values and its unknown value (its size) appear.
        codes = torch.stack([torch.arange(PROBE_ROWS) % (size + 1) for size in sizes]).contiguous()
        one_hot = [
            torch.nn.functional.one_hot(column, size + 1)[:, :size].float()
            for column, size in zip(codes, sizes, strict=True)
        ]
        dense = torch.cat([numeric, *one_hot], dim=1)
        with torch.inference_mode():
            expected = network(dense)
            got = kernel(numeric.numpy(), codes.numpy())
        if _same_outputs(got, expected):
            return kernel
        _LOG.debug("one-hot kernel of %s disagrees on the probe", type(network).__name__)
    except Exception as error:  # an architecture the kernel cannot run
        _LOG.debug("no one-hot kernel for %s: %s", type(network).__name__, error)
    return None


def _prepacked(network: nn.Module) -> Callable[[Any], Any]:
    """The network with its linear layers prepacked for oneDNN (``to_mkldnn`` rewires the
    module it is given: pass a copy). Prepacked weights spare the matrix library the
    repacking it does on every call, which dominates for small layers (the credit MLP ran
    1.7x faster per row than unpacked)."""
    from torch.utils import mkldnn

    packed = mkldnn.to_mkldnn(network).eval()

    def run(batch: Any) -> Any:
        output = packed(batch.to_mkldnn())
        return output.to_dense() if output.is_mkldnn else output

    return run


def _start_forward(
    run_network: Callable[[Any], Any],
    kernel: _OneHotKernel | None,
    encoder: _ChunkEncoder,
    features: _Columns,
    preprocessor: Preprocessor,
    pool: ThreadPoolExecutor | None,
) -> _Scores:
    """Start scoring a chunk's rows a row group (:data:`PART_ROW_GROUP_ROWS` rows) at a
    time, each decoded into its place in the chunk's float64 scores (see :class:`_Scores`).

    With a pool, its threads take row groups in turn, each running the network with one
    torch thread, and the caller goes on meanwhile; without one, they run here, before
    this returns. Within a row group the network runs on batches of
    :data:`FORWARD_BATCH_ROWS` rows (:func:`_scripted_rows`, or :func:`_eager_rows` where
    that does not apply), computed the same way whichever thread takes them, so the
    scores do not depend on the thread count.
    """
    import torch

    scores = np.empty(features.rows, dtype=np.float64)
    run_rows = _scripted_rows(kernel, encoder, features, preprocessor, scores)
    if run_rows is None:
        run_rows = _eager_rows(run_network, kernel, encoder, features, preprocessor, scores)

    def run(start: int) -> float:
        # inference_mode is per thread: each row group enters it where it runs.
        with torch.inference_mode():
            run_rows(start, min(start + PART_ROW_GROUP_ROWS, features.rows))
        return time.perf_counter()

    starts = range(0, features.rows, PART_ROW_GROUP_ROWS)
    if pool is None:
        return _Scores(
            scores, [(start, None) for start in starts], [run(start) for start in starts]
        )
    return _Scores(scores, [(start, pool.submit(run, start)) for start in starts], [])


def _eager_rows(
    run_network: Callable[[Any], Any],
    kernel: _OneHotKernel | None,
    encoder: _ChunkEncoder,
    features: _Columns,
    preprocessor: Preprocessor,
    scores: np.ndarray,
) -> Callable[[int, int], None]:
    """Score rows ``start`` to ``stop - 1`` into ``scores``, batch by batch, from Python.

    Each batch is encoded right before the network reads it, so its matrix is still in
    the CPU cache: with ``kernel``, as its numeric and category blocks, otherwise as the
    whole input matrix for ``run_network``; its outputs are decoded
    (:meth:`Preprocessor.decode_output`) where it ran.
    """
    import torch

    def run(start: int, stop: int) -> None:
        for first in range(start, stop, FORWARD_BATCH_ROWS):
            last = min(first + FORWARD_BATCH_ROWS, stop)
            if kernel is not None:
                output = kernel(
                    encoder.numeric_block(features, first, last),
                    encoder.code_block(features, first, last),
                )
            else:
                output = run_network(torch.from_numpy(encoder.matrix(features, first, last)))
            # Decoding is elementwise: a batch decodes as it would within its chunk.
            preprocessor.decode_output(
                output.float().numpy().reshape(last - first), out=scores[first:last]
            )

    return run


def _scripted_rows(
    kernel: _OneHotKernel | None,
    encoder: _ChunkEncoder,
    features: _Columns,
    preprocessor: Preprocessor,
    scores: np.ndarray,
) -> Callable[[int, int], None] | None:
    """What :func:`_eager_rows` does with a one-hot kernel, as one TorchScript call per row
    group, which releases the GIL until the row group is scored; None where it does not
    apply (no kernel, or a numeric column other than float64 or int64, whose
    standardisation follows numpy's rules for that type).

    From Python, each batch takes some forty operations, and each hands the GIL back and
    takes it again: whenever the reader or the writer ran Python meanwhile, the model
    thread waited for it, up to the interpreter's 5 ms switch interval (measured with
    probes on CPython's ``take_gil``: 40-57 ms of waiting per 1M-row run across the model
    threads, 22-34 ms on the main thread). The script computes the same operations in
    the same order, so the scores are bit for bit those of :func:`_eager_rows`.
    """
    import torch

    script = _batch_script()
    if (
        script is None
        or kernel is None
        or any(values.dtype not in (np.float64, np.int64) for values in features.numeric)
    ):
        return None
    layers = kernel.rest_layers
    # DLPack shares the arrays' memory, read-only ones (Arrow's) included.
    arguments = (
        [torch.from_dlpack(values) for values in features.numeric],
        [float(value) for value in preprocessor.means],
        [float(value) for value in preprocessor.stds],
        [torch.from_dlpack(codes) for codes in features.codes],
        list(features.all_known),
        list(encoder.sizes),
        [list(members) for members, _, _ in kernel.groups],
        [list(radices) for _, radices, _ in kernel.groups],
        [table for _, _, table in kernel.groups],
        kernel.numeric_weight,
        kernel.relu,
        [weight for weight, _, _ in layers],
        [bias for _, bias, _ in layers],
        [activation for _, _, activation in layers],
        preprocessor.task == "binary",
        # Read for regression only, which always has both.
        float(preprocessor.target_mean if preprocessor.target_mean is not None else 0.0),
        float(preprocessor.target_std if preprocessor.target_std is not None else 1.0),
    )
    out = torch.from_numpy(scores)

    def run(start: int, stop: int) -> None:
        script(*arguments, start, stop, FORWARD_BATCH_ROWS, out)

    return run


@functools.cache
def _batch_script() -> Any:
    """:func:`_scripted_rows`' TorchScript function, compiled once per process (~10 ms);
    None where TorchScript cannot compile it."""
    import warnings

    import torch
    from torch import Tensor

    def rows_forward(
        numeric: list[Tensor],
        means: list[float],
        stds: list[float],
        codes: list[Tensor],
        known: list[bool],
        sizes: list[int],
        members: list[list[int]],
        radices: list[list[int]],
        tables: list[Tensor],
        numeric_weight: Tensor | None,
        relu: bool,
        weights: list[Tensor],
        biases: list[Tensor],
        activations: list[str],
        binary: bool,
        target_mean: float,
        target_std: float,
        start: int,
        stop: int,
        batch_rows: int,
        out: Tensor,
    ) -> None:
        # Step for step what _eager_rows does with a _OneHotKernel: numeric_block,
        # code_block, _group_index, _OneHotKernel.__call__, _fuse's layers, decode_output.
        for first in range(start, stop, batch_rows):
            last = min(first + batch_rows, stop)
            rows = last - first
            block = torch.empty((rows, len(numeric)), dtype=torch.float32)
            for index in range(len(numeric)):
                # float64 arithmetic, then float32, as _ChunkEncoder._standardise does.
                block[:, index] = (
                    numeric[index][first:last].to(torch.float64) - means[index]
                ) / stds[index]
            batch_codes: list[Tensor] = []
            for index in range(len(codes)):
                column = codes[index][first:last]
                if not known[index]:
                    column = torch.where(column >= 0, column, sizes[index])
                batch_codes.append(column)
            hidden = torch.empty(0)
            for group in range(len(tables)):
                group_members = members[group]
                group_radices = radices[group]
                position = batch_codes[group_members[0]]
                if len(group_members) > 1:
                    position = position * group_radices[1] + batch_codes[group_members[1]]
                    for other in range(2, len(group_members)):
                        position *= group_radices[other]
                        position += batch_codes[group_members[other]]
                if group == 0:
                    hidden = tables[group].index_select(0, position)
                else:
                    hidden += tables[group].index_select(0, position)
            if numeric_weight is not None:
                hidden.addmm_(block, numeric_weight)
            if relu:
                hidden.relu_()
            no_scalars: list[number | None] = []
            for layer in range(len(weights)):
                hidden = torch.ops.mkldnn._linear_pointwise(
                    hidden, weights[layer], biases[layer], activations[layer], no_scalars, ""
                )
            raw = hidden.reshape(rows).to(torch.float64)
            if binary:
                torch.sigmoid(raw, out=out[first:last])
            else:
                torch.mul(raw, target_std, out=out[first:last])
                out[first:last] += target_mean

    try:
        with warnings.catch_warnings():
            # torch.jit.script is deprecated in favour of torch.compile, which needs a C++
            # compiler at run time; the scripted function is checked by the tests.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(rows_forward)
    except Exception as error:  # a torch build without TorchScript: score from Python
        _LOG.debug("no batch script: %s", error)
        return None


class _Scores:
    """A chunk's scores, filled in batch by batch by whichever thread runs each batch."""

    def __init__(
        self, scores: np.ndarray, batches: list[tuple[int, Future[float] | None]], done: list[float]
    ) -> None:
        self._scores = scores
        self._batches = batches  # (first row, the batch's future: None once run here)
        self._done = done  # when each batch waited for was done (time.perf_counter)

    def __len__(self) -> int:
        return len(self._scores)

    def wait(self, rows: int) -> np.ndarray:
        """The scores, once the batches holding the first ``rows`` are done (the rest may
        still be coming)."""
        while self._batches and self._batches[0][0] < rows:
            _, batch = self._batches.pop(0)
            if batch is not None:
                self._done.append(batch.result())
        return self._scores

    def finished(self) -> float:
        """When the last batch was done, once it is."""
        self.wait(len(self._scores))
        return max(self._done, default=time.perf_counter())


def _apply_policies(
    problems: list[_Problem],
    policies: dict[str, str],
    table: pa.Table,
    path: Path,
    first_row: int,
) -> tuple[np.ndarray | None, list[_Problem]]:
    """The rows to reject (None: none) and the problems that count under the policies.

    Raises:
        DataError: a row has a problem whose policy is ``error``; names the rows and why.
    """
    policy_of = {
        _MISSING: policies["invalid_rows"],
        _INFINITE: policies["invalid_rows"],
        _UNKNOWN: policies["unknown_categories"],
    }
    relevant = [problem for problem in problems if policy_of[problem.kind] != "score"]
    errors = [problem for problem in relevant if policy_of[problem.kind] == "error"]
    if errors:
        error_mask = np.logical_or.reduce([problem.mask for problem in errors])
        rows = np.flatnonzero(error_mask)
        shown = rows[:MAX_NAMED]
        details = [
            f"row {first_row + row}: {reason}"
            for row, reason in zip(shown, _reasons(table, relevant, shown), strict=True)
        ]
        if len(rows) > MAX_NAMED:
            details.append(f"and {len(rows) - MAX_NAMED} more rows in this chunk")
        kinds = {problem.kind for problem in errors}
        if kinds & {_MISSING, _INFINITE}:
            details.append("set score.invalid_rows: reject to write such rows to the rejects")
        if _UNKNOWN in kinds:
            details.append(
                "set score.unknown_categories: reject (to the rejects) or score "
                "(scored as an unseen category)"
            )
        raise DataError(
            f"{path}: {_plural(len(rows), 'row')} cannot be scored (rows counted from 0 "
            f"from row {first_row} on)",
            details,
        )
    if not relevant:
        return None, relevant
    return np.logical_or.reduce([problem.mask for problem in relevant]), relevant


def _output_columns(model: ScoringModel, id_column: str | None) -> list[str]:
    columns = [id_column] if id_column is not None else []
    if model.task == "binary":
        columns.append(PREDICTION_COLUMN)
    return [*columns, SCORE_COLUMN]


def _prefixed(metadata: dict[str, str]) -> dict[str, str]:
    return {f"{METADATA_PREFIX}{key}": value for key, value in metadata.items()}


def _with_metadata(columns: dict[str, Any], metadata: dict[str, str]) -> pa.Table:
    return pa.table(columns).replace_schema_metadata(_prefixed(metadata))


def _rejects_columns(
    model: ScoringModel,
    table: pa.Table,
    id_column: str | None,
    reject_mask: np.ndarray,
    problems: list[_Problem],
    first_row: int,
) -> dict[str, Any]:
    """The rejected rows: id, row number in the file, reason and the raw feature values."""
    rows = np.flatnonzero(reject_mask)
    taken = table.take(pa.array(rows))
    columns: dict[str, Any] = {}
    if id_column is not None:
        columns[id_column] = taken.column(id_column).combine_chunks()
    columns[ROW_COLUMN] = pa.array(rows.astype(np.int64) + first_row)
    columns[REASON_COLUMN] = pa.array(_reasons(table, problems, rows), pa.string())
    for name in model.feature_columns:
        if name != id_column:
            columns[name] = taken.column(name).combine_chunks()
    return columns


def _finished_parts(output_dir: Path, fingerprint: str) -> set[str]:
    """Parts an interrupted run of the same fingerprint completed."""
    return {
        entry.name
        for entry in output_dir.iterdir()
        if _PART.match(entry.name) and _part_fingerprint(entry) == fingerprint
    }


def _resume_part(output_dir: Path, name: str, tally: _Tally, *, binary: bool) -> None:
    """Count a finished part (and its rejects) as if this call had written it."""
    path = output_dir / name
    tally.parts[name] = _existing_part(path)
    rejected = output_dir / REJECTS_DIR / name
    if rejected.is_file():
        tally.rejects[name] = _existing_part(rejected)
    if binary:
        tally.counts += _unit_histogram(_part_scores(path))
    tally.skipped += 1


#: The binary score histogram's bin edges, as ``np.histogram`` computes them.
_UNIT_EDGES = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)


def _unit_histogram(scores: np.ndarray) -> np.ndarray:
    """``np.histogram(scores, HISTOGRAM_BINS, range=(0, 1))[0]``, exactly, in 40% of its time.

    Scores in [0, 1] are binned as ``floor(score * bins)``, which differs from numpy's
    edges only where a score lies just below an edge that rounds up (0.15000000000000002
    and others): one gather of the edges finds those. No score times ``bins`` lands below
    the edge it has reached (checked for these bins by the tests), so nothing needs moving
    up. Anything else (NaN, or outside [0, 1]) goes to ``np.histogram``.
    """
    if not scores.size:
        return np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    if not (scores.min() >= 0.0 and scores.max() <= 1.0):
        return np.histogram(scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
    index = (scores * HISTOGRAM_BINS).astype(np.intp)
    np.minimum(index, HISTOGRAM_BINS - 1, out=index)  # 1.0 is in the last bin
    index -= scores < np.take(_UNIT_EDGES, index)
    return np.bincount(index, minlength=HISTOGRAM_BINS)


def _part_scores(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=[SCORE_COLUMN]).column(0).to_numpy()


def _value_histogram(paths: Sequence[Path]) -> dict[str, list[Any]]:
    """Histogram of regression scores over the range they span, one part in memory at a time."""
    low, high = np.inf, -np.inf
    for path in paths:
        scores = _part_scores(path)
        finite = scores[np.isfinite(scores)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low > high:
        return {"edges": [], "counts": []}
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for path in paths:
        counts += np.histogram(_part_scores(path), bins=HISTOGRAM_BINS, range=(low, high))[0]
    edges = np.histogram_bin_edges(np.empty(0), bins=HISTOGRAM_BINS, range=(low, high))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _remove_strays(output_dir: Path, tally: _Tally) -> None:
    """Remove parts this scoring did not produce (left by a copy or a crash mid-cleanup)."""
    for folder, keep in ((output_dir, tally.parts), (output_dir / REJECTS_DIR, tally.rejects)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _PART.match(entry.name) and entry.name not in keep:
                _LOG.warning("removing %s: not part of this scoring", entry)
                entry.unlink()


def _refuse_output_around_input(files: Sequence[Path], output_dir: Path) -> None:
    target = output_dir.resolve()
    inside = [path for path in files if path.resolve().is_relative_to(target)]
    if inside:
        raise DataError(
            f"{output_dir}: the output folder holds input files ({inside[0].name})",
            ["write the scores to a folder of their own (score.output or --output)"],
        )


def _fingerprint(
    model: ScoringModel,
    digest: str,
    chunk_rows: int,
    id_column: str | None,
    policies: dict[str, str],
) -> str:
    """Everything the output's bytes depend on, hashed."""
    document = {
        "format": OUTPUT_FORMAT,
        "model_uri": model.model_uri,
        "weights_sha256": model.weights_sha256,
        "input_digest": digest,
        "chunk_rows": chunk_rows,
        "id_column": id_column,
        **policies,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode("utf-8")).hexdigest()


@functools.cache
def _stemma_version() -> str:
    """The installed version (reading the package metadata takes ~2 ms: once per process)."""
    try:
        return metadata.version("stemma")
    except metadata.PackageNotFoundError:
        return "unknown"


def _result(
    output_dir: Path,
    manifest: dict[str, Any],
    tally: _Tally,
    started: float,
    extras: list[str],
    invalidated: bool,
    *,
    already_complete: bool,
) -> ScoringResult:
    manifest_path = output_dir / SUCCESS_FILE
    seconds = time.perf_counter() - started
    latency: dict[str, float] = {}
    if tally.latencies:
        values = np.asarray(tally.latencies) * 1000.0
        latency = {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}
    rows = manifest["rows"]
    return ScoringResult(
        output_dir=output_dir,
        manifest_path=manifest_path,
        manifest=manifest,
        rows_input=int(rows["input"]),
        rows_scored=int(rows["scored"]),
        rows_rejected=int(rows["rejected"]),
        parts_written=tally.written,
        parts_skipped=len(manifest["parts"]) if already_complete else tally.skipped,
        already_complete=already_complete,
        invalidated=invalidated,
        extra_columns=list(extras),
        seconds=seconds,
        rows_per_second=tally.rows_this_call / seconds if seconds > 0 else 0.0,
        chunk_latency_ms=latency,
        score_histogram=manifest["score_histogram"],
        output_digest=sha256_file(manifest_path),
    )
