"""The output folder: parts written atomically, the progress file, the manifest, and checks.

The folder::

    part-00000-00000.parquet           chunk 0 of input file 0: id, prediction, score
                                       (multiclass: and probability_<class> per class)
    rejects/part-00000-00000.parquet   rows of that chunk that could not be scored, and why
    _PROGRESS.json                     the fingerprint of the scoring that writes here
    _SUCCESS                           the manifest, written last
    _LOCK, _LOCK.mutex                 who writes here now (see :mod:`.locks`)

A chunk's rejects part is written before its scored part, so the scored part marks the
chunk done. A folder is fresh (emptied of another scoring's output), resumed, or complete;
a complete one is read back and checked against its manifest before it is trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.model.preprocessing import PROBABILITY_PREFIX
from stemma.components.platform import locks, tags
from stemma.components.platform.files import TEMP_PREFIX, temporary_writer_pid, write_atomically
from stemma.components.runtime.loading import ScoringModel, first_line, sha256_file
from stemma.components.scoring.inputs import MAX_NAMED, REASON_COLUMN, input_digest, plural

#: Name of the part (scored or rejected rows) of chunk ``chunk`` of input file ``file``.
PART_NAME = "part-{file:05d}-{chunk:05d}.parquet"
#: Folder of the rejects parts, inside the output folder.
REJECTS_DIR = "rejects"
#: The fingerprint of the scoring that writes into the folder, written before any part.
PROGRESS_FILE = "_PROGRESS.json"
#: The manifest, written last: its presence means the folder is complete.
SUCCESS_FILE = "_SUCCESS"
#: Layout version of the parts and the manifest; part of the fingerprint (2: integer and
#: float columns stored uncompressed, integers delta-encoded; 3: the prediction too; 4: row
#: groups of PART_ROW_GROUP_ROWS rows, the prediction and the score required columns;
#: 5: scores from the model's runtime, whose ONNX Runtime outputs may differ from torch's
#: in the last bits, and the runtime's backend in the manifest and the fingerprint).
OUTPUT_FORMAT = 5
#: Equal-width bins of the score histogram (over [0, 1] for a classifier: the probability
#: of class 1, or of the predicted class for multiclass).
HISTOGRAM_BINS = 20
#: Prefix of the Parquet key-value metadata Stemma writes on every part.
METADATA_PREFIX = tags.PARQUET_METADATA_PREFIX
#: Rows per row group of a scored part: the writer encodes a row group as soon as its
#: scores are done. Fixed, so that a part's bytes do not depend on timing.
PART_ROW_GROUP_ROWS = 65_536
#: Output columns of a scored part, besides the id column (multiclass: and one
#: ``probability_<class>`` column per class, :data:`PROBABILITY_PREFIX`).
PREDICTION_COLUMN = "prediction"
SCORE_COLUMN = "score"

_LOG = logging.getLogger(__name__)
_PART = re.compile(r"^part-(\d{5})-(\d{5})\.parquet$")


def is_part_name(name: str) -> bool:
    """Whether ``name`` is a part's name (:data:`PART_NAME`)."""
    return _PART.match(name) is not None


def json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How a part's columns are encoded, for what they hold.

    Integer columns are delta-encoded and not compressed: sequential ids take a few bits
    each, and a 0/1 prediction two, at a third of the cost of a dictionary (measured on
    1M rows: 18 ms with a dictionary, 8 ms delta-encoded). Floats (scores) are
    near-unique: stored plain, uncompressed, as Snappy found nothing in them and cost 40%
    of the time to encode a part. The rejects' reasons repeat: dictionary-encoded and
    compressed, and so do a multiclass model's class names (a text prediction). Other
    columns keep pyarrow's defaults, without trying a dictionary (string ids are
    near-unique too). Min/max statistics are kept for every column but the prediction,
    the score and the class probabilities, whose ranges are the same in every part (0
    to 1, or the classes), so they could not let a reader skip one: they took 20% of the
    time to encode a part.
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
    repeated = [REASON_COLUMN]
    if PREDICTION_COLUMN in schema.names and pa.types.is_string(
        schema.field(PREDICTION_COLUMN).type
    ):
        repeated.append(PREDICTION_COLUMN)
    return {
        "write_statistics": [name for name in schema.names if not _is_model_output(name)],
        "use_dictionary": [name for name in repeated if name in schema.names],
        "compression": compression,
        "column_encoding": encoding or None,
    }


