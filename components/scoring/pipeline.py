"""The scoring pipeline: threads that read, encode, run the network and write, overlapped.

One thread reads chunks ahead (:class:`Prefetch`); the calling thread checks and
looks up each chunk; ``workers`` threads encode and run the network through the model's
runtime a row group at a time; one writer thread tabulates each part a row group at a
time, as its scores come, and writes it once the input's digest is known. pyarrow, numpy,
torch and ONNX Runtime release the GIL, so the stages overlap. Memory is bounded by a few
chunks, whatever the size of the input.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.model.preprocessing import Preprocessor
from stemma.components.runtime.backends import Runtime
from stemma.components.runtime.loading import ScoringModel, first_line
from stemma.components.scoring.inputs import (
    CSV_BLOCK_BYTES,
    ChunkEncoder,
    Columns,
    apply_policies,
    file_format,
    rejects_columns,
)
from stemma.components.scoring.output import (
    HISTOGRAM_BINS,
    PART_NAME,
    PART_ROW_GROUP_ROWS,
    REJECTS_DIR,
    Identity,
    existing_part,
    parquet_options,
    part_counts,
    part_schema,
    prefixed,
    score_arrays,
    stored_schema,
    summed,
    with_metadata,
    write_chunk,
    write_progress,
)

#: Chunks read ahead of the model, and parts waiting to be written: bounds memory.
PREFETCH_CHUNKS = 2
PENDING_WRITES = 2
#: Rows encoded and run through the network at once: a batch's input matrix stays in the
#: CPU cache until the runtime reads it.
FORWARD_BATCH_ROWS = 8_192


@dataclass(frozen=True)
class ChunkRange:
    """Chunks ``first_chunk`` to ``stop_chunk - 1`` of input file ``file_index``.

    ``stop_chunk`` None runs to the end of the file. A part's name and bytes depend only
    on its file and chunk numbers, so any split of the chunks into ranges writes the same
    output as :func:`.engine.score_files`.
    """

    file_index: int
    first_chunk: int = 0
    stop_chunk: int | None = None


@dataclass
class Tally:
    """What the scoring loop has produced so far."""

    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejects: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows_per_file: list[int] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.int64))
    #: Rows predicted per class, in the classes' order (multiclass; None otherwise).
    predicted: np.ndarray | None = None
    latencies: list[float] = field(default_factory=list)
    rows_this_call: int = 0
    #: CPU-seconds other processes spent on this scoring (the ranges of a fan-out).
    cpu_elsewhere: float = 0.0
    written: int = 0
    skipped: int = 0

    def add_counts(self, counts: np.ndarray | None, predicted: np.ndarray | None) -> None:
        """Add a chunk's (or a range's) score histogram and rows per predicted class."""
        if counts is not None:
            self.counts += counts
        self.predicted = summed(self.predicted, predicted)


class Scores:
    """A chunk's scores, filled in a row group at a time by whichever thread runs it."""

    def __init__(
        self, scores: np.ndarray, batches: list[tuple[int, Future[float] | None]], done: list[float]
    ) -> None:
        self._scores = scores
        self._batches = batches  # (first row, the row group's future: None once run here)
        self._done = done  # when each row group waited for was done (time.perf_counter)

    def __len__(self) -> int:
        return len(self._scores)

    def wait(self, rows: int) -> np.ndarray:
        """The scores, once the row groups holding the first ``rows`` are done (the rest
        may still be coming)."""
        while self._batches and self._batches[0][0] < rows:
            _, batch = self._batches.pop(0)
            if batch is not None:
                self._done.append(batch.result())
        return self._scores

    def finished(self) -> float:
        """When the last row group was done, once it is."""
        self.wait(len(self._scores))
        return max(self._done, default=time.perf_counter())


