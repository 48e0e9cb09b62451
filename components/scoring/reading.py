"""Reading the input a chunk at a time, through pyarrow, in a thread ahead of the model."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.runtime.loading import ScoringModel, first_line
from stemma.components.scoring.inputs import CSV_BLOCK_BYTES, file_format

#: Read buffer of the Parquet reader.
READ_BUFFER_BYTES = 1 << 20


def read_columns(model: ScoringModel, id_column: str | None) -> list[str]:
    """The columns a scoring reads: the id column, then the model's features."""
    columns = [id_column] if id_column is not None else []
    return columns + [name for name in model.feature_columns if name != id_column]


#: Arrow types CSV columns are read as, per signature type, so that every block of a file
#: gets the same type (the reader would otherwise fix the types from the first block).
CSV_TYPES = {
    "double": pa.float64(),
    "float": pa.float64(),
    "long": pa.int64(),
    "integer": pa.int64(),
    "string": pa.string(),
    "boolean": pa.bool_(),
}


def file_chunks(
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
        if file_format(path) == "parquet":
            # Without pre-buffering: pyarrow keeps pre-buffered ranges until the file is
            # closed, so memory would grow with the file (measured), not the chunk.
            parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
            try:
                yield from _parquet_chunks(parquet, columns, chunk_rows, first_row)
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
    parquet: pq.ParquetFile, columns: list[str], chunk_rows: int, first_row: int
) -> Iterator[pa.Table]:
    """The columns from file row ``first_row`` on; the row groups before it are skipped unread."""
    first_group, skip = locate_row(parquet.metadata, first_row)
    groups = list(range(first_group, parquet.metadata.num_row_groups)) if first_row else None
    # Decoding on the calling thread: the reader already runs beside the model.
    batches = parquet.iter_batches(
        batch_size=chunk_rows, row_groups=groups, columns=columns, use_threads=False
    )
    return _rechunk(_skip_rows(batches, skip) if skip else batches, chunk_rows)


def locate_row(metadata: pq.FileMetaData, row: int) -> tuple[int, int]:
    """The row group holding file row ``row``, and the rows of that group before it."""
    group = 0
    while group < metadata.num_row_groups and row >= metadata.row_group(group).num_rows:
        row -= metadata.row_group(group).num_rows
        group += 1
    return group, row


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


class Prefetch:
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