def _is_model_output(name: str) -> bool:
    return name in (PREDICTION_COLUMN, SCORE_COLUMN) or name.startswith(PROBABILITY_PREFIX)


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """A whole part's Parquet bytes (a rejects part), encoded by :func:`parquet_options`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **parquet_options(table.schema))
    return sink.getvalue()


def write_part(path: Path, payload: pa.Buffer, rows: int) -> dict[str, Any]:
    entry = {
        "name": path.name,
        "rows": rows,
        "sha256": hashlib.sha256(memoryview(payload)).hexdigest(),
    }
    write_atomically(path, payload, sync_folder=False)
    return entry


def write_chunk(
    output_dir: Path, name: str, scored: pa.Buffer, rows: int, rejects: pa.Table | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write a chunk's rejects part (or remove a stale one), then its scored part (its
    Parquet bytes, holding ``rows`` rows)."""
    rejects_path = output_dir / REJECTS_DIR / name
    reject_entry = None
    if rejects is not None:
        rejects_path.parent.mkdir(exist_ok=True)
        reject_entry = write_part(rejects_path, parquet_bytes(rejects), rejects.num_rows)
    else:
        rejects_path.unlink(missing_ok=True)
    return write_part(output_dir / name, scored, rows), reject_entry


def existing_part(path: Path) -> dict[str, Any]:
    return {
        "name": path.name,
        "rows": pq.ParquetFile(path).metadata.num_rows,
        "sha256": sha256_file(path),
    }


def part_fingerprint(path: Path) -> str | None:
    """The fingerprint a part was written under, or None when it is unreadable."""
    try:
        recorded = pq.ParquetFile(path).schema_arrow.metadata or {}
    except (pa.ArrowException, OSError):
        return None
    value = recorded.get(f"{METADATA_PREFIX}fingerprint".encode())
    return value.decode() if value is not None else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


# ---------------------------------------------------------------------------------------
# The output folder: fresh, complete, resumable or stale


def stored_schema(schema: pa.Schema) -> dict[str, str]:
    """The key-value metadata pyarrow's Parquet writer stores for ``schema``: the schema's
    own, then the schema itself, serialized and base64-encoded, as ``ARROW:schema``."""
    serialized = base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")
    metadata = {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}
    return {**metadata, "ARROW:schema": serialized}


def part_schema(model: ScoringModel, id_field: pa.Field | None) -> pa.Schema:
    """A scored part's columns (:func:`output_columns`); the scoring's metadata is added
    to the footer once the input is hashed. The model's outputs are never null: required
    columns, which spare the writer their definition levels (20% of the time to encode a
    part). The prediction is int64 (binary, or a multiclass model's integer classes) or
    text (its classes' names); the score and the probabilities float64."""
    names = output_columns(model, None if id_field is None else id_field.name)
    fields = [id_field] if id_field is not None else []
    fields += [
        pa.field(
            name, _prediction_type(model) if name == PREDICTION_COLUMN else pa.float64(), False
        )
        for name in names[len(fields) :]
    ]
    return pa.schema(fields)


def _prediction_type(model: ScoringModel) -> pa.DataType:
    classes = model.preprocessor.class_names() if model.task == "multiclass" else (0, 1)
    return pa.int64() if isinstance(classes[0], int) else pa.string()


def output_columns(model: ScoringModel, id_column: str | None) -> list[str]:
    """A scored part's columns: the id column, then ``prediction`` (classifiers),
    ``score``, and for a multiclass model one ``probability_<class>`` column per class,
    in the classes' order (the model's own output columns,
    :meth:`~.preprocessing.Preprocessor.output_columns`)."""
    columns = [id_column] if id_column is not None else []
    if model.task in ("binary", "multiclass"):
        columns.append(PREDICTION_COLUMN)
    columns.append(SCORE_COLUMN)
    if model.task == "multiclass":
        outputs = model.preprocessor.output_columns()
        columns += [name for name in outputs if name not in (PREDICTION_COLUMN, SCORE_COLUMN)]
    return columns


