"""One writer per output folder, and a record of who it is.

A writer holds ``<folder>/_LOCK``: a JSON record of its owner (host, pid, the process's
start time, its command line, what it writes, when it began) and a heartbeat that a
background thread refreshes every :data:`HEARTBEAT_SECONDS`. A second writer reads the
record and is refused at once with a message that names the holder, or waits for it when
asked to (``wait_seconds``).

A record is stale, and taken over with a warning, only when its owner is provably gone:
on this host, when no process runs with its pid and start time (a crash, a SIGKILL); on
another host (a shared folder), when its heartbeat is older than
:data:`STALE_AFTER_SECONDS`, since the process cannot be seen from here. A live owner on
this host is never taken over, however old its heartbeat: a stopped process (SIGSTOP, a
debugger) keeps its folder. Reading, judging and writing the record happen under a short
``filelock.FileLock`` on ``_LOCK.mutex``, so two contenders never both take one stale lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import psutil
from filelock import FileLock
from filelock import Timeout as MutexTimeout

from stemma.components.errors import DataError
from stemma.components.platform.files import temporary_path

_LOG = logging.getLogger(__name__)

#: The owner record, inside the locked folder.
LOCK_FILE = "_LOCK"
#: The file ``filelock`` holds while the record is read and written (kept: removing a
#: flock file while another process waits on it would let two processes in).
MUTEX_FILE = "_LOCK.mutex"
#: Seconds between two refreshes of the owner's heartbeat.
HEARTBEAT_SECONDS = 2.0
#: Age of the heartbeat after which an owner on another host is taken for gone.
STALE_AFTER_SECONDS = 120.0
#: Longest wait for the record's mutex (held for milliseconds by a live process).
MUTEX_TIMEOUT_SECONDS = 10.0
#: Interval between two looks at a held lock, when waiting for it.
WAIT_POLL_SECONDS = 0.25
#: Start times of one process read twice may differ by rounding; a recycled pid starts later.
START_TIME_TOLERANCE_SECONDS = 1.0
#: Characters of the command line kept in the record.
MAX_COMMAND_CHARS = 500


class FolderBusyError(DataError):
    """The folder is being written by another live process."""


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as another process can recognise it later: a pid alone can be reused."""

    host: str
    pid: int
    started: float  # process creation time, seconds since the epoch

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process."""
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def is_alive(self) -> bool | None:
        """Whether it still runs: None when it runs on another host (it cannot be seen)."""
        if self.host != socket.gethostname():
            return None
        return process_is_alive(self.pid, self.started)


def process_is_alive(pid: int, started: float | None = None) -> bool:
    """Whether a process with this pid (and start time, when given) runs on this host.

    A zombie (killed, not yet reaped) counts as gone; a pid reused by a later process
    counts as gone when ``started`` is given.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True
    return started is None or abs(created - started) <= START_TIME_TOLERANCE_SECONDS


@dataclass(frozen=True)
class LockOwner:
    """The record in ``_LOCK``."""

    host: str
    pid: int
    process_started: float
    command: str
    purpose: str
    started_at: float  # when the lock was taken (epoch seconds)
    heartbeat: float  # last refresh (epoch seconds)
    token: str  # names this holding, so a worker can check it still holds

    @property
    def process(self) -> ProcessIdentity:
        return ProcessIdentity(self.host, self.pid, self.process_started)

    def stale_reason(self, now: float) -> str | None:
        """Why the owner is taken for gone, or None while it may still write."""
        alive = self.process.is_alive()
        if alive is False:
            return f"pid {self.pid} on host {self.host} no longer runs"
        if alive is None and now - self.heartbeat > STALE_AFTER_SECONDS:
            return (
                f"its heartbeat from host {self.host} is {now - self.heartbeat:.0f} s old "
                f"(limit {STALE_AFTER_SECONDS:.0f} s)"
            )
        return None

    def describe(self, folder: Path, now: float) -> str:
        """``<folder> is being written by pid 1234 on host X since 10:02:11 (heartbeat 3 s ago)``."""
        since = datetime.fromtimestamp(self.started_at).strftime("%H:%M:%S")
        if now - self.started_at > 86_400:
            since = datetime.fromtimestamp(self.started_at).strftime("%Y-%m-%d %H:%M:%S")
        age = max(0.0, now - self.heartbeat)
        return (
            f"{folder} is being written by pid {self.pid} on host {self.host} since {since} "
            f"(heartbeat {age:.0f} s ago)"
        )


def read_owner(folder: Path) -> LockOwner | None:
    """The owner recorded in ``folder``, or None when it holds no (readable) record."""
    try:
        document = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
        return LockOwner(**document)
    except (OSError, ValueError, TypeError):
        return None


def is_lock_entry(name: str) -> bool:
    """Whether a folder entry is the lock's own (the record, the mutex or its temporary)."""
    return name in (LOCK_FILE, MUTEX_FILE) or name.endswith(f"-{LOCK_FILE}")


