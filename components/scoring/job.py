"""A scoring's job: the output folder opened under its lock, the manifest published, and
the range API (plan, score ranges anywhere, finish) that fans one scoring out over Dask."""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.platform import locks
from stemma.components.platform.files import fsync_folder
from stemma.components.runtime.loading import ScoringModel, sha256_file
from stemma.components.scoring import output
from stemma.components.scoring.inputs import (
    INVALID_ROW_POLICIES,
    MAX_NAMED,
    UNKNOWN_CATEGORY_POLICIES,
    check_input_schema,
    check_policy,
    file_format,
    plural,
)
from stemma.components.scoring.output import (
    OUTPUT_FORMAT,
    REJECTS_DIR,
    SUCCESS_FILE,
    UNIT_EDGES,
    Identity,
    damaged_parts,
    fingerprint,
    finished_parts,
    holds_output,
    identify,
    json_bytes,
    output_columns,
    prediction_counts,
    prepare_output,
    refuse_output_around_input,
    remove_chunks,
    remove_strays,
    value_histogram,
    write_progress,
)
from stemma.components.scoring.pipeline import ChunkRange, Pipeline, Tally, in_background


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
        score_histogram: ``edges`` and ``counts`` of the scores (also in the manifest): a
            classifier's over [0, 1] (multiclass: the predicted class's probability), a
            regression's over the range of its values.
        output_digest: sha256 of the manifest's bytes, a digest of the whole output.
        rows_scored_now: rows of the chunks scored by this call (resumed parts excluded).
        cpu_seconds: CPU time the call spent, every thread of the process counted (so
            the few other threads of the process, a flow's own among them, too); for a
            fanned-out scoring, the planning process's plus each worker process's while it
            scored a range (see :func:`worker_cpu_seconds`).
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
    rows_scored_now: int = 0
    cpu_seconds: float = 0.0

    def summary(self) -> str:
        """One line for the end of a run."""
        model = self.manifest["model"]
        label = f"{model['name']} v{model['version']}"
        parts = plural(len(self.manifest["parts"]), "part")
        backend = self.backend
        if self.already_complete:
            return (
                f"{self.output_dir} already holds the scores of {label} for this input "
                f"({self.rows_scored:,} rows scored, {self.rows_rejected:,} rejected, {parts}, "
                f"{backend}): nothing to do"
            )
        resumed = f", {self.parts_skipped} resumed" if self.parts_skipped else ""
        return (
            f"scored {self.rows_scored:,} rows ({self.rows_rejected:,} rejected) with {label} "
            f"in {self.seconds:.1f} s ({_rate(self.rows_per_second)} rows/s on {backend}) -> "
            f"{self.output_dir} ({parts}{resumed})"
        )

    @property
    def prediction_counts(self) -> list[dict[str, Any]]:
        """Rows predicted per class, ``[{"class": ..., "rows": ...}]`` in the classes' order
        (multiclass; empty for other tasks)."""
        return list(self.manifest.get("prediction_counts", []))

    @property
    def backend(self) -> str:
        """The runtime that scored: ``onnxruntime``, or ``eager (<why>)``."""
        runtime = self.manifest["model"].get("runtime") or {}
        name = str(runtime.get("backend", "unknown"))
        return f"{name} ({runtime['reason']})" if runtime.get("reason") else name


def _rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


@dataclass(frozen=True)
class Opened:
    """An output folder made ready for a scoring: checked, and emptied or resumed."""

    files: list[Path]
    output_dir: Path
    extras: list[str]
    policies: dict[str, str]
    hashing: Future[Identity]
    invalidated: bool
    done: set[str]  # parts an interrupted run of the same scoring finished
    manifest: dict[str, Any] | None  # the manifest, when the folder is already complete
    lock: locks.FolderLock | None  # held by this process until the caller releases it

    def release(self) -> None:
        """Give the folder's lock back (when this process holds it)."""
        if self.lock is not None:
            self.lock.release()


def open_output(
    model: ScoringModel,
    files: Sequence[Path],
    output_dir: Path,
    *,
    id_column: str | None,
    chunk_rows: int,
    invalid_rows: str,
    unknown_categories: str,
    lock_wait_seconds: float = 0.0,
) -> Opened:
    """Check the arguments and the input's schemas, take the folder's lock, then decide
    what the folder needs. The caller releases ``lock`` of the result.

    Hashing the input starts in the background; it is waited for only when the folder
    already holds output (to tell whether it belongs to this scoring).
    """
    check_policy("invalid_rows", invalid_rows, INVALID_ROW_POLICIES)
    check_policy("unknown_categories", unknown_categories, UNKNOWN_CATEGORY_POLICIES)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if id_column is not None and id_column in output_columns(model, None):
        raise DataError(
            f"the id column cannot be called {id_column!r}: the output uses that name",
            [f"the model's output columns are {', '.join(output_columns(model, None))}"],
        )
    files = [Path(path) for path in files]
    if not files:
        raise DataError("nothing to score: no input files")
    output_dir = Path(output_dir)
    refuse_output_around_input(files, output_dir)
    extras = check_input_schema(files, model, id_column=id_column, extra_columns="ignore")
    policies = {"invalid_rows": invalid_rows, "unknown_categories": unknown_categories}

    holds_output(output_dir)  # refuses a folder with foreign files before taking it
    lock = locks.FolderLock(
        output_dir, purpose=f"scoring with {model.label}", wait_seconds=lock_wait_seconds
    ).acquire()
    try:
        # Looked at again under the lock: a scoring that held it may have written since.
        occupied = holds_output(output_dir)
        # Hashing the input reads all of it once; it runs beside the scoring when it can.
        hashing = in_background(identify, model, files, chunk_rows, id_column, policies)
        invalidated = False
        done: set[str] = set()
        manifest = None
        if occupied:
            identity = hashing.result()
            state, invalidated, manifest = prepare_output(output_dir, identity.fingerprint)
            if state == "resume":
                done = finished_parts(output_dir, identity.fingerprint)
    except BaseException:
        lock.release()
        raise
    return Opened(files, output_dir, extras, policies, hashing, invalidated, done, manifest, lock)


def publish(
    model: ScoringModel,
    opened: Opened,
    tally: Tally,
    *,
    id_column: str | None,
    chunk_rows: int,
    started: float,
    cpu_started: float | None = None,
) -> ScoringResult:
    """Check the tally, then write the manifest that lists every part: the output is done.

    ``started`` and ``cpu_started`` are ``time.perf_counter()`` and ``time.process_time()``
    when the scoring began in this process."""
    output_dir = opened.output_dir
    remove_strays(output_dir, tally.parts, tally.rejects)
    manifest = _manifest(model, opened, tally, id_column=id_column, chunk_rows=chunk_rows)
    # The parts' renames are made durable before the manifest that lists them.
    for folder in (output_dir / REJECTS_DIR, output_dir):
        if folder.is_dir():
            fsync_folder(folder)
    # Read back from disk: the manifest vouches only for the bytes that are there.
    damaged = damaged_parts(output_dir, manifest)
    if damaged:
        remove_chunks(output_dir, damaged)
        raise DataError(
            f"{output_dir}: {plural(len(damaged), 'part')} read back from disk "
            "differ from what was written; no manifest was written",
            [
                *(f"{name}: {problem}" for name, problem in sorted(damaged.items())[:MAX_NAMED]),
                "they were removed: run the scoring again to score those chunks again",
            ],
        )
    output.write_atomically(output_dir / SUCCESS_FILE, json_bytes(manifest))
    return result_of(opened, manifest, tally, started, cpu_started)


def _manifest(
    model: ScoringModel, opened: Opened, tally: Tally, *, id_column: str | None, chunk_rows: int
) -> dict[str, Any]:
    """The manifest of a finished scoring (its rows checked: none lost or counted twice)."""
    identity = opened.hashing.result()
    rows_scored = sum(entry["rows"] for entry in tally.parts.values())
    rows_rejected = sum(entry["rows"] for entry in tally.rejects.values())
    rows_input = sum(tally.rows_per_file)
    if rows_scored + rows_rejected != rows_input:  # an invariant, checked before it is published
        raise RuntimeError(
            f"scoring lost track of rows: {rows_input} read, {rows_scored} scored, "
            f"{rows_rejected} rejected"
        )
    if model.task in ("binary", "multiclass"):
        histogram = {"edges": UNIT_EDGES.tolist(), "counts": tally.counts.tolist()}
    else:
        histogram = value_histogram([opened.output_dir / name for name in sorted(tally.parts)])
    files = zip(opened.files, identity.md5s, tally.rows_per_file, strict=True)
    extra: dict[str, Any] = {}
    if model.task == "multiclass":
        classes = len(model.preprocessor.class_names())
        predicted = tally.predicted if tally.predicted is not None else np.zeros(classes, np.int64)
        if int(predicted.sum()) != rows_scored:  # an invariant, as the row counts above
            raise RuntimeError(
                f"scoring lost track of predictions: {rows_scored} rows scored, "
                f"{int(predicted.sum())} predicted"
            )
        extra["prediction_counts"] = prediction_counts(model, predicted)
    return {
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
            "runtime": {"backend": model.runtime.backend, "reason": model.runtime.reason},
        },
        "input": {
            "digest": identity.digest,
            "files": [
                {"path": str(path), "name": path.name, "md5": md5, "rows": rows}
                for path, md5, rows in files
            ],
        },
        "id_column": id_column,
        "chunk_rows": chunk_rows,
        "policies": opened.policies,
        "columns": output_columns(model, id_column),
        "parts": [tally.parts[name] for name in sorted(tally.parts)],
        "rejects": [tally.rejects[name] for name in sorted(tally.rejects)],
        "rows": {"input": rows_input, "scored": rows_scored, "rejected": rows_rejected},
        "score_histogram": histogram,
        **extra,
        "stemma_version": _stemma_version(),
    }


