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
