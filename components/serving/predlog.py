"""The endpoint's log: scored rows, the shadow's scores and labels, as Parquet parts by day.

A request's rows are appended to a buffer in memory (:meth:`PredictionLog.record`, a few
microseconds on the event loop); a writer thread turns the buffer into a Parquet part once
``endpoint.log.rotate_rows`` rows wait or the oldest has waited ``rotate_s`` seconds, and
at shutdown. The layout is fixed, since the drift monitor and the label joins read it::

    <path>/predictions/<YYYY-MM-DD>/part-<YYYYMMDDTHHMMSSffffff>-<8 hex>.parquet
    <path>/shadow/<YYYY-MM-DD>/part-....parquet
    <path>/labels/<YYYY-MM-DD>/part-....parquet

The day and the time in a part's name are those of its first row (UTC). A part appears
whole or not at all: in a folder it is written under a temporary name (``.tmp-<pid>-``,
which readers skip) and renamed; on S3 it is uploaded complete in one request. Every part
of a kind has the same columns and types, so a day folder (or all of them) reads as one
table. Ids are logged as text (a JSON number 7 as ``"7"``), whatever type each caller sent,
so that predictions and labels join on them. The log never slows a request: past
``max_buffered_rows`` rows per kind, rows are dropped and counted; a failed write keeps its
rows for the next try, within that bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import pyarrow as pa

from stemma.components.data.prediction_log import (
    KINDS,
    LABELS,
    LATENCY_COLUMN,
    MODEL_VERSION_COLUMN,
    PREDICTION_COLUMN,
    PREDICTIONS,
    REQUEST_ID_COLUMN,
    ROW_COLUMN,
    SCORE_COLUMN,
    SHADOW,
    SHADOW_VARIANT,
    TIME_COLUMN,
    VARIANT_COLUMN,
    id_text,
    probability_columns,
)
from stemma.components.errors import SpecError
from stemma.components.runtime.loading import first_line
from stemma.components.scoring.inputs import plural
from stemma.components.serving.logstore import (
    TIME_TYPE,
    FolderStore,
    S3Store,
    log_schemas,
    part_name,
    reserved_columns,
)
from stemma.components.spec.document import path_problem

if TYPE_CHECKING:
    from stemma.components.serving.metrics import EndpointMetrics
    from stemma.components.spec import Spec
    from stemma.components.spec.operations import EndpointLogSpec

#: Seconds before a failed part is tried again.
RETRY_S = 5.0
#: Keys the request-id hash that picks the logged share, so that it is independent of any
#: other hash of request ids (the canary's).
SAMPLE_PERSON = b"stemma-log"

_LOG = logging.getLogger(__name__)


class _Scored(NamedTuple):
    """A request's scored rows, as :meth:`PredictionLog.record` was given them."""

    features: pa.Table
    request_id: str
    ids: Sequence[Any] | None
    versions: Sequence[str]
    variants: Sequence[str]
    predictions: Sequence[int | str | None] | None
    scores: Sequence[float | None]
    rows: Sequence[int] | None
    latency_ms: float
    probabilities: Sequence[Mapping[str, float] | None] | None


class _Shadow(NamedTuple):
    """A request's rows scored in shadow, as :meth:`PredictionLog.record_shadow` was given."""

    request_id: str
    rows: Sequence[int]
    ids: Sequence[Any] | None
    version: str
    predictions: Sequence[int | str | None] | None
    scores: Sequence[float | None]
    probabilities: Sequence[Mapping[str, float] | None] | None


class _Labels(NamedTuple):
    table: pa.Table


@dataclass
class _Entry:
    """One call's rows, as given: turned into Arrow in the writer thread."""

    rows: int
    received: float
    arrived: float  # time.monotonic() when buffered, for rotation by age
    payload: _Scored | _Shadow | _Labels


