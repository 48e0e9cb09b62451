"""Reading the endpoint's prediction log as input: day folders, finished parts, windows of
days and digests, on parts written with pyarrow in the log's layout."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.components.data import prediction_log
from stemma.components.data.prediction_log import NothingLoggedError
from stemma.components.data.tables import dir_md5
from stemma.components.errors import DataError
from stemma.components.scoring.inputs import input_digest

TODAY = date(2025, 6, 4)


def write_part(log: Path, kind: str, day: str, stamp: str, rows: int = 3) -> Path:
    folder = log / kind / day
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-{stamp}-0123abcd.parquet"
    table = pa.table({"application_id": [f"{stamp}-{i}" for i in range(rows)], "x": [1.0] * rows})
    pq.write_table(table, path)
    return path


@pytest.fixture
def log(tmp_path) -> Path:
    root = tmp_path / "log"
    for day in ("2025-06-01", "2025-06-02", "2025-06-04"):
        stamp = day.replace("-", "") + "T000000000000"
        write_part(root, prediction_log.PREDICTIONS, day, stamp)
    (root / prediction_log.LABELS).mkdir()
    return root


def test_log_folders_are_told_from_batch_folders(log, tmp_path):
    predictions = log / prediction_log.PREDICTIONS
    assert prediction_log.is_log_folder(predictions)
    # the endpoint makes labels/ before any label comes: still the log's folder
    assert prediction_log.is_log_folder(log / prediction_log.LABELS)
    assert not prediction_log.is_log_folder(predictions / "2025-06-01")
    flat = tmp_path / "batches"
    flat.mkdir()
    pq.write_table(pa.table({"x": [1]}), flat / "day_01.parquet")
    (flat / "2025-06-01").mkdir()
    assert not prediction_log.is_log_folder(flat)
    assert not prediction_log.is_log_folder(flat / "day_01.parquet")
    assert not prediction_log.is_log_folder(tmp_path / "missing")


def test_a_day_reads_only_its_finished_parts(log):
    day = log / prediction_log.PREDICTIONS / "2025-06-01"
    (day / ".tmp-123-part.parquet").write_bytes(b"half")
    (day / "_SUCCESS").write_text("")
    (day / "nested").mkdir()
    later = write_part(log, prediction_log.PREDICTIONS, "2025-06-01", "20250601T120000000000")
    parts = prediction_log.day_parts(day)
    assert [part.name for part in parts] == [
        "part-20250601T000000000000-0123abcd.parquet",
        later.name,
    ]
    assert len(prediction_log.log_parts(log / prediction_log.PREDICTIONS)) == 4


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (None, ["2025-06-01", "2025-06-02", "2025-06-04"]),
        (1, []),  # 2025-06-03 was idle
        (2, ["2025-06-02"]),
        (3, ["2025-06-01", "2025-06-02"]),
    ],
    ids=["every-day", "yesterday-idle", "two-days", "three-days"],
)
def test_a_window_takes_complete_days_only(log, days, expected):
    predictions = log / prediction_log.PREDICTIONS
    if not expected:
        with pytest.raises(NothingLoggedError) as caught:
            prediction_log.select_days(predictions, days, today=TODAY)
        assert "nothing was logged on 2025-06-03 (UTC)" in caught.value.headline
        assert "2025-06-01, 2025-06-02, 2025-06-04" in caught.value.render()
        return
    chosen = prediction_log.select_days(predictions, days, today=TODAY)
    assert [folder.name for folder in chosen] == expected


def test_an_empty_log_has_nothing_and_a_window_below_one_day_is_refused(tmp_path, log):
    empty = tmp_path / "fresh" / prediction_log.PREDICTIONS
    empty.mkdir(parents=True)
    (empty / "2025-06-04").mkdir()  # a day folder whose first part is still being written
    with pytest.raises(NothingLoggedError, match="nothing was logged yet"):
        prediction_log.select_days(empty, None)
    with pytest.raises(DataError, match="days must be at least 1"):
        prediction_log.select_days(log / prediction_log.PREDICTIONS, 0)


def test_digests_are_those_dvc_and_batch_scoring_record(log):
    predictions = log / prediction_log.PREDICTIONS
    every = prediction_log.log_parts(predictions)
    # the whole folder: DVC's own digest of it
    assert prediction_log.folder_digest(predictions, every)[0] == dir_md5(predictions)[0]
    # one day folder: the digest a batch folder of the same files has
    day = predictions / "2025-06-01"
    write_part(log, prediction_log.PREDICTIONS, "2025-06-01", "20250601T120000000000")
    parts = prediction_log.day_parts(day)
    assert prediction_log.folder_digest(day, parts) == input_digest(parts)
    assert prediction_log.folder_digest(day, parts[:1]) == input_digest(parts[:1])


@pytest.mark.parametrize(
    ("value", "text"),
    [(7, "7"), (7.0, "7"), (7.5, "7.5"), ("a-7", "a-7"), (None, None), (float("nan"), None)],
    ids=["int", "whole-float", "float", "text", "none", "nan"],
)
def test_ids_are_text_as_the_log_writes_them(value, text):
    assert prediction_log.id_text(value) == text
