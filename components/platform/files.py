"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The data goes to a temporary file in the same folder (``.tmp-<pid>-<name>``, so a cleaner
can tell whether its writer still runs), is fsynced, renamed over the target, and the
folder is fsynced so that the rename survives a power loss. Threads of one process must
not write the same path at the same time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Prefix of temporary files; the writer's pid follows it.
TEMP_PREFIX = ".tmp-"
#: Mode of the files written (before the umask): readable by all, like a plain write.
FILE_MODE = 0o644


def temporary_path(path: Path) -> Path:
    """The temporary name this process writes ``path`` under before renaming it."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")


def temporary_writer_pid(name: str) -> int | None:
    """The pid in a temporary file's name (``.tmp-<pid>-...``), or None for other names."""
    if not name.startswith(TEMP_PREFIX):
        return None
    pid = name[len(TEMP_PREFIX) :].partition("-")[0]
    return int(pid) if pid.isdigit() else None


def fsync_folder(folder: Path) -> None:
    """fsync a folder, so that renames and creations in it survive a power loss (or a file)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomically(
    path: Path, data: bytes | str, *, sync_folder: bool = True, mode: int = FILE_MODE
) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically: temporary, fsync, rename.

    Args:
        sync_folder: fsync the folder after the rename. Writers of many files in one
            folder may skip it and call :func:`fsync_folder` once.
        mode: permission bits of the new file (before the umask).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = temporary_path(path)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(payload).cast("B")
        while view:
            view = view[os.write(handle, view) :]
        os.fsync(handle)
    except BaseException:
        os.close(handle)
        temporary.unlink(missing_ok=True)
        raise
    os.close(handle)
    os.replace(temporary, path)
    if sync_folder:
        fsync_folder(path.parent)
    return path


def write_json_atomically(path: Path, document: Any, *, sync_folder: bool = True) -> Path:
    """Write ``document`` as indented, key-sorted JSON with a final newline, atomically."""
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return write_atomically(path, text, sync_folder=sync_folder)


def write_file_atomically(
    path: Path, write: Callable[[Path], object], *, sync_folder: bool = True
) -> Path:
    """Let ``write(temporary)`` produce the file (a library's writer), then fsync and rename.

    The temporary file is removed when ``write`` fails; ``path`` is left as it was.
    """
    path = Path(path)
    temporary = temporary_path(path)
    try:
        write(temporary)
        fsync_folder(temporary)  # the file itself: the same open, fsync and close
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_folder(path.parent)
    return path