@dataclass(frozen=True)
class ChunkScores:
    """A chunk on its way to the writer, whose scores may still be coming."""

    name: str
    input_file: str
    rows: int  # rows of the chunk, scored or rejected
    ids: pa.ChunkedArray | None  # the id column of every row (not the whole chunk)
    keep: np.ndarray | None  # rows scored, when some were rejected
    # float64 scores of the kept rows, row group by row group: (rows,), or (rows, classes)
    # class probabilities for multiclass
    scores: Scores
    began: float  # when the chunk's checks began (time.perf_counter), for its latency
    rejects: dict[str, Any] | None  # columns of the rejects part


def start_forward(
    runtime: Runtime,
    encoder: ChunkEncoder,
    features: Columns,
    preprocessor: Preprocessor,
    pool: ThreadPoolExecutor | None,
) -> Scores:
    """Start scoring a chunk's rows a row group (:data:`PART_ROW_GROUP_ROWS` rows) at a
    time, each decoded into its place in the chunk's float64 scores: one per row, or for a
    multiclass model one row of class probabilities per row.

    With a pool, its threads take row groups in turn and the caller goes on meanwhile;
    without one, they run here, before this returns. Each batch of
    :data:`FORWARD_BATCH_ROWS` rows is computed the same way whichever thread takes it,
    so the scores do not depend on the thread count.
    """
    width = (preprocessor.n_outputs,) if preprocessor.task == "multiclass" else ()
    scores = np.empty((features.rows, *width), dtype=np.float64)

    def run(start: int) -> float:
        stop = min(start + PART_ROW_GROUP_ROWS, features.rows)
        for first in range(start, stop, FORWARD_BATCH_ROWS):
            last = min(first + FORWARD_BATCH_ROWS, stop)
            output = runtime.run(encoder.matrix(features, first, last))
            # Decoding is row by row (a softmax within each row): a batch decodes as it
            # would within its chunk.
            preprocessor.decode_output(output.reshape(last - first, *width), out=scores[first:last])
        return time.perf_counter()

    starts = range(0, features.rows, PART_ROW_GROUP_ROWS)
    if pool is None:
        return Scores(scores, [(start, None) for start in starts], [run(start) for start in starts])
    return Scores(scores, [(start, pool.submit(run, start)) for start in starts], [])