# ---------------------------------------------------------------------------------------
# Fanning out: the same scoring, split into ranges of chunks that separate processes score


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
        cpu_started: ``time.process_time()`` then.
        lock_token: names the folder's lock the planning process holds for the whole
            job (None when complete); ranges refuse to write unless it still holds.
    """

    files: tuple[Path, ...]
    output_dir: Path
    id_column: str | None
    chunk_rows: int
    policies: dict[str, str]
    extras: tuple[str, ...]
    identity: Identity
    invalidated: bool
    done: frozenset[str]
    manifest: dict[str, Any] | None
    started: float
    lock_token: str | None = None
    cpu_started: float | None = None

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
    counts: np.ndarray  # score histogram counts (classifiers)
    latencies: list[float]
    rows_scored_now: int  # rows of the chunks scored by this call (not resumed)
    written: int
    skipped: int
    #: Rows predicted per class (multiclass; None otherwise).
    predicted: np.ndarray | None = None
    #: ``(process, CPU clock at start, at end)`` of the process that scored the range
    #: (:func:`process_key`, ``time.process_time()``), for :func:`worker_cpu_seconds`.
    cpu_clock: tuple[str, float, float] | None = None


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
    started, cpu_started = time.perf_counter(), time.process_time()
    opened = open_output(
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
            write_progress(opened.output_dir, opened.hashing)
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
        cpu_started=cpu_started,
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
        if file_format(path) != "parquet":
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
        threads: threads running the network.

    Raises:
        DataError: an unreadable file or a row that cannot be scored under an ``error`` policy.
        ValueError: the plan is complete, belongs to another model, or the range is outside it.
    """
    if plan.complete:
        raise ValueError(f"{plan.output_dir} already holds this scoring: nothing to score")
    expected = fingerprint(
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
    cpu_started = time.process_time()
    hashing: Future[Identity] = Future()
    hashing.set_result(plan.identity)
    tally = Tally(rows_per_file=[0] * len(plan.files))
    Pipeline(
        model,
        list(plan.files),
        plan.output_dir,
        tally,
        hashing,
        done=set(plan.done),
        id_column=plan.id_column,
        chunk_rows=plan.chunk_rows,
        policies=plan.policies,
        workers=threads,
    ).run(show=False, ranges=[chunk_range])
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
        predicted=tally.predicted,
        cpu_clock=(process_key(), cpu_started, time.process_time()),
    )


