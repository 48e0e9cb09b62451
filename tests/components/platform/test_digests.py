"""Remembered file digests: unchanged files are not hashed again, changed ones always are."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stemma.components.data.tables import file_md5
from stemma.components.platform import digests

#: A settle time short enough for tests and longer than a file system's clock tick, so
#: that the rule is the one Stemma runs by (2 s by default), at a smaller scale.
SETTLE_S = 0.05


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store of the test's own, a short settle time, and counts from zero."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(digests.CACHE_DIR_ENV, str(folder))
    monkeypatch.setattr(digests, "SETTLE_NS", int(SETTLE_S * 1e9))
    digests.reset_stats()
    return folder / digests.STORE_NAME


def settled(path: Path, content: bytes) -> Path:
    """Write ``content`` and wait until the file counts as settled."""
    path.write_bytes(content)
    time.sleep(SETTLE_S * 1.5)
    return path


def md5(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


CONTENT = b"application_id,salary\n" + b"1,52000.5\n" * 300_000  # ~3 MiB, several reads


def test_an_unchanged_file_is_read_from_the_store_in_this_and_other_processes(
    tmp_path: Path, store: Path
) -> None:
    path = settled(tmp_path / "batch.csv", CONTENT)

    assert file_md5(path) == md5(CONTENT)
    assert digests.stats() == digests.DigestStats(hits=0, misses=1, stored=1)
    assert file_md5(path) == md5(CONTENT)
    assert digests.stats() == digests.DigestStats(hits=1, misses=1, stored=1)
    assert store.is_file()

    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from stemma.components.data.tables import file_md5; "
            "from stemma.components.platform import digests; "
            "print(file_md5(Path(sys.argv[1])), digests.stats().hits)",
            str(path),
        ],
        env={**os.environ, digests.CACHE_DIR_ENV: str(store.parent)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.split() == [md5(CONTENT), "1"]


def _rewrite_same_size_keep_mtime(path: Path) -> bytes:
    before = path.stat()
    content = CONTENT.replace(b"52000.5", b"99999.9")
    path.write_bytes(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return content


def _append(path: Path) -> bytes:
    with path.open("ab") as stream:
        stream.write(b"2,1.0\n")
    return CONTENT + b"2,1.0\n"


def _replace_by_rename(path: Path) -> bytes:
    content = CONTENT.replace(b"52000.5", b"11111.1")
    other = path.with_name("incoming.csv")
    other.write_bytes(content)
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(other, path)
    return content


def _touch(path: Path) -> bytes:
    path.touch()
    return CONTENT


def _chmod(path: Path) -> bytes:
    path.chmod(0o600)
    return CONTENT


@pytest.mark.parametrize(
    "change",
    [_rewrite_same_size_keep_mtime, _append, _replace_by_rename, _touch, _chmod],
    ids=["same-size-rewrite-old-mtime", "append", "rename-over", "touch", "chmod"],
)
def test_every_change_to_a_remembered_file_makes_it_hashed_again(
    tmp_path: Path, store: Path, change: Callable[[Path], bytes]
) -> None:
    path = settled(tmp_path / "batch.csv", CONTENT)
    assert file_md5(path) == md5(CONTENT)
    assert digests.stats().stored == 1

    content = change(path)

    assert file_md5(path) == md5(content)
    assert digests.stats().hits == 0
    assert digests.stats().misses == 2


def test_a_file_changed_less_than_the_settle_time_ago_is_not_remembered(
    tmp_path: Path, store: Path
) -> None:
    path = tmp_path / "batch.csv"
    path.write_bytes(CONTENT)
    digests.SETTLE_NS = 2_000_000_000  # the default; the fixture's patch is undone after

    assert file_md5(path) == file_md5(path) == md5(CONTENT)
    assert digests.stats() == digests.DigestStats(hits=0, misses=2, stored=0)


def test_a_file_changed_while_it_is_hashed_is_not_remembered(tmp_path: Path, store: Path) -> None:
    path = settled(tmp_path / "batch.csv", CONTENT)

    def hash_then_append() -> str:
        digest = md5(path.read_bytes())
        _append(path)
        return digest

    assert digests.remembered(path, "md5", hash_then_append) == md5(CONTENT)
    assert digests.stats().stored == 0
    time.sleep(SETTLE_S * 1.5)
    assert file_md5(path) == md5(CONTENT + b"2,1.0\n")
    assert digests.stats().hits == 0


def test_digests_of_two_kinds_never_answer_for_each_other(tmp_path: Path, store: Path) -> None:
    crlf = b"salary,loan\r\n" + b"52000.5,120000\r\n" * 1000
    path = settled(tmp_path / "table.csv", crlf)

    for _ in range(2):
        assert file_md5(path) == md5(crlf)
        assert file_md5(path, dos2unix=True) == md5(crlf.replace(b"\r\n", b"\n"))
    assert digests.stats() == digests.DigestStats(hits=2, misses=2, stored=2)


def test_remembered_false_reads_the_bytes(tmp_path: Path, store: Path) -> None:
    path = settled(tmp_path / "object", CONTENT)
    file_md5(path)

    assert file_md5(path, remembered=False) == md5(CONTENT)
    assert digests.stats().hits == 0


def test_a_store_that_is_not_a_database_is_started_again(
    tmp_path: Path, store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.parent.mkdir(parents=True)
    store.write_bytes(b"not a database, a crash's leftovers " * 100)
    path = settled(tmp_path / "batch.csv", CONTENT)

    with caplog.at_level(logging.WARNING, logger=digests.__name__):
        assert file_md5(path) == md5(CONTENT)
        assert file_md5(path) == md5(CONTENT)

    assert digests.stats() == digests.DigestStats(hits=1, misses=1, stored=1)
    assert f"the digest cache {store} is unreadable" in caplog.text


def test_a_cache_folder_that_cannot_be_made_leaves_hashing_as_it_was(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way", encoding="utf-8")
    monkeypatch.setenv(digests.CACHE_DIR_ENV, str(blocker / "cache"))
    path = settled(tmp_path / "batch.csv", CONTENT)

    with caplog.at_level(logging.WARNING, logger=digests.__name__):
        assert file_md5(path) == file_md5(path) == md5(CONTENT)

    assert digests.stats() == digests.DigestStats(hits=0, misses=2, stored=0)
    assert caplog.text.count("not remembering file digests") == 1


@pytest.mark.parametrize("value", ["off", "OFF", "none", ""])
def test_the_cache_can_be_turned_off(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(digests.CACHE_DIR_ENV, value)
    path = settled(tmp_path / "batch.csv", CONTENT)

    assert file_md5(path) == file_md5(path) == md5(CONTENT)
    assert digests.stats() == digests.DigestStats(hits=0, misses=2, stored=0)
    assert digests.cache_dir() is None
    assert not store.exists()


def test_the_default_folder_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(digests.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digests.cache_dir() == tmp_path / "xdg" / "stemma"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert digests.cache_dir() == Path.home() / ".cache" / "stemma"


def test_a_missing_file_fails_as_before(tmp_path: Path, store: Path) -> None:
    with pytest.raises(FileNotFoundError):
        file_md5(tmp_path / "absent.csv")


def test_a_store_busy_in_another_process_is_left_alone_not_replaced(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = settled(tmp_path / "batch.csv", CONTENT)
    file_md5(path)  # creates the store with one entry
    monkeypatch.setattr(digests, "BUSY_TIMEOUT_S", 0.05)
    other = settled(tmp_path / "other.csv", CONTENT + b"3,1.0\n")
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger=digests.__name__):
            # storing the new digest waits for the lock, gives up and sets the store aside
            assert file_md5(other) == md5(CONTENT + b"3,1.0\n")
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert "not remembering file digests" in caplog.text
    assert "starting it again" not in caplog.text
    with sqlite3.connect(store) as reader:
        assert reader.execute("SELECT count(*) FROM digests").fetchone() == (1,)


def test_the_store_keeps_the_most_recently_stored_entries(
    tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(digests, "MAX_ENTRIES", 3)
    paths = [settled(tmp_path / f"batch-{index}.csv", b"%d\n" % index) for index in range(5)]
    for path in paths:
        file_md5(path)
    assert digests.stats().stored == 5

    # the limit is applied when a process opens the store: drop this process's handle
    monkeypatch.setattr(digests, "_OPEN", {})
    digests.reset_stats()
    for path in reversed(paths):
        file_md5(path)
    assert digests.stats().hits == 3  # batch-4, -3, -2: the last three stored
    with sqlite3.connect(store) as reader:
        (entries,) = reader.execute("SELECT count(*) FROM digests").fetchone()
    assert entries == 5  # the two dropped were stored again