class Pipeline:
    """One scoring's chunks through the threads, each part written atomically.

    Args:
        model: the model; its runtime runs the network.
        files: the input files, in part-number order.
        output_dir: the output folder, ready (fresh or resumed).
        tally: where the parts written or resumed are counted.
        hashing: the input's identity, which may still be being computed.
        done: parts an interrupted run of the same scoring finished (counted, not rescored).
        id_column: the column copied to the output, or None.
        chunk_rows: rows per chunk.
        policies: ``invalid_rows`` and ``unknown_categories``.
        workers: threads running the network while the input is read.
        tail_workers: threads running it once the input is all read (default ``workers``).
    """

    def __init__(
        self,
        model: ScoringModel,
        files: list[Path],
        output_dir: Path,
        tally: Tally,
        hashing: Future[Identity],
        *,
        done: set[str],
        id_column: str | None,
        chunk_rows: int,
        policies: dict[str, str],
        workers: int,
        tail_workers: int | None = None,
    ) -> None:
        self.model, self.files, self.output_dir = model, files, output_dir
        self.tally, self.hashing, self.done = tally, hashing, done
        self.id_column, self.chunk_rows, self.policies = id_column, chunk_rows, policies
        self.workers, self.tail_workers = workers, tail_workers or workers
        self.encoder = ChunkEncoder(model.preprocessor)
        self._recorded = threading.Event()

    def run(self, *, show: bool, ranges: Sequence[ChunkRange] | None = None) -> None:
        """Score the chunks of ``ranges`` (default: every chunk of every file)."""
        from tqdm import tqdm

        bar = tqdm(
            total=self._total_rows(show, ranges),
            unit="rows",
            unit_scale=True,
            desc=f"score {self.model.label}",
            disable=not show,
        )
        reader = Prefetch(self._chunks(ranges), PREFETCH_CHUNKS)
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemma-score-writer")
        pools = {
            size: ThreadPoolExecutor(max_workers=size, thread_name_prefix="stemma-score-model")
            for size in {self.workers, self.tail_workers}
            if size > 1
        }
        pending: deque[Future[Any]] = deque()
        try:
            for file_index, chunk_index, table in reader:
                self.tally.rows_per_file[file_index] += table.num_rows
                size = self.tail_workers if reader.exhausted.is_set() else self.workers
                chunk = self._start_chunk(file_index, chunk_index, table, pools.get(size))
                if chunk is None:
                    bar.update(table.num_rows)
                    continue
                # The writer takes the chunk at once and writes its rows as their scores
                # come, while the pool scores it and the next one is checked here.
                pending.append(writer.submit(self._write, chunk))
                while len(pending) > PENDING_WRITES:
                    self._collect(pending.popleft(), bar)
            pending.append(writer.submit(self._record_progress))  # when no chunk was scored
            while pending:
                self._collect(pending.popleft(), bar)
        finally:
            reader.close()
            # Writes already submitted finish (each is atomic), so rows that stop the run or
            # a file that cannot be read leave every chunk before them written, and a rerun
            # resumes after them. Nothing half-written remains.
            writer.shutdown(wait=True)
            for pool in pools.values():
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _total_rows(self, show: bool, ranges: Sequence[ChunkRange] | None) -> int | None:
        """The progress bar's total, from the Parquet footers (None when unknown or hidden)."""
        if not show or ranges is not None:
            return None
        if not all(file_format(path) == "parquet" for path in self.files):
            return None
        return sum(pq.read_metadata(path).num_rows for path in self.files)

    def _chunks(self, ranges: Sequence[ChunkRange] | None) -> Iterator[tuple[int, int, pa.Table]]:
        columns = read_columns(self.model, self.id_column)
        signature = dict(self.model.signature_columns)
        csv_types = {
            name: CSV_TYPES[signature[name]]
            for name in self.model.feature_columns
            if signature.get(name) in CSV_TYPES
        }
        for part in ranges if ranges is not None else map(ChunkRange, range(len(self.files))):
            first = part.first_chunk
            path = self.files[part.file_index]
            tables = file_chunks(path, columns, self.chunk_rows, csv_types, first)
            if part.stop_chunk is not None:
                tables = itertools.islice(tables, max(part.stop_chunk - first, 0))
            for chunk_index, table in enumerate(tables, start=first):
                yield part.file_index, chunk_index, table

    def _start_chunk(
        self, file_index: int, chunk_index: int, table: pa.Table, pool: ThreadPoolExecutor | None
    ) -> ChunkScores | None:
        """Check a chunk and start scoring it; None when an interrupted run finished it."""
        name = PART_NAME.format(file=file_index, chunk=chunk_index)
        if name in self.done:
            self._resume(name)
            return None
        began = time.perf_counter()
        features = self.encoder.columns(table)
        first_row = chunk_index * self.chunk_rows
        path = self.files[file_index]
        reject_mask, relevant = apply_policies(
            features.problems, self.policies, table, path, first_row
        )
        rejects = None
        if reject_mask is not None:
            features = features.take(~reject_mask)
            rejects = rejects_columns(
                self.model, table, self.id_column, reject_mask, relevant, first_row
            )
        scores = start_forward(
            self.model.runtime, self.encoder, features, self.model.preprocessor, pool
        )
        return ChunkScores(
            name=name,
            input_file=path.name,
            rows=table.num_rows,
            ids=table.column(self.id_column) if self.id_column is not None else None,
            keep=None if reject_mask is None else ~reject_mask,
            scores=scores,
            began=began,
            rejects=rejects,
        )

    def _resume(self, name: str) -> None:
        """Count a finished part (and its rejects) as if this call had written it."""
        path = self.output_dir / name
        self.tally.parts[name] = existing_part(path)
        rejected = self.output_dir / REJECTS_DIR / name
        if rejected.is_file():
            self.tally.rejects[name] = existing_part(rejected)
        self.tally.add_counts(*part_counts(self.model, path))
        self.tally.skipped += 1

    def _record_progress(self) -> None:
        """Record the fingerprint before the first part (in the writer thread, which runs
        its tasks in order)."""
        if not self._recorded.is_set():
            write_progress(self.output_dir, self.hashing)
            self._recorded.set()

    def _collect(self, future: Future[Any], bar: Any) -> None:
        written = future.result()
        if written is None:  # the progress file
            return
        part, rejected, counts, predicted, chunk = written
        self.tally.parts[part["name"]] = part
        if rejected is not None:
            self.tally.rejects[rejected["name"]] = rejected
        self.tally.add_counts(counts, predicted)
        self.tally.latencies.append(chunk.scores.finished() - chunk.began)
        self.tally.written += 1
        self.tally.rows_this_call += chunk.rows
        bar.update(chunk.rows)

    def _write(
        self, chunk: ChunkScores
    ) -> tuple[
        dict[str, Any], dict[str, Any] | None, np.ndarray | None, np.ndarray | None, ChunkScores
    ]:
        """Tabulate and write a chunk (in the writer thread), a row group at a time as the
        scores holding it are done; the footer's metadata, which holds the input's digest,
        is added once the hash is known, and the progress file is written before the part.

        Returns:
            The scored part's manifest entry, the rejects part's (or None), the chunk's
            score histogram counts (classifiers; None for regression), its rows per
            predicted class (multiclass, else None), and the chunk.
        """
        sink = pa.BufferOutputStream()
        counts, predicted, metadata = _tabulate(
            sink, self.model, self.id_column, chunk, self.hashing
        )
        self._record_progress()
        rejects = None if chunk.rejects is None else with_metadata(chunk.rejects, metadata)
        part, rejected = write_chunk(
            self.output_dir, chunk.name, sink.getvalue(), len(chunk.scores), rejects
        )
        return part, rejected, counts, predicted, chunk