def score_arrays(
    model: ScoringModel, scores: np.ndarray
) -> tuple[list[pa.Array], np.ndarray | None, np.ndarray | None]:
    """A row group's columns after the id (:func:`output_columns`), from its decoded scores,
    and what the manifest counts of them.

    Args:
        model: the model that scored.
        scores: float64, ``(rows,)``; ``(rows, classes)`` probabilities for multiclass.

    Returns:
        The columns; the histogram counts of ``score`` over [0, 1] (classifiers, else
        None); the rows predicted per class, in the classes' order (multiclass, else None).
    """
    if model.task == "binary":
        prediction = pa.array((scores >= model.threshold).astype(np.int64))
        return [prediction, pa.array(scores)], unit_histogram(scores), None
    if model.task != "multiclass":
        return [pa.array(scores)], None, None
    classes = model.preprocessor.class_names()
    best = scores.argmax(axis=1)
    score = np.take_along_axis(scores, best[:, np.newaxis], axis=1)[:, 0]
    if isinstance(classes[0], int):
        prediction = pa.array(np.asarray(classes, dtype=np.int64)[best])
    else:
        prediction = pa.array(classes, type=pa.string()).take(pa.array(best))
    # One contiguous row per class: each probability column is a copy-free Arrow array.
    by_class = np.ascontiguousarray(scores.T)
    columns = [prediction, pa.array(score), *(pa.array(row) for row in by_class)]
    return columns, unit_histogram(score), np.bincount(best, minlength=len(classes))


def part_counts(model: ScoringModel, path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What :func:`score_arrays` counted of a part already written (a resumed chunk)."""
    if model.task not in ("binary", "multiclass"):
        return None, None
    histogram = unit_histogram(part_scores(path))
    if model.task == "binary":
        return histogram, None
    found = pc.value_counts(pq.read_table(path, columns=[PREDICTION_COLUMN]).column(0))
    values, counts = found.field("values").to_pylist(), found.field("counts").to_pylist()
    rows = dict(zip(values, counts, strict=True))
    classes = model.preprocessor.class_names()
    return histogram, np.array([rows.get(name, 0) for name in classes], dtype=np.int64)


def summed(total: np.ndarray | None, more: np.ndarray | None) -> np.ndarray | None:
    """``total + more`` of two counts, None counting nothing (a task that has none)."""
    if more is None:
        return total
    return more.copy() if total is None else total + more


def prediction_counts(model: ScoringModel, predicted: np.ndarray) -> list[dict[str, Any]]:
    """The manifest's rows per predicted class: ``[{"class": ..., "rows": ...}, ...]`` in the
    classes' order."""
    classes = model.preprocessor.class_names()
    return [
        {"class": name, "rows": int(rows)} for name, rows in zip(classes, predicted, strict=True)
    ]


def prefixed(metadata: dict[str, str]) -> dict[str, str]:
    return {f"{METADATA_PREFIX}{key}": value for key, value in metadata.items()}


def with_metadata(columns: dict[str, Any], metadata: dict[str, str]) -> pa.Table:
    return pa.table(columns).replace_schema_metadata(prefixed(metadata))


UNIT_EDGES = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)


def unit_histogram(scores: np.ndarray) -> np.ndarray:
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
    index -= scores < np.take(UNIT_EDGES, index)
    return np.bincount(index, minlength=HISTOGRAM_BINS)


def part_scores(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=[SCORE_COLUMN]).column(0).to_numpy()