def process_key() -> str:
    """``host:pid`` of this process: whose CPU clock a range's readings are."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_cpu_seconds(results: Sequence[RangeResult], here: str) -> float:
    """CPU-seconds the processes other than ``here`` spent scoring ``results``' ranges.

    A worker may score several ranges at once (``threads_per_worker`` above 1), and its
    process clock counts all of them in each range's reading: the readings of one process
    are merged as intervals of its clock, so no CPU-second is counted twice. Ranges scored
    in ``here`` itself are left out (the caller's own clock counts them).
    """
    clocks: dict[str, list[tuple[float, float]]] = {}
    for result in results:
        if result.cpu_clock is not None and result.cpu_clock[0] != here:
            process, start, stop = result.cpu_clock
            clocks.setdefault(process, []).append((start, stop))
    total = 0.0
    for intervals in clocks.values():
        reach = float("-inf")
        for start, stop in sorted(intervals):
            total += max(0.0, stop - max(start, reach))
            reach = max(reach, stop)
    return total


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
        hashing: Future[Identity] = Future()
        hashing.set_result(plan.identity)
        opened = Opened(
            files=list(plan.files),
            output_dir=plan.output_dir,
            extras=list(plan.extras),
            policies=plan.policies,
            hashing=hashing,
            invalidated=plan.invalidated,
            done=set(plan.done),
            manifest=plan.manifest,
            lock=None,  # the job's, held by the planning process
        )
        if plan.manifest is not None:
            return result_of(opened, plan.manifest, Tally(), plan.started, plan.cpu_started)
        _check_coverage(plan, [result.chunk_range for result in results])
        tally = Tally(rows_per_file=[0] * len(plan.files))
        for result in results:
            tally.parts.update(result.parts)
            tally.rejects.update(result.rejects)
            tally.rows_per_file[result.chunk_range.file_index] += result.rows
            tally.add_counts(result.counts, result.predicted)
            tally.latencies.extend(result.latencies)
            tally.rows_this_call += result.rows_scored_now
            tally.written += result.written
            tally.skipped += result.skipped
        tally.cpu_elsewhere = worker_cpu_seconds(results, process_key())
        return publish(
            model,
            opened,
            tally,
            id_column=plan.id_column,
            chunk_rows=plan.chunk_rows,
            started=plan.started,
            cpu_started=plan.cpu_started,
        )
    finally:
        abandon_scoring(plan)


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


@functools.cache
def _stemma_version() -> str:
    """The installed version (reading the package metadata takes ~2 ms: once per process)."""
    try:
        return metadata.version("stemma")
    except metadata.PackageNotFoundError:
        return "unknown"


def result_of(
    opened: Opened,
    manifest: dict[str, Any],
    tally: Tally,
    started: float,
    cpu_started: float | None = None,
) -> ScoringResult:
    """What a scoring did: ``manifest`` is the one written, or the one the folder already
    held whole (``opened.manifest``: nothing was scored). ``cpu_started`` is this process's
    ``time.process_time()`` when the scoring began (None: its CPU time is not counted)."""
    already_complete = opened.manifest is not None
    output_dir = opened.output_dir
    manifest_path = output_dir / SUCCESS_FILE
    seconds = time.perf_counter() - started
    cpu_here = time.process_time() - cpu_started if cpu_started is not None else 0.0
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
        invalidated=opened.invalidated,
        extra_columns=list(opened.extras),
        seconds=seconds,
        rows_per_second=tally.rows_this_call / seconds if seconds > 0 else 0.0,
        chunk_latency_ms=latency,
        score_histogram=manifest["score_histogram"],
        output_digest=sha256_file(manifest_path),
        rows_scored_now=tally.rows_this_call,
        cpu_seconds=cpu_here + tally.cpu_elsewhere,
    )