def _tabulate(
    sink: pa.BufferOutputStream,
    model: ScoringModel,
    id_column: str | None,
    chunk: ChunkScores,
    hashing: Future[Identity],
) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, str]]:
    """Encode a chunk's scored part into ``sink``, a row group of :data:`PART_ROW_GROUP_ROWS`
    rows as soon as its scores are done, the metadata last, once the input is hashed.

    Returns:
        The score histogram counts (classifiers; None for regression), the rows per
        predicted class (multiclass; else None) and the part's metadata.
    """
    ids = None
    if id_column is not None and chunk.ids is not None:
        ids = chunk.ids if chunk.keep is None else chunk.ids.filter(pa.array(chunk.keep))
        # One contiguous array, so the part's bytes do not depend on how reads were batched.
        ids = ids.combine_chunks()
    schema = part_schema(model, None if ids is None else pa.field(id_column, ids.type))
    counts: np.ndarray | None = None
    predicted: np.ndarray | None = None
    rows = len(chunk.scores)
    # The schema pyarrow would store (ARROW:schema) is added with the metadata, at the end.
    with pq.ParquetWriter(sink, schema, store_schema=False, **parquet_options(schema)) as parquet:
        # A chunk whose rows were all rejected still gets one (empty) row group.
        for start in range(0, max(rows, 1), PART_ROW_GROUP_ROWS):
            stop = min(start + PART_ROW_GROUP_ROWS, rows)
            scores = chunk.scores.wait(stop)[start:stop]
            columns: list[Any] = [] if ids is None else [ids.slice(start, stop - start)]
            outputs, group_counts, group_predicted = score_arrays(model, scores)
            counts, predicted = summed(counts, group_counts), summed(predicted, group_predicted)
            parquet.write_table(pa.Table.from_arrays([*columns, *outputs], schema=schema))
        metadata = {**hashing.result().metadata, "input_file": chunk.input_file}
        parquet.add_key_value_metadata(stored_schema(schema.with_metadata(prefixed(metadata))))
    return counts, predicted, metadata


def in_background(function: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``function(*args)`` in a daemon thread (which never delays the interpreter's exit)."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as error:  # delivered to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name="stemma-score-hash", daemon=True).start()
    return future


# ---------------------------------------------------------------------------------------
# Reading the input a chunk at a time, through pyarrow, in a thread ahead of the model


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