def value_histogram(paths: Sequence[Path]) -> dict[str, list[Any]]:
    """Histogram of regression scores over the range they span, one part in memory at a time."""
    low, high = np.inf, -np.inf
    for path in paths:
        scores = part_scores(path)
        finite = scores[np.isfinite(scores)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    if low > high:
        return {"edges": [], "counts": []}
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for path in paths:
        counts += np.histogram(part_scores(path), bins=HISTOGRAM_BINS, range=(low, high))[0]
    edges = np.histogram_bin_edges(np.empty(0), bins=HISTOGRAM_BINS, range=(low, high))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


@dataclass(frozen=True)
class Identity:
    """What the output's bytes depend on, known once the input is hashed."""

    digest: str
    md5s: list[str]
    fingerprint: str
    metadata: dict[str, str]  # key-value metadata of every part, without the input file


def identify(
    model: ScoringModel,
    files: list[Path],
    chunk_rows: int,
    id_column: str | None,
    policies: dict[str, str],
) -> Identity:
    """The input's digests, and the fingerprint and part metadata they give."""
    try:
        digest, md5s = input_digest(files)
    except OSError as error:
        raise DataError("cannot read the input to hash it", [first_line(error)]) from error
    key = fingerprint(model, digest, chunk_rows, id_column, policies)
    metadata = {
        "model_uri": model.model_uri,
        "model_version": model.version,
        "weights_sha256": model.weights_sha256,
        "input_digest": digest,
        "fingerprint": key,
    }
    return Identity(digest, md5s, key, metadata)


def fingerprint(
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
        "backend": model.runtime.backend,
        "input_digest": digest,
        "chunk_rows": chunk_rows,
        "id_column": id_column,
        **policies,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode("utf-8")).hexdigest()


def write_progress(output_dir: Path, hashing: Future[Identity]) -> None:
    """Record the fingerprint before any part (unless it is already recorded)."""
    identity = hashing.result()
    path = output_dir / PROGRESS_FILE
    document = {
        "fingerprint": identity.fingerprint,
        "input_digest": identity.digest,
        "model_uri": identity.metadata["model_uri"],
        "format": OUTPUT_FORMAT,
    }
    if read_json(path) != document:
        write_atomically(path, json_bytes(document))


# ---------------------------------------------------------------------------------------
# The state of an output folder: fresh, complete, resumable, or holding another scoring


def _is_ours(entry: Path, *, top: bool) -> bool:
    name = entry.name
    if name.startswith(TEMP_PREFIX):
        return True
    if is_part_name(name) and entry.is_file():
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


def remove_temporaries(output_dir: Path) -> None:
    """Remove temporary files whose writer is gone; a live writer's are left to it."""
    for folder in (output_dir, output_dir / REJECTS_DIR):
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith(TEMP_PREFIX) and not _writer_lives(entry.name):
                    entry.unlink(missing_ok=True)


def _writer_lives(name: str) -> bool:
    """Whether the process named in a temporary file's name (``.tmp-<pid>-...``) still runs
    here. A Dask worker of a job that has stopped may still be finishing a part."""
    pid = temporary_writer_pid(name)
    return pid is not None and locks.process_is_alive(pid)


def _invalidate(output_dir: Path, recorded: str | None) -> None:
    """Remove an earlier scoring's output; the manifest first, so it never outlives a part."""
    parts = sorted(entry.name for entry in output_dir.iterdir() if is_part_name(entry.name))
    _LOG.warning(
        "%s holds the output of another scoring (fingerprint %s): removing %s, its rejects and manifest",
        output_dir,
        (recorded or "unknown")[:12],
        plural(len(parts), "part"),
    )
    (output_dir / SUCCESS_FILE).unlink(missing_ok=True)
    for name in parts:
        (output_dir / name).unlink()
    shutil.rmtree(output_dir / REJECTS_DIR, ignore_errors=True)
    remove_temporaries(output_dir)
    (output_dir / PROGRESS_FILE).unlink(missing_ok=True)


def holds_output(output_dir: Path) -> bool:
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


def prepare_output(output_dir: Path, fingerprint: str) -> tuple[str, bool, dict[str, Any] | None]:
    """Decide what to do with an output folder that holds Stemma's files.

    Returns:
        ``complete`` (this scoring is there, whole), ``resume`` (this scoring was
        interrupted) or ``fresh`` (another scoring's output was removed); whether output
        was removed; and the manifest when complete.
    """
    manifest = read_json(output_dir / SUCCESS_FILE)
    progress = read_json(output_dir / PROGRESS_FILE)
    recorded = (manifest or progress or {}).get("fingerprint")
    if manifest is not None and recorded == fingerprint:
        damaged = damaged_parts(output_dir, manifest)
        if not damaged:
            return "complete", False, manifest
        # A manifest whose parts changed cannot be trusted: it goes first, then the chunks
        # whose parts differ, which are scored again; the parts that match are resumed.
        _LOG.warning(
            "%s: %s no longer %s what the manifest recorded (%s): scoring %s again",
            output_dir,
            plural(len(damaged), "part"),
            "matches" if len(damaged) == 1 else "match",
            ", ".join(
                f"{name}: {problem}" for name, problem in sorted(damaged.items())[:MAX_NAMED]
            ),
            "it" if len(damaged) == 1 else "them",
        )
        (output_dir / SUCCESS_FILE).unlink()
        remove_chunks(output_dir, damaged)
    if recorded == fingerprint:
        remove_temporaries(output_dir)
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


def remove_chunks(output_dir: Path, names: Iterable[str]) -> None:
    """Remove the parts of these chunks (names as :func:`damaged_parts` gives them), the
    rejects part first, so that a rerun scores the chunks again."""
    for name in names:
        chunk = name.removeprefix(f"{REJECTS_DIR}/")
        (output_dir / REJECTS_DIR / chunk).unlink(missing_ok=True)
        (output_dir / chunk).unlink(missing_ok=True)


def damaged_parts(output_dir: Path, manifest: dict[str, Any]) -> dict[str, str]:
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


def finished_parts(output_dir: Path, fingerprint: str) -> set[str]:
    """Parts an interrupted run of the same fingerprint completed."""
    return {
        entry.name
        for entry in output_dir.iterdir()
        if is_part_name(entry.name) and part_fingerprint(entry) == fingerprint
    }


def remove_strays(output_dir: Path, parts: Iterable[str], rejects: Iterable[str]) -> None:
    """Remove parts this scoring did not produce (left by a copy or a crash mid-cleanup)."""
    for folder, keep in ((output_dir, set(parts)), (output_dir / REJECTS_DIR, set(rejects))):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if is_part_name(entry.name) and entry.name not in keep:
                _LOG.warning("removing %s: not part of this scoring", entry)
                entry.unlink()


def default_output_dir(score_output: Path, score_input: Path, batch: Path) -> Path:
    """Where the scores of ``batch`` go when no output folder is named.

    ``score.output`` itself when the batch is ``score.input`` (the full scoring); for
    another file or folder, ``<score.output>-<its name>`` beside it (a file's name without
    its suffix: ``outputs/scores-day_03``), so scoring one file never replaces the scores
    of the whole input. Shadow evaluation puts the champion's scores of a batch there too.
    """
    if Path(batch).resolve() == Path(score_input).resolve():
        return Path(score_output)
    stem = Path(batch).stem if Path(batch).is_file() else Path(batch).name
    return Path(score_output).with_name(f"{Path(score_output).name}-{stem}")


def refuse_another_input(output_dir: Path, files: Sequence[Path]) -> None:
    """Refuse a folder of :func:`default_output_dir` that holds the finished scores of other
    input files (another file of the same name elsewhere): a scoring would replace them.

    Raises:
        DataError: naming the folder, the files it scored and how to choose another.
    """
    manifest = read_json(Path(output_dir) / SUCCESS_FILE) or {}
    recorded = [entry.get("path") for entry in manifest.get("input", {}).get("files", [])]
    if not recorded or None in recorded:
        return
    if sorted(Path(path).resolve() for path in recorded) == sorted(p.resolve() for p in files):
        return
    raise DataError(
        f"{output_dir}: holds the scores of another input ({', '.join(map(str, recorded[:MAX_NAMED]))})",
        ["name a folder of their own with --output (or score.output), or remove that one"],
    )


def refuse_output_around_input(files: Sequence[Path], output_dir: Path) -> None:
    target = output_dir.resolve()
    inside = [path for path in files if path.resolve().is_relative_to(target)]
    if inside:
        raise DataError(
            f"{output_dir}: the output folder holds input files ({inside[0].name})",
            ["write the scores to a folder of their own (score.output or --output)"],
        )