def check_holder(folder: Path, token: str) -> None:
    """Refuse to write into ``folder`` unless the holding named ``token`` still holds it.

    A job's workers call this before writing under the lock their job took.

    Raises:
        FolderBusyError: another process holds the folder now, or nobody does.
    """
    owner = read_owner(folder)
    if owner is not None and owner.token == token:
        return
    if owner is None:
        raise FolderBusyError(
            f"{folder}: the scoring job that planned this work no longer holds the folder",
            ["its lock was released; run the scoring again"],
        )
    raise FolderBusyError(
        owner.describe(folder, time.time()),
        ["the job that planned this work lost the folder; its workers write nothing more"],
    )


class FolderLock:
    """Exclusive hold of a folder by this process, with a heartbeat.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`. Not reentrant:
    a second lock on the same folder, even in this process, is refused while the first
    is held.

    Args:
        folder: the folder (created when missing).
        purpose: what the holder does, shown to whoever is refused.
        wait_seconds: how long :meth:`acquire` waits for a live holder (0: refuse at once).
    """

    def __init__(self, folder: Path, *, purpose: str, wait_seconds: float = 0.0) -> None:
        if wait_seconds < 0:
            raise ValueError(f"wait_seconds must be at least 0, got {wait_seconds}")
        self.folder = Path(folder)
        self.purpose = purpose
        self.wait_seconds = wait_seconds
        self.owner: LockOwner | None = None
        self.took_over: str | None = None  # the note, when a stale lock was taken over
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def token(self) -> str:
        if self.owner is None:
            raise RuntimeError(f"the lock on {self.folder} is not held")
        return self.owner.token

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        """Take the folder, taking over a stale record (with a warning).

        Raises:
            FolderBusyError: a live process holds it (after ``wait_seconds``).
        """
        if self.owner is not None:
            raise RuntimeError(f"the lock on {self.folder} is already held")
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            holder = self._try_acquire()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise FolderBusyError(
                    holder.describe(self.folder, time.time()),
                    [
                        f"it runs: {holder.command or holder.purpose}",
                        "wait for it to finish, or write to another folder; a lock whose "
                        "owner has stopped is taken over by the next run",
                    ],
                )
            time.sleep(WAIT_POLL_SECONDS)
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name="stemma-lock-heartbeat", daemon=True
        )
        self._heartbeat.start()
        return self

    def release(self) -> None:
        """Give the folder back (removing the record), if this lock still holds it."""
        if self.owner is None:
            return
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        try:
            with self._mutex():
                current = read_owner(self.folder)
                if current is not None and current.token == self.owner.token:
                    (self.folder / LOCK_FILE).unlink(missing_ok=True)
        except MutexTimeout:
            _LOG.warning("%s: could not remove the lock record (its mutex is held)", self.folder)
        finally:
            self.owner = None

    def _mutex(self) -> FileLock:
        return FileLock(self.folder / MUTEX_FILE, timeout=MUTEX_TIMEOUT_SECONDS)

    def _try_acquire(self) -> LockOwner | None:
        """Take the folder if free or stale; otherwise return its live holder."""
        try:
            mutex = self._mutex().acquire()
        except MutexTimeout:
            # Held past its timeout: its holder is stopped mid-update, so it is alive.
            holder = read_owner(self.folder)
            if holder is None:
                raise FolderBusyError(
                    f"{self.folder}: its lock record is being written by a process that does not finish"
                ) from None
            return holder
        with mutex:
            now = time.time()
            current = read_owner(self.folder)
            if current is not None:
                reason = current.stale_reason(now)
                if reason is None:
                    return current
                self.took_over = (
                    f"took over the lock of {self.folder} from pid {current.pid} on host "
                    f"{current.host} ({current.purpose}, since "
                    f"{datetime.fromtimestamp(current.started_at):%H:%M:%S}): {reason}"
                )
                _LOG.warning("%s", self.took_over)
            elif (self.folder / LOCK_FILE).exists():
                self.took_over = f"replaced an unreadable lock record in {self.folder}"
                _LOG.warning("%s", self.took_over)
            me = ProcessIdentity.current()
            owner = LockOwner(
                host=me.host,
                pid=me.pid,
                process_started=me.started,
                command=" ".join([sys.executable, *sys.argv])[:MAX_COMMAND_CHARS],
                purpose=self.purpose,
                started_at=now,
                heartbeat=now,
                token=uuid.uuid4().hex,
            )
            self._write(owner)
            self.owner = owner
        return None

    def _write(self, owner: LockOwner) -> None:
        document = (json.dumps(asdict(owner), indent=2, sort_keys=True) + "\n").encode()
        temporary = temporary_path(self.folder / LOCK_FILE)
        temporary.write_bytes(document)
        os.replace(temporary, self.folder / LOCK_FILE)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            owner = self.owner
            if owner is None:
                return
            try:
                with self._mutex():
                    current = read_owner(self.folder)
                    if current is None or current.token != owner.token:
                        _LOG.error(
                            "%s: this process lost its lock on the folder (%s)",
                            self.folder,
                            "record removed" if current is None else f"now pid {current.pid}",
                        )
                        return
                    refreshed = LockOwner(**{**asdict(owner), "heartbeat": time.time()})
                    self._write(refreshed)
                    self.owner = refreshed
            except (MutexTimeout, OSError) as error:  # the next beat tries again
                _LOG.warning("%s: heartbeat not written: %s", self.folder, error)
