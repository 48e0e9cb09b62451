"""Batch scoring: a registered model over Parquet or CSV files, in bounded memory, resumably.

The public surface of the scoring package, behind ``stemma run score``.
:func:`check_input_schema` compares every input file's schema with the model's signature
before a row is read; :func:`score_files` streams the rows through the model's runtime a
chunk at a time and writes one Parquet part per chunk (see :mod:`.output` for the
folder's layout); :func:`plan_scoring`, :func:`score_range` and :func:`finish_scoring`
split the same scoring into ranges that other processes score. Chunk ``k`` of file ``f``
holds rows ``k * chunk_rows`` to ``(k + 1) * chunk_rows - 1`` of that file, and its bytes
depend only on the fingerprint (model, runtime backend, input, settings), so a run killed
at any point resumes to the bytes of one never interrupted.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stemma.components.platform.files import TEMP_PREFIX
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.scoring.inputs import check_input_schema, input_files
from stemma.components.scoring.job import (
    Opened,
    RangeResult,
    ScoringPlan,
    ScoringResult,
    abandon_scoring,
    finish_scoring,
    open_output,
    plan_ranges,
    plan_scoring,
    publish,
    result_of,
)
from stemma.components.scoring.output import HISTOGRAM_BINS, REJECTS_DIR, SUCCESS_FILE
from stemma.components.scoring.pipeline import ChunkRange, Pipeline, Tally

__all__ = [
    "HISTOGRAM_BINS",
    "REJECTS_DIR",
    "SUCCESS_FILE",
    "TEMP_PREFIX",
    "ChunkRange",
    "RangeResult",
    "ScoringModel",
    "ScoringPlan",
    "ScoringResult",
    "abandon_scoring",
    "check_input_schema",
    "default_model_threads",
    "finish_scoring",
    "input_files",
    "load_scoring_model",
    "plan_ranges",
    "plan_scoring",
    "score_files",
]


def default_model_threads() -> int:
    """Threads running the network while the input is read: one per core but one.

    The reader, the input's hasher and the writer run beside them and together keep about
    one core busy. Once the input is all read, the chunks left run on one thread per core.
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

    The folder is keyed by a fingerprint (model version, weights, runtime backend, input
    digest, settings): complete for it, it is verified and left; interrupted, resumed;
    holding another fingerprint's output, emptied first. The call holds the folder's lock
    (:class:`.locks.FolderLock`) throughout, and writes the manifest only once every part
    read back matches what was written.

    Args:
        model: from :func:`load_scoring_model`.
        files: from :func:`input_files`.
        output_dir: the output folder (created when missing).
        id_column: the column copied to the output to identify rows, or None.
        chunk_rows: rows per chunk (and per part): bounds memory.
        invalid_rows: ``reject`` or ``error`` for rows with a missing or non-finite value
            (and a missing category).
        unknown_categories: ``reject``, ``error``, or ``score`` (encoded as unseen).
        threads: threads running the network (default: :func:`default_model_threads`,
            then one per core once the input is all read); the output does not depend on
            it. The runtime's own threads are set once per process
            (:func:`.runtime.backends.set_threads`), never here.
        progress: show a progress bar; None shows one when stderr is a terminal.
        lock_wait_seconds: how long to wait for another scoring that holds the folder
            (0: refuse at once).

    Raises:
        DataError: a schema problem, an unreadable file, a row that cannot be scored under
            an ``error`` policy (naming file, rows and reasons), an output folder that
            holds files Stemma did not write or lies around the input, or a part that no
            longer matches what was written (it is removed: a rerun scores it again).
        FolderBusyError: another live process is writing into the folder (it is named).
        ValueError: an unknown policy, or a chunk size or thread count below 1.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
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
        return _score_opened(
            model,
            opened,
            (started, cpu_started),
            id_column=id_column,
            chunk_rows=chunk_rows,
            threads=threads,
            progress=progress,
        )
    finally:
        opened.release()


def _score_opened(
    model: ScoringModel,
    opened: Opened,
    clocks: tuple[float, float],
    *,
    id_column: str | None,
    chunk_rows: int,
    threads: int | None,
    progress: bool | None,
) -> ScoringResult:
    """The part of :func:`score_files` done under the folder's lock; ``clocks`` are the
    wall and CPU clocks when it began."""
    started, cpu_started = clocks
    if opened.manifest is not None:
        return result_of(opened, opened.manifest, Tally(), started, cpu_started)
    tally = Tally(rows_per_file=[0] * len(opened.files))
    Pipeline(
        model,
        opened.files,
        opened.output_dir,
        tally,
        opened.hashing,
        done=opened.done,
        id_column=id_column,
        chunk_rows=chunk_rows,
        policies=opened.policies,
        workers=threads or default_model_threads(),
        tail_workers=threads or os.cpu_count() or 1,
    ).run(show=sys.stderr.isatty() if progress is None else progress)
    return publish(
        model,
        opened,
        tally,
        id_column=id_column,
        chunk_rows=chunk_rows,
        started=started,
        cpu_started=cpu_started,
    )
