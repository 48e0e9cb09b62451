"""The one label reader: files, folders, lists, and every malformed case named."""

from __future__ import annotations

import pandas as pd
import pytest

from stemma.components.data.labels import read_labels
from stemma.components.errors import DataError


def write(frame: pd.DataFrame, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


def test_a_folder_of_parquet_and_csv_files_is_one_table(tmp_path):
    write(pd.DataFrame({"key": [1, 2], "y": [0, 1]}), tmp_path / "l" / "a.parquet")
    write(pd.DataFrame({"key": [3, 2], "y": [1, 1]}), tmp_path / "l" / "b.csv")
    write(pd.DataFrame({"key": [9], "y": [5]}), tmp_path / "l" / "_ignored.csv")
    labels = read_labels(tmp_path / "l", "key", "y")
    assert labels.to_dict("list") == {"key": [1, 2, 3], "y": [0, 1, 1]}


def test_a_list_of_files_and_one_file_read_alike(tmp_path):
    path = write(pd.DataFrame({"key": ["a", "b"], "y": [0.5, 1.5]}), tmp_path / "x.parquet")
    assert read_labels([path], "key", "y").equals(read_labels(path, "key", "y"))


def test_empty_labels_are_dropped_or_refused(tmp_path):
    path = write(pd.DataFrame({"key": [1, 2, 3], "y": [0.0, None, 1.0]}), tmp_path / "h.parquet")
    assert read_labels(path, "key", "y")["key"].tolist() == [1, 3]
    with pytest.raises(DataError, match="1 labels are missing") as caught:
        read_labels(path, "key", "y", missing="error")
    assert "key 2" in caught.value.render()


@pytest.mark.parametrize(
    ("frame", "kwargs", "message"),
    [
        (
            pd.DataFrame({"id": [1], "y": [0]}),
            {},
            "a.parquet: no id column 'key' (its columns: id, y)",
        ),
        (pd.DataFrame({"key": [1]}), {}, "a.parquet: no target column 'y' (its columns: key)"),
        (pd.DataFrame({"key": [1, 1, 2], "y": [0, 1, 1]}), {}, "1 ids have two different labels"),
        (pd.DataFrame({"key": [1], "y": ["yes"]}), {}, "labels in 'y' are not numbers"),
        (pd.DataFrame({"key": [1, 2], "y": [0, 2]}), {"task": "binary"}, "must be 0 or 1"),
    ],
    ids=["no-id", "no-target", "conflicting", "not-numbers", "not-binary"],
)
def test_malformed_labels_are_clear_errors(tmp_path, frame, kwargs, message):
    path = write(frame, tmp_path / "a.parquet")
    with pytest.raises(DataError) as caught:
        read_labels(path, "key", "y", **kwargs)
    assert message in caught.value.render()


def test_the_same_label_twice_counts_once(tmp_path):
    path = write(pd.DataFrame({"key": [1, 1], "y": [1, 1]}), tmp_path / "a.parquet")
    assert len(read_labels(path, "key", "y")) == 1


def test_a_missing_path_and_a_missing_id_column_in_the_spec_are_named(tmp_path):
    with pytest.raises(DataError, match="no such labels file or folder"):
        read_labels(tmp_path / "nowhere", "key", "y")
    with pytest.raises(DataError, match="the spec names none"):
        read_labels(tmp_path / "nowhere", None, "y")


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable labels file"):
        read_labels(path, "key", "y")


def _logged_labels(log, day: str, ids: list[str], labels: list[int], times: list[str]):
    """A part of the endpoint's labels folder, in the log's layout and types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = log / "labels" / day
    folder.mkdir(parents=True, exist_ok=True)
    stamp = pd.Timestamp(times[0]).strftime("%Y%m%dT%H%M%S%f")
    table = pa.table(
        {
            "key": pa.array(ids, pa.string()),
            "y": pa.array(labels, pa.int64()),
            "stemma_time": pa.array(
                list(pd.to_datetime(times, utc=True)), pa.timestamp("us", "UTC")
            ),
        }
    )
    pq.write_table(table, folder / f"part-{stamp}-0123abcd.parquet")


def test_labels_the_endpoint_logged_keep_each_ids_latest_label(tmp_path):
    log = tmp_path / "log"
    (log / "predictions").mkdir(parents=True)
    # labels/ exists before any label comes: no label yet, not an error
    (log / "labels").mkdir()
    assert read_labels(log / "labels", "key", "y").empty
    _logged_labels(log, "2025-06-01", ["1", "2"], [0, 1], ["2025-06-01 10:00", "2025-06-01 10:01"])
    # the next day 1 is corrected; within a part, the later row wins too
    _logged_labels(
        log,
        "2025-06-02",
        ["1", "3", "3"],
        [1, 0, 1],
        ["2025-06-02 08:00", "2025-06-02 09:00", "2025-06-02 09:30"],
    )
    labels = read_labels(log / "labels", "key", "y", task="binary")
    assert dict(zip(labels["key"], labels["y"], strict=True)) == {"1": 1, "2": 1, "3": 1}
    assert list(labels.columns) == ["key", "y"]
    # plain label files still refuse an id with two labels
    plain = write(pd.DataFrame({"key": [1, 1], "y": [0, 1]}), tmp_path / "plain.parquet")
    with pytest.raises(DataError, match="two different labels"):
        read_labels(plain, "key", "y")
