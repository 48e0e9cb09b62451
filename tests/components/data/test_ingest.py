"""Gathering labelled production rows into the training table."""

from __future__ import annotations

import pandas as pd
import pytest

from stemma.components.errors import DataError
from stemma.components.data.ingest import append_rows, gather_new_rows
from stemma.components.data.labels import read_labels


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame({"id": [1, 2, 3], "x": [0.1, 0.2, 0.3], "y": [0, 1, 0]})


def _write(folder, name, frame):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    frame.to_parquet(path) if name.endswith(".parquet") else frame.to_csv(path, index=False)
    return path


def test_only_labelled_rows_not_in_the_table_are_added(tmp_path, table):
    batch = _write(
        tmp_path / "b",
        "day_01.parquet",
        pd.DataFrame({"id": [3, 4, 5, 6], "x": [1.0, 2.0, 3.0, 4.0]}),
    )
    _write(tmp_path / "l", "day_01.csv", pd.DataFrame({"id": [3, 4, 5], "y": [1, 1, 0]}))
    labels = read_labels(tmp_path / "l", id_column="id", target="y")
    new = gather_new_rows(table, [batch], labels, id_column="id", target="y")
    assert new.frame["id"].tolist() == [4, 5]
    assert new.frame["y"].tolist() == [1, 0]
    assert list(new.frame.columns) == list(table.columns)
    assert new.frame.dtypes.equals(table.dtypes)
    assert (new.unlabelled, new.already_in_table, new.sources) == (1, 1, {"day_01.parquet": 2})


def test_the_same_rows_in_two_batches_are_added_once(tmp_path, table):
    rows = pd.DataFrame({"id": [7, 8], "x": [1.0, 2.0]})
    first = _write(tmp_path / "b", "day_01.parquet", rows)
    second = _write(tmp_path / "b", "day_02.parquet", rows)
    labels = pd.DataFrame({"id": [7, 8], "y": [0, 1]})
    new = gather_new_rows(table, [first, second], labels, id_column="id", target="y")
    assert new.frame["id"].tolist() == [7, 8]
    assert new.already_in_table == 2


def test_broken_labels_are_named(tmp_path):
    _write(tmp_path / "l", "a.parquet", pd.DataFrame({"key": [1], "y": [0]}))
    with pytest.raises(DataError, match=r"lack column\(s\) id"):
        read_labels(tmp_path / "l", id_column="id", target="y")
    _write(tmp_path / "m", "a.parquet", pd.DataFrame({"id": [1, 1], "y": [0, 1]}))
    with pytest.raises(DataError, match="two different labels"):
        read_labels(tmp_path / "m", id_column="id", target="y")
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "missing", id_column="id", target="y")


def test_foreign_label_values_and_batches_missing_columns_are_refused(tmp_path, table):
    batch = _write(tmp_path / "b", "d.parquet", pd.DataFrame({"id": [9], "x": [1.0]}))
    with pytest.raises(DataError, match="never has"):
        gather_new_rows(
            table, [batch], pd.DataFrame({"id": [9], "y": [2]}), id_column="id", target="y"
        )
    narrow = _write(tmp_path / "c", "d.parquet", pd.DataFrame({"id": [9]}))
    with pytest.raises(DataError, match="lacks column"):
        gather_new_rows(
            table, [narrow], pd.DataFrame({"id": [9], "y": [1]}), id_column="id", target="y"
        )


def test_append_is_atomic_and_keeps_the_old_table_on_failure(tmp_path, table):
    path = tmp_path / "train.parquet"
    table.to_parquet(path)
    new = pd.DataFrame({"id": [4], "x": [0.4], "y": [1]})
    append_rows(path, table, new)
    assert pd.read_parquet(path)["id"].tolist() == [1, 2, 3, 4]
    with pytest.raises((TypeError, ValueError)):  # pyarrow cannot write an object id
        append_rows(path, table, pd.DataFrame({"id": [object()], "x": [0.5], "y": [0]}))
    assert pd.read_parquet(path)["id"].tolist() == [1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]


def _log_part(day_folder, ids, xs, times):
    """A part of the endpoint's predictions log: features, the id as text, the log's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    day_folder.mkdir(parents=True, exist_ok=True)
    stamp = pd.Timestamp(times[0]).strftime("%Y%m%dT%H%M%S%f")
    table = pa.table(
        {
            "x": pa.array(xs, pa.float64()),
            "id": pa.array(ids, pa.string()),
            "score": pa.array([0.5] * len(ids), pa.float64()),
            "stemma_time": pa.array(
                list(pd.to_datetime(times, utc=True)), pa.timestamp("us", "UTC")
            ),
            "stemma_model_version": pa.array(["1"] * len(ids), pa.string()),
        }
    )
    pq.write_table(table, day_folder / f"part-{stamp}-0123abcd.parquet")


def test_a_day_of_the_prediction_log_is_a_batch_of_its_latest_rows(tmp_path):
    from stemma.components.data.ingest import batch_files

    table = pd.DataFrame(
        {
            "id": [1, 2],
            "x": [0.1, 0.2],
            "applied_at": pd.to_datetime(["2025-01-01", "2025-01-02"]),
            "y": [0, 1],
        }
    )
    predictions = tmp_path / "log" / "predictions"
    day = predictions / "2025-06-01"
    _log_part(day, ["2", "4", "5"], [9.0, 4.0, 5.0], ["2025-06-01 10:00"] * 3)
    # id 4 scored again later the same day: its latest row is the one kept
    _log_part(day, ["4"], [4.5], ["2025-06-01 11:00"])
    assert batch_files(predictions) == [day]
    labels = pd.DataFrame({"id": ["4", "5", "2"], "y": [1, 0, 0]})  # the log's labels: text ids

    new = gather_new_rows(table, [day], labels, id_column="id", target="y", fillable=["applied_at"])
    # 2 is in the table already; rows come in the order they were logged
    assert new.frame["id"].tolist() == [5, 4]
    assert new.frame["x"].tolist() == [5.0, 4.5]
    assert new.frame["applied_at"].isna().all()  # the log holds no application time
    assert new.frame.dtypes.equals(table.dtypes)
    assert (new.sources, new.already_in_table) == ({"2025-06-01": 2}, 1)

    # a column the log lacks and whose type holds no missing value is named
    counted = table.assign(applied_at=[1, 2])
    with pytest.raises(DataError, match=r"lacks the column applied_at .* int64 values cannot"):
        gather_new_rows(counted, [day], labels, id_column="id", target="y", fillable=["applied_at"])
    # without leave to fill it, it is a missing column as for any batch
    with pytest.raises(DataError, match=r"lacks column\(s\) of the training table: applied_at"):
        gather_new_rows(table, [day], labels, id_column="id", target="y")
    # text ids that are not numbers cannot join a table of number ids
    with pytest.raises(DataError, match="1 ids are not whole numbers"):
        gather_new_rows(
            table, [day], pd.DataFrame({"id": ["x7"], "y": [1]}), id_column="id", target="y"
        )