@dataclass
class _Buffer:
    entries: deque[_Entry] = field(default_factory=deque)
    pending_rows: int = 0  # rows in entries
    held_rows: int = 0  # rows in entries and in the part being written (the memory bound)
    retry_at: float = 0.0
    dropped_rows: int = 0


class PredictionLog:
    """Scored rows, shadow scores and labels, buffered and written as Parquet parts.

    Build it with :meth:`from_spec`; :meth:`start` starts the writer thread and
    :meth:`close` writes what is buffered and stops it. The ``record`` methods only
    append to a buffer: they never wait for a write, and drop (and count) rows past
    ``max_buffered_rows`` per kind. Callers hand over their sequences and tables and
    must not change them afterwards.

    Attributes:
        id_column: the spec's id column (``data.id``), or None.
        target_column: the spec's label column (``data.target``).
        task: ``binary``, ``multiclass`` or ``regression``.
        classes: a multiclass model's classes, whose probabilities the log's columns hold
            (those of the model served at start); empty for other tasks.
        schemas: the columns of each kind's parts.
        location: where the parts go (a folder, or ``s3://bucket/prefix``).
    """

    def __init__(
        self,
        store: FolderStore | S3Store,
        settings: EndpointLogSpec,
        schemas: Mapping[str, pa.Schema],
        *,
        id_column: str | None,
        target_column: str,
        task: str,
        classes: Sequence[int | str] = (),
        metrics: EndpointMetrics | None = None,
    ) -> None:
        self.store = store
        self.location = store.location
        self.settings = settings
        self.schemas = dict(schemas)
        self.id_column = id_column
        self.target_column = target_column
        self.task = task
        self.classes = tuple(classes) if task == "multiclass" else ()
        self.metrics = metrics
        reserved = reserved_columns(task, self.classes)
        self._features = pa.schema(
            [
                column
                for column in schemas[PREDICTIONS]
                if column.name not in reserved and column.name != id_column
            ]
        )
        # Each class's key in the answer's probabilities, and its column.
        self._probabilities = list(
            zip(map(str, self.classes), probability_columns(self.classes), strict=True)
        )
        self._buffers = {kind: _Buffer() for kind in KINDS}
        self._condition = threading.Condition()
        self._stopping = False
        self._closed = False
        self._prepared = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_spec(
        cls,
        spec: Spec,
        root: Path,
        signature_columns: Sequence[tuple[str, str]],
        task: str,
        *,
        classes: Sequence[int | str] = (),
        metrics: EndpointMetrics | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> PredictionLog | None:
        """The log ``endpoint.log`` describes, or None when it is unset.

        Args:
            spec: the pipeline spec (``endpoint.log``, ``data.id``, ``data.target``).
            root: the project root, which a relative ``endpoint.log.path`` is under.
            signature_columns: the served model's signature, ``(name, MLflow type)``.
            task: ``binary``, ``multiclass`` or ``regression``.
            classes: the served model's classes, in output order (multiclass).
            metrics: the endpoint's metrics, which count rows, parts and failures.
            environ: where the S3 endpoint is read (default: ``os.environ``).

        Raises:
            SpecError: the path leaves the project, or a feature is named like a column
                the log adds.
        """
        settings = spec.endpoint.log if spec.endpoint is not None else None
        if settings is None:
            return None
        root = Path(root)
        schemas = log_schemas(
            signature_columns,
            task,
            id_column=spec.data.id,
            target_column=spec.data.target,
            classes=classes,
        )
        store: FolderStore | S3Store
        if settings.path.startswith("s3://"):
            store = S3Store(settings.path, os.environ if environ is None else environ)
        else:
            problem = path_problem(settings.path, root, spec.pipeline.allowed_roots)
            if problem:
                raise SpecError(f"endpoint.log.path: {problem}")
            store = FolderStore(root / settings.path)
        return cls(
            store,
            settings,
            schemas,
            id_column=spec.data.id,
            target_column=spec.data.target,
            task=task,
            classes=classes,
            metrics=metrics,
        )

    @property
    def dropped_rows(self) -> int:
        """Rows of every kind dropped so far (buffer full, log closed, rows it cannot store)."""
        with self._condition:
            return sum(buffer.dropped_rows for buffer in self._buffers.values())

    def dropped(self, kind: str) -> int:
        """Rows of ``kind`` dropped so far."""
        with self._condition:
            return self._buffers[kind].dropped_rows

    def sampled(self, request_id: str) -> bool:
        """Whether a request's rows are logged (``endpoint.log.sample``, by request id)."""
        share = self.settings.sample
        if share >= 1.0:
            return True
        digest = hashlib.blake2b(request_id.encode(), digest_size=8, person=SAMPLE_PERSON)
        return int.from_bytes(digest.digest()) < share * 2.0**64

    # -- recording: on the request path, so only appends ------------------------------

    def record(
        self,
        features: pa.Table,
        *,
        request_id: str,
        received: float,
        ids: Sequence[Any] | None,
        versions: Sequence[str],
        variants: Sequence[str],
        predictions: Sequence[int | str | None] | None,
        scores: Sequence[float | None],
        latency_ms: float,
        rows: Sequence[int] | None = None,
        probabilities: Sequence[Mapping[str, float] | None] | None = None,
    ) -> None:
        """Buffer a request's scored rows (the writer thread turns them into Arrow).

        Args:
            features: the scored rows' feature columns, as the request gave them.
            request_id: the request's id.
            received: ``time.time()`` when the request arrived.
            ids: the id column's value per scored row, or None.
            versions: the model version that scored each row.
            variants: ``champion`` or ``canary``, per row.
            predictions: the class per row (classifiers), or None.
            scores: the score per row.
            latency_ms: the request's time to its answer, in milliseconds.
            rows: each row's position in the request (default: 0, 1, ...).
            probabilities: per row, each class's probability by the class as text
                (multiclass; a class the log has no column for is left out), or None.
        """
        if not len(scores) or not self.sampled(request_id):
            return
        payload = _Scored(
            features,
            request_id,
            ids,
            versions,
            variants,
            predictions,
            scores,
            rows,
            latency_ms,
            probabilities,
        )
        self._add(PREDICTIONS, len(scores), received, payload)

    def record_shadow(
        self,
        *,
        request_id: str,
        received: float,
        rows: Sequence[int],
        ids: Sequence[Any] | None,
        version: str,
        predictions: Sequence[int | str | None] | None,
        scores: Sequence[float | None],
        probabilities: Sequence[Mapping[str, float] | None] | None = None,
    ) -> None:
        """Buffer the challenger's scores of a request's rows, scored in shadow.

        Args:
            rows: each scored row's position in the request.
            version: the challenger's version.
            ids, predictions, scores, probabilities: per scored row, as in :meth:`record`.
        """
        if not len(scores) or not self.sampled(request_id):
            return
        payload = _Shadow(request_id, rows, ids, version, predictions, scores, probabilities)
        self._add(SHADOW, len(scores), received, payload)

    def record_labels(self, table: pa.Table) -> int:
        """Buffer labels: a table of the id and target columns, already checked.

        Returns:
            The rows recorded: all of them, or 0 when the buffer cannot take them all.
        """
        if table.num_rows == 0:
            return 0
        added = self._add(LABELS, table.num_rows, time.time(), _Labels(table))
        return table.num_rows if added else 0

    def _add(
        self, kind: str, rows: int, received: float, payload: _Scored | _Shadow | _Labels
    ) -> bool:
        with self._condition:
            buffer = self._buffers[kind]
            added = not self._closed and buffer.held_rows + rows <= self.settings.max_buffered_rows
            if added:
                buffer.entries.append(_Entry(rows, received, time.monotonic(), payload))
                buffer.pending_rows += rows
                buffer.held_rows += rows
                # The writer sleeps until the oldest row's deadline: wake it for a new
                # deadline (a first row) or a full part.
                if len(buffer.entries) == 1 or buffer.pending_rows >= self.settings.rotate_rows:
                    self._condition.notify()
            else:
                buffer.dropped_rows += rows
        if not added and self.metrics is not None:
            self.metrics.log_dropped_rows.labels(kind=kind).inc(rows)
        return added

    # -- the writer ---------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the log's folders and remove dead writers' temporary files (a folder), or
        connect (S3). :meth:`start` calls it when it has not run.

        Raises:
            LogError: the folder cannot be made.
        """
        self.store.prepare()
        self._prepared = True

    def start(self) -> None:
        """Start the writer thread."""
        if not self._prepared:
            self.prepare()
        self._thread = threading.Thread(target=self._run, name="stemma-endpoint-log", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is buffered and stop; rows recorded afterwards are dropped."""
        with self._condition:
            self._closed = True
            self._stopping = True
            self._condition.notify()
        thread = self._thread
        if thread is None:  # never started: write here
            if not self._prepared:
                self.prepare()
            self._flush()
            return
        thread.join(timeout_s)
        if thread.is_alive():
            _LOG.warning(
                "endpoint log: still writing to %s after %.0f s; rows not yet written may be lost",
                self.location,
                timeout_s,
            )

    def _run(self) -> None:
        while True:
            with self._condition:
                due, wait = self._due(time.monotonic())
                while not due and not self._stopping:
                    self._condition.wait(wait)
                    due, wait = self._due(time.monotonic())
                stopping = self._stopping
            if stopping:
                self._flush()
                return
            for kind in due:
                self._write_part(kind)

    def _due(self, now: float) -> tuple[list[str], float | None]:
        """The kinds with a part to write now, and the seconds until the next is due."""
        due: list[str] = []
        wait: float | None = None
        settings = self.settings
        for kind, buffer in self._buffers.items():
            if not buffer.entries:
                continue
            if now < buffer.retry_at:
                deadline = buffer.retry_at
            elif buffer.pending_rows >= settings.rotate_rows:
                deadline = now
            else:
                deadline = buffer.entries[0].arrived + settings.rotate_s
            if deadline <= now:
                due.append(kind)
            else:
                wait = deadline - now if wait is None else min(wait, deadline - now)
        return due, wait

    def _flush(self) -> None:
        """Write every buffered row (a part that fails now is reported lost)."""
        for kind in KINDS:
            while self._buffers[kind].entries:
                self._write_part(kind, last_try=True)

    def _take(self, kind: str) -> list[_Entry]:
        """The oldest entries of a kind, up to a part's rows (one entry at least)."""
        with self._condition:
            buffer = self._buffers[kind]
            taken: list[_Entry] = []
            rows = 0
            while buffer.entries and rows < self.settings.rotate_rows:
                entry = buffer.entries.popleft()
                taken.append(entry)
                rows += entry.rows
            buffer.pending_rows -= rows
            return taken

    def _write_part(self, kind: str, *, last_try: bool = False) -> None:
        """Write one part of ``kind``'s oldest rows; on failure they wait for the next try."""
        entries = self._take(kind)
        try:
            table, kept = self._table(kind, entries)
        except Exception as error:  # a fault of the log itself, not of a caller's values
            self._failed(kind, entries, sum(entry.rows for entry in entries), error, last_try)
            return
        unstorable = sum(entry.rows for entry in entries) - table.num_rows
        if unstorable:
            self._release(kind, unstorable, dropped=True)
        if not kept:
            return
        try:
            day, name = part_name(kept[0].received)
            self.store.write(kind, day, name, table)
        except Exception as error:  # any failure of the storage: the rows wait
            self._failed(kind, kept, table.num_rows, error, last_try)
            return
        self._release(kind, table.num_rows)
        if self.metrics is not None:
            self.metrics.log_rows.labels(kind=kind).inc(table.num_rows)
            self.metrics.log_parts.labels(kind=kind).inc()

    def _failed(
        self, kind: str, kept: list[_Entry], rows: int, error: Exception, last_try: bool
    ) -> None:
        """A part failed to write: its rows wait for the next try (at shutdown: lost)."""
        if self.metrics is not None:
            self.metrics.log_failed_writes.labels(kind=kind).inc()
        what = plural(rows, f"{kind} row")
        if last_try:
            _LOG.error(
                "endpoint log: cannot write %s to %s at shutdown; they are lost: %s",
                what,
                self.location,
                first_line(error),
            )
            self._release(kind, rows, dropped=True)
            return
        _LOG.warning(
            "endpoint log: cannot write %s to %s; trying again in %.0f s: %s",
            what,
            self.location,
            RETRY_S,
            first_line(error),
        )
        with self._condition:
            buffer = self._buffers[kind]
            buffer.entries.extendleft(reversed(kept))
            buffer.pending_rows += rows
            buffer.retry_at = time.monotonic() + RETRY_S

    def _release(self, kind: str, rows: int, *, dropped: bool = False) -> None:
        """Rows leave the buffer: written, or dropped (and counted)."""
        with self._condition:
            buffer = self._buffers[kind]
            buffer.held_rows -= rows
            if dropped:
                buffer.dropped_rows += rows
        if dropped and self.metrics is not None:
            self.metrics.log_dropped_rows.labels(kind=kind).inc(rows)

    # -- rows to Arrow: in the writer thread --------------------------------------------

    def _table(self, kind: str, entries: list[_Entry]) -> tuple[pa.Table, list[_Entry]]:
        """A part's table from its entries, and the entries it holds: an entry whose values
        do not fit the log's columns (a caller's fault) is left out, with a warning."""
        try:
            return self._entries_table(kind, entries), entries
        except CANNOT_STORE:
            pass  # find the entries at fault, one by one
        tables: list[pa.Table] = []
        kept: list[_Entry] = []
        for entry in entries:
            try:
                tables.append(self._entries_table(kind, [entry]))
            except CANNOT_STORE as error:
                _LOG.warning(
                    "endpoint log: %s of %s left out: %s",
                    plural(entry.rows, "row"),
                    kind,
                    first_line(error),
                )
                continue
            kept.append(entry)
        if not tables:
            return self.schemas[kind].empty_table(), kept
        return pa.concat_tables(tables), kept

    def _entries_table(self, kind: str, entries: list[_Entry]) -> pa.Table:
        if kind == LABELS:
            return pa.concat_tables(self._labels_table(entry) for entry in entries)
        # Column by column over all entries: a part may hold 10,000 one-row requests.
        payloads: list[Any] = [entry.payload for entry in entries]
        repeat = pa.array(np.repeat(np.arange(len(entries)), [entry.rows for entry in entries]))

        def per_entry(values: list[Any], arrow_type: pa.DataType) -> pa.Array:
            return pa.array(values, arrow_type).take(repeat)

        def per_row(name: str, arrow_type: pa.DataType) -> pa.Array:
            return pa.array(_per_row(entries, name), arrow_type)

        times = [_microseconds(entry.received) for entry in entries]
        columns = {
            REQUEST_ID_COLUMN: per_entry([payload.request_id for payload in payloads], pa.string()),
            ROW_COLUMN: per_row("rows", pa.int32()),
            TIME_COLUMN: per_entry(times, pa.int64()).cast(TIME_TYPE),
            SCORE_COLUMN: per_row("scores", pa.float64()),
        }
        schema = self.schemas[kind]
        if PREDICTION_COLUMN in schema.names:
            columns[PREDICTION_COLUMN] = per_row(
                "predictions", schema.field(PREDICTION_COLUMN).type
            )
        if self._probabilities:
            columns.update(self._probability_arrays(_per_row(entries, "probabilities")))
        if self.id_column is not None:
            columns[self.id_column] = pa.array(_id_texts(_per_row(entries, "ids")), pa.string())
        if kind == PREDICTIONS:
            columns[MODEL_VERSION_COLUMN] = per_row("versions", pa.string())
            columns[VARIANT_COLUMN] = per_row("variants", pa.string())
            latencies = [payload.latency_ms for payload in payloads]
            columns[LATENCY_COLUMN] = per_entry(latencies, pa.float64())
            features = self._features_of(payloads)
            columns.update(zip(features.column_names, features.columns, strict=True))
        else:
            columns[MODEL_VERSION_COLUMN] = per_entry(
                [payload.version for payload in payloads], pa.string()
            )
            columns[VARIANT_COLUMN] = per_entry([SHADOW_VARIANT] * len(payloads), pa.string())
        return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)

    def _probability_arrays(
        self, probabilities: list[Mapping[str, float] | None]
    ) -> dict[str, pa.Array]:
        """Each class's probability column from the rows' ``{class: probability}`` (a row
        without them, or a class its model lacks, is null)."""
        return {
            column: pa.array(
                [None if row is None else row.get(key) for row in probabilities], pa.float64()
            )
            for key, column in self._probabilities
        }

    def _features_of(self, payloads: list[_Scored]) -> pa.Table:
        """The requests' feature columns in the signature's types (a request's integers
        where the signature says double become doubles), in one chunk."""
        for payload in payloads:
            if payload.features.num_rows != len(payload.scores):
                raise ValueError(
                    f"features hold {payload.features.num_rows} rows "
                    f"for {len(payload.scores)} scores"
                )
        tables = [payload.features for payload in payloads]
        try:
            joined = pa.concat_tables(tables)  # the common case: requests of one shape
        except pa.ArrowInvalid:
            joined = pa.concat_tables(tables, promote_options="permissive")
        joined = joined.combine_chunks()
        columns = []
        for column in self._features:
            if column.name not in joined.column_names:
                columns.append(pa.nulls(joined.num_rows, column.type))
                continue
            given = joined.column(column.name)
            try:
                columns.append(given.cast(column.type))
            except pa.ArrowException:
                # Arrow's message quotes the value; the log lines never hold a row's values.
                raise ValueError(
                    f"column {column.name}: {given.type} values that are no {column.type}"
                ) from None
        return pa.Table.from_arrays(columns, schema=self._features)

    def _labels_table(self, entry: _Entry) -> pa.Table:
        table = cast(_Labels, entry.payload).table
        schema = self.schemas[LABELS]
        target = schema.field(self.target_column).type
        ids = _id_texts(table.column(self.id_column).to_pylist())
        times = pa.array([_microseconds(entry.received)] * entry.rows, pa.int64())
        columns = [
            pa.array(ids, pa.string()),
            table.column(self.target_column).cast(target),
            times.cast(TIME_TYPE),
        ]
        return pa.Table.from_arrays(columns, schema=schema)


#: What a caller's values that do not fit the log's columns raise.
CANNOT_STORE = (pa.ArrowException, TypeError, ValueError, KeyError, OverflowError)


def _microseconds(epoch_s: float) -> int:
    return round(epoch_s * 1_000_000)


def _id_texts(ids: Iterable[Any]) -> list[str | None]:
    return [id_text(value) for value in ids]


def _per_row(entries: list[_Entry], name: str) -> list[Any]:
    """The entries' per-row values of a field, in order (None: no value; row positions
    0, 1, ... for ``rows``)."""
    values: list[Any] = []
    for entry in entries:
        given = getattr(entry.payload, name)
        if given is None:
            values.extend(range(entry.rows) if name == "rows" else [None] * entry.rows)
        elif len(given) != entry.rows:
            raise ValueError(f"{name} holds {len(given)} values for {entry.rows} rows")
        else:
            values.extend(given)
    return values
