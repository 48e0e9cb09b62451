"""Atomic writes: the target holds the old file or the whole new one."""

import json
import os
import stat

import pytest

from stemma.components.platform import files


def test_write_bytes_and_text(tmp_path):
    target = tmp_path / "out.bin"
    assert files.write_atomically(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    files.write_atomically(target, "héllo", sync_folder=False)
    assert target.read_text(encoding="utf-8") == "héllo"
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.bin"]


def test_buffers_are_written_whole(tmp_path):
    target = tmp_path / "big"
    data = bytearray(os.urandom(3 * 1024 * 1024))
    files.write_atomically(target, data)
    assert target.read_bytes() == data


def test_mode(tmp_path):
    target = tmp_path / "shared"
    files.write_atomically(target, "x")
    old = os.umask(0)
    os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == files.FILE_MODE & ~old


def test_json(tmp_path):
    target = tmp_path / "doc.json"
    files.write_json_atomically(target, {"b": 1, "a": [1, 2]})
    text = target.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": [1, 2], "b": 1}


def test_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "kept"
    target.write_text("old")

    def broken_fsync(handle):
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        files.write_atomically(target, "new")
    assert target.read_text() == "old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["kept"]


def test_unserialisable_json_keeps_the_old_file(tmp_path):
    target = tmp_path / "doc.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        files.write_json_atomically(target, {"x": object()})
    assert target.read_text() == "{}"


def test_write_file_with_a_library_writer(tmp_path):
    target = tmp_path / "made.txt"
    files.write_file_atomically(target, lambda temporary: temporary.write_text("made"))
    assert target.read_text() == "made"

    def failing(temporary):
        temporary.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        files.write_file_atomically(target, failing)
    assert target.read_text() == "made"
    assert [entry.name for entry in tmp_path.iterdir()] == ["made.txt"]


def test_temporary_names(tmp_path):
    temporary = files.temporary_path(tmp_path / "a-b.json")
    assert temporary.parent == tmp_path
    assert files.temporary_writer_pid(temporary.name) == os.getpid()
    assert files.temporary_writer_pid("a-b.json") is None
    assert files.temporary_writer_pid(".tmp-x-a") is None
