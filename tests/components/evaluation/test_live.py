"""Reading the endpoint's prediction log and pairing its rows, on parts written to disk."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stemma.components.errors import DataError
from stemma.components.evaluation import live, log_rows
from stemma.components.evaluation.rows import CHALLENGER_SCORE, CHAMPION_SCORE, LABEL
from tests.components.evaluation.log_parts import (
    labels_table,
    predictions_table,
    shadow_table,
    write_part,
)

ID = "application_id"
TARGET = "approved"
DAY = "2026-03-02"
NEXT = "2026-03-03"


def served_frame(rows: int, first_id: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(first_id)
    return pd.DataFrame(
        {ID: np.arange(first_id, first_id + rows), "salary": rng.normal(60_000, 9_000, rows)}
    )


def write_served(log: Path, day: str, frame: pd.DataFrame, version: str, **options) -> Path:
    scores = np.linspace(0.05, 0.95, len(frame))
    table = predictions_table(
        frame,
        ["salary"],
        id_column=ID,
        scores=scores,
        versions=[version] * len(frame),
        variants=["champion"] * len(frame),
        day=day,
        **options,
    )
    return write_part(log, "predictions", day, table)


def test_a_log_is_named_by_its_folder_or_one_day_folder(tmp_path):
    log = tmp_path / "log"
    write_served(log, DAY, served_frame(20), "3")
    write_served(log, NEXT, served_frame(20, 100), "3")
    assert log_rows.open_log(log) == log_rows.LogFolder(log)
    one_day = log_rows.open_log(log / "predictions" / NEXT)
    assert one_day == log_rows.LogFolder(log, NEXT)
    assert [day.day for day in log_rows.stream_days(log_rows.open_log(log), "predictions")] == [
        DAY,
        NEXT,
    ]
    assert [day.day for day in log_rows.stream_days(one_day, "predictions")] == [NEXT]


@pytest.mark.parametrize(
    ("name", "headline"),
    [
        ("missing", "no such log folder"),
        ("plain", "not a prediction log"),
        ("s3", "the log is on S3"),
    ],
    ids=["missing", "not-a-log", "s3"],
)
def test_what_is_not_a_log_is_a_clear_error(tmp_path, name, headline):
    (tmp_path / "plain" / "2026-03-02").mkdir(parents=True)
    path = {"missing": tmp_path / "nope", "plain": tmp_path / "plain", "s3": "s3://bucket/log"}
    with pytest.raises(DataError, match=headline) as caught:
        log_rows.open_log(path[name])
    assert caught.value.details, "the error says what a log is"


def test_only_finished_parts_count_and_a_day_is_known_by_their_digest(tmp_path):
    log = tmp_path / "log"
    first = write_served(log, DAY, served_frame(20), "3")
    folder = first.parent
    (folder / ".tmp-123-part.parquet").write_bytes(b"half written")
    (folder / "_SUCCESS").write_text("{}")
    (log / "predictions" / NEXT).mkdir()  # a day without a finished part
    (day,) = log_rows.stream_days(log_rows.open_log(log), "predictions")
    assert day.parts == (first,) and set(day.files) == {first.name}
    assert day.digest == day.files[first.name]
    write_served(log, DAY, served_frame(5, 500), "3", request_prefix="later")
    (again,) = log_rows.stream_days(log_rows.open_log(log), "predictions")
    assert len(again.parts) == 2 and again.digest.endswith(".dir")
    assert again.digest != day.digest


def test_parts_missing_columns_are_named_before_a_row_is_read(tmp_path):
    log = tmp_path / "log"
    good = write_served(log, DAY, served_frame(20), "3")
    bad = good.with_name("part-20260302T020000000000-deadbeef.parquet")
    pq.write_table(pq.read_table(good).drop_columns(["stemma_row", "score"]), bad)
    days = log_rows.stream_days(log_rows.open_log(log), "predictions")
    with pytest.raises(DataError, match=r"1 of 2 parts of the prediction log lack columns") as e:
        log_rows.read_log_rows(days, [ID, "score", "stemma_row"])
    assert any(bad.name in line and "no score, stemma_row" in line for line in e.value.details)


def test_the_latest_label_of_an_id_counts(tmp_path):
    log = tmp_path / "log"
    write_part(
        log, "labels", DAY, labels_table([1, 2, 3], [1, 0, 1], id_column=ID, target=TARGET, day=DAY)
    )
    write_part(log, "labels", NEXT, labels_table([2], [1], id_column=ID, target=TARGET, day=NEXT))
    one_day = log_rows.open_log(log / "labels" / DAY)
    labels, days = log_rows.read_log_labels(one_day, id_column=ID, target=TARGET, task="binary")
    assert len(days) == 2, "labels are read from every day, whatever day is judged"
    assert dict(zip(labels[ID], labels[LABEL], strict=True)) == {"1": 1, "2": 1, "3": 1}

    write_part(log, "labels", NEXT, labels_table([4], [3], id_column=ID, target=TARGET, day=NEXT))
    with pytest.raises(DataError, match="binary labels must be 0 or 1"):
        log_rows.read_log_labels(one_day, id_column=ID, target=TARGET, task="binary")
    served_only = tmp_path / "served-only"
    write_served(served_only, DAY, served_frame(5), "3")
    no_labels = log_rows.open_log(served_only)
    assert log_rows.read_log_labels(no_labels, id_column=ID, target=TARGET, task="binary") == (
        None,
        [],
    )


def test_shadow_scores_pair_with_the_champions_answers_and_the_rest_is_counted(tmp_path):
    log = tmp_path / "log"
    frame = served_frame(40)
    ids = frame[ID].to_list()
    champion = np.linspace(0.1, 0.9, 40)
    versions = ["3"] * 30 + ["2"] * 10  # the last requests were answered by an older champion
    write_part(
        log,
        "predictions",
        DAY,
        predictions_table(
            frame, ["salary"], id_column=ID, scores=champion, versions=versions,
            variants=["champion"] * 40, day=DAY,
        ),
    )  # fmt: skip
    challenger = champion[::-1].copy()
    shadowed = np.r_[0:20, 30:40]  # 20 of the champion's answers, 10 of the older one's
    write_part(
        log,
        "shadow",
        DAY,
        shadow_table(
            ids, id_column=ID, scores=challenger, version="5", day=DAY, positions=shadowed
        ),
    )
    write_part(
        log,
        "shadow",
        DAY,
        shadow_table(
            ids, id_column=ID, scores=challenger, version="4", day=DAY, positions=np.r_[20:25]
        ),
    )
    stray = shadow_table(
        ids,
        id_column=ID,
        scores=challenger,
        version="5",
        day=DAY,
        request_prefix="gone",
        positions=np.r_[0:3],
    )
    write_part(log, "shadow", DAY, stray)
    # an entity answered again in a later request: its latest pair counts
    again = frame.iloc[[0]]
    write_part(
        log,
        "predictions",
        NEXT,
        predictions_table(
            again, ["salary"], id_column=ID, scores=np.array([0.42]), versions=["3"],
            variants=["champion"], day=NEXT, request_prefix="again",
        ),
    )  # fmt: skip
    write_part(
        log,
        "shadow",
        NEXT,
        shadow_table(
            [ids[0]],
            id_column=ID,
            scores=np.array([0.24]),
            version="5",
            day=NEXT,
            request_prefix="again",
        ),
    )

    opened = log_rows.open_log(log)
    served = log_rows.read_log_rows(
        log_rows.stream_days(opened, "predictions"), [ID, *live.SERVED_COLUMNS]
    )
    shadow = log_rows.read_log_rows(log_rows.stream_days(opened, "shadow"), live.SHADOW_COLUMNS)
    labels = pd.DataFrame({ID: [str(i) for i in ids], LABEL: [1.0, 0.0] * 20})
    pairs = live.pair_shadow_rows(
        served, shadow, id_column=ID, champion_version="3", challenger_version="5",
        labels=labels, segments=[],
    )  # fmt: skip
    assert pairs.skipped == {
        live.OTHER_CHALLENGER: 5,
        live.OTHER_CHAMPION: 10,
        live.UNPAIRED: 3,
        live.REPEATED: 1,
    }
    assert pairs.other_versions == {"4": 5}
    rows = pairs.rows.set_index(ID)
    assert len(rows) == 20 and rows[LABEL].notna().all()
    assert rows.loc["1", CHAMPION_SCORE] == pytest.approx(0.42)
    assert rows.loc["1", CHALLENGER_SCORE] == pytest.approx(0.24)
    assert rows.loc["2", CHALLENGER_SCORE] == pytest.approx(challenger[1])
    notes = live.skipped_notes(pairs, "3", "5")
    assert (
        "5 shadow rows not counted: scored by another version than the challenger v5 (v4: 5)"
        in notes
    )


def test_a_day_is_judged_once_it_is_over(tmp_path):
    log = tmp_path / "log"
    write_served(log, DAY, served_frame(5), "3")
    write_served(log, NEXT, served_frame(5, 50), "3")
    days = log_rows.stream_days(log_rows.open_log(log), "predictions")
    settled = datetime(2026, 3, 3, 0, 20, tzinfo=UTC)
    over, open_ = log_rows.complete_days(days, now=settled)
    assert [d.day for d in over] == [DAY] and [d.day for d in open_] == [NEXT]
    over, _ = log_rows.complete_days(days, now=datetime(2026, 3, 3, 0, 5, tzinfo=UTC))
    assert over == [], "a part of a day may still come in the first minutes of the next"


def test_labels_named_with_number_ids_join_the_logs_text_ids():
    labels = pd.DataFrame({ID: [7, 8], LABEL: [1, 0]})
    assert log_rows.ids_as_logged(labels, ID)[ID].to_list() == ["7", "8"]
    floats = pd.DataFrame({ID: [7.0, 8.5], LABEL: [1, 0]})
    assert log_rows.ids_as_logged(floats, ID)[ID].to_list() == ["7", "8.5"]
    text = pd.DataFrame({ID: ["a"], LABEL: [1]})
    assert log_rows.ids_as_logged(text, ID) is text
