"""Remembered file digests: a file unchanged on disk since it was hashed is not read again.

Stemma hashes the same files many times. The scoring engine hashes its input, then the
score flow checks the DVC version of the folder holding it, which hashes every file
there again; training, monitoring and quantization check their data the same way, run
after run. Like DVC's state database, Stemma remembers a digest under the file's
identity on disk: its path, device, inode, size, and modification and change times in
nanoseconds. Writing the file, renaming another over it, ``touch`` and ``chmod`` all set
the change time, which no user can set back, so a changed file is always hashed again.

A file changed less than :data:`SETTLE_NS` before it is hashed is not remembered: a
second write within its timestamp's granularity (a clock tick on Linux file systems,
2 s on FAT) could leave its identity as it was.

The digests live in one SQLite file per user, ``digests.sqlite`` in ``$STEMMA_CACHE_DIR``
(default ``$XDG_CACHE_HOME/stemma``, else ``~/.cache/stemma``); ``STEMMA_CACHE_DIR=off``
turns remembering off. A store that is not a database (a crash, a stray file) is started
again; one that cannot be opened or written is set aside with one warning, and files are
hashed as if it did not exist: the store can save time, never fail a run.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming the cache folder; ``off`` turns remembering off.
CACHE_DIR_ENV = "STEMMA_CACHE_DIR"
OFF_VALUES = frozenset({"off", "none", "0", "false", "no", ""})
STORE_NAME = "digests.sqlite"
#: How long ago a file must have last changed for its digest to be remembered.
SETTLE_NS = 2_000_000_000
#: Entries kept; the least recently stored go first, when a process opens the store.
MAX_ENTRIES = 100_000
#: How long a writer waits for another process's transaction, in seconds.
BUSY_TIMEOUT_S = 5.0

_LOG = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests (
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    digest TEXT NOT NULL,
    stored_ns INTEGER NOT NULL,
    PRIMARY KEY (path, kind)
)
"""

#: (path, kind, device, inode, size, mtime_ns, ctime_ns)
_Identity = tuple[str, str, int, int, int, int, int]


@dataclass(frozen=True)
class DigestStats:
    """What this process's lookups did: digests read from the store, files hashed, stored."""

    hits: int = 0
    misses: int = 0
    stored: int = 0


def cache_dir() -> Path | None:
    """The folder of the store, or None when ``STEMMA_CACHE_DIR`` turns remembering off."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured is not None:
        if configured.strip().lower() in OFF_VALUES:
            return None
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
            return None
    return Path(base) / "stemma"


def stats() -> DigestStats:
    """This process's counts since it started (or since :func:`reset_stats`)."""
    with _LOCK:
        return DigestStats(**_COUNTS)


def reset_stats() -> None:
    with _LOCK:
        _COUNTS.clear()


def remembered(path: Path, kind: str, compute: Callable[[], str]) -> str:
    """The digest of ``path`` of the given kind, from the store when the file is unchanged.

    Args:
        path: a file.
        kind: what ``compute`` returns (``"md5"``, ``"md5-dos2unix"``): digests of two
            kinds never answer for each other.
        compute: hashes the file's bytes; its errors reach the caller unchanged.
    """
    try:
        before = os.stat(path)
    except OSError:
        return compute()  # the hash names the problem as it always has
    if not stat.S_ISREG(before.st_mode):
        return compute()
    identity = _identity(path, kind, before)
    store = _store()
    if store is not None:
        found = store.get(identity)
        if found is not None:
            _count("hits")
            return found
    digest = compute()
    _count("misses")
    if store is None or max(before.st_mtime_ns, before.st_ctime_ns) > time.time_ns() - SETTLE_NS:
        return digest
    try:
        after = os.stat(path)
    except OSError:
        return digest
    if _identity(path, kind, after) == identity and store.put(identity, digest):
        _count("stored")
    return digest


# ---------------------------------------------------------------------------------------
# The store


def _identity(path: Path, kind: str, status: os.stat_result) -> _Identity:
    return (
        os.path.abspath(path),
        kind,
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


class _Store:
    """One SQLite connection, shared by the threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._connection = _connect(path)

    def get(self, identity: _Identity) -> str | None:
        rows = self._execute(
            "SELECT digest FROM digests WHERE path = ? AND kind = ? AND device = ? "
            "AND inode = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
            identity,
        )
        return str(rows[0][0]) if rows else None

    def put(self, identity: _Identity, digest: str) -> bool:
        done = self._execute(
            "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*identity, digest, time.time_ns()),
        )
        return done is not None

    def _execute(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[object, ...]] | None:
        """The statement's rows, or None once it failed (and the store was set aside)."""
        try:
            with self._lock:
                return self._connection.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            _set_aside(self, error)
            return None


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        # A lost entry costs one hash; NORMAL keeps the file intact without an fsync per put.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(_SCHEMA)
        (entries,) = connection.execute("SELECT count(*) FROM digests").fetchone()
        if entries > MAX_ENTRIES:
            connection.execute(
                "DELETE FROM digests WHERE rowid NOT IN "
                "(SELECT rowid FROM digests ORDER BY stored_ns DESC LIMIT ?)",
                (MAX_ENTRIES,),
            )
    except sqlite3.Error:
        connection.close()
        raise
    return connection


_LOCK = threading.Lock()
_COUNTS: Counter[str] = Counter()  # hits, misses, stored: the fields of DigestStats
_OPEN: dict[str, _Store | None] = {}  # store path -> the store, None once set aside
_REPLACED: set[str] = set()  # stores this process started again after finding them corrupt
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _count(what: str) -> None:
    with _LOCK:
        _COUNTS[what] += 1


def _store() -> _Store | None:
    """This process's store for the configured folder, opened on first use."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / STORE_NAME
    key = str(path)
    with _LOCK:
        if key in _OPEN:
            store = _OPEN[key]
            if store is None:
                return None
            if store.pid == os.getpid():
                return store
        try:
            opened: _Store | None = _open_or_replace(path)
        except (OSError, sqlite3.Error) as error:
            _LOG.warning(
                "not remembering file digests: cannot open %s (%s); files are hashed each time",
                path,
                error,
            )
            opened = None
        _OPEN[key] = opened
        return opened


def _open_or_replace(path: Path) -> _Store:
    """Open the store; one that is not a database (a crash, a stray file) is started again."""
    try:
        return _Store(path)
    except sqlite3.DatabaseError as error:
        if not _is_corrupt(error) or not path.is_file():
            raise  # busy, read-only, full: set aside, never deleted
        _remove(path, error)
        return _Store(path)


def _is_corrupt(error: Exception) -> bool:
    return getattr(error, "sqlite_errorcode", None) in _CORRUPT


def _remove(path: Path, error: Exception) -> None:
    _LOG.warning("the digest cache %s is unreadable (%s); starting it again", path, error)
    for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)


def _set_aside(store: _Store, error: Exception) -> None:
    """After a failed read or write: a corrupt store is started again once, else left alone."""
    key = str(store.path)
    with _LOCK:
        if _OPEN.get(key) is not store:
            return  # another thread got here first
        if _is_corrupt(error) and key not in _REPLACED:
            _REPLACED.add(key)
            try:
                _remove(store.path, error)
                _OPEN[key] = _Store(store.path)
                return
            except (OSError, sqlite3.Error) as again:
                error = again
        _OPEN[key] = None
    _LOG.warning(
        "not remembering file digests: %s failed (%s); files are hashed each time",
        store.path,
        error,
    )
