"""The state of an output folder: fresh, complete, resumable, or holding another scoring."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.platform import locks
from stemma.components.platform.files import TEMP_PREFIX, temporary_writer_pid
from stemma.components.scoring.inputs import MAX_NAMED, plural
from stemma.components.scoring.output import (
    PROGRESS_FILE,
    REJECTS_DIR,
    SUCCESS_FILE,
    is_part_name,
    part_fingerprint,
    read_json,
)

_LOG = logging.getLogger(__name__)


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


def refuse_output_around_input(files: Sequence[Path], output_dir: Path) -> None:
    target = output_dir.resolve()
    inside = [path for path in files if path.resolve().is_relative_to(target)]
    if inside:
        raise DataError(
            f"{output_dir}: the output folder holds input files ({inside[0].name})",
            ["write the scores to a folder of their own (score.output or --output)"],
        )
