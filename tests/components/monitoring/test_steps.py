"""The monitoring flow's plain steps: batch names and flattened params."""

from __future__ import annotations

from stemma.components.monitoring import steps


def test_batch_name_is_a_file_stem_or_a_folder_name() -> None:
    assert steps.batch_name("data/batches/day_01.parquet") == "day_01"
    assert steps.batch_name("data/batches") == "batches"
    assert steps.batch_name(None) == "batch"


def test_flat_params_spell_nested_keys_with_dots_and_values_as_json() -> None:
    document = {"bins": 10, "thresholds": {"psi": 0.2, "kinds": ["a"]}, "model": "m"}
    assert steps.flat_params("monitor", document) == {
        "monitor.bins": "10",
        "monitor.thresholds.psi": "0.2",
        "monitor.thresholds.kinds": '["a"]',
        "monitor.model": "m",
    }


def test_a_batch_is_a_file_a_folder_or_days_of_the_prediction_log(tmp_path) -> None:
    from datetime import UTC, datetime, timedelta

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from stemma.components.errors import DataError

    def part(folder, name):
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": [1.0]}), folder / name)
        return folder / name

    flat = part(tmp_path / "batches", "day_01.parquet")
    found = steps.find_batch(flat)
    assert (found.path, found.files, found.days, found.name) == (flat, [flat], (), "day_01")
    assert found.file_names() == ["day_01.parquet"]

    predictions = tmp_path / "log" / "predictions"
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    first = part(predictions / "2020-01-01", "part-20200101T000000000000-00000000.parquet")
    last = part(predictions / yesterday, "part-a.parquet")
    every = steps.find_batch(predictions)
    assert every.path == predictions and every.files == [first, last]
    assert every.name == f"2020-01-01..{yesterday}"
    assert every.file_names() == [f"2020-01-01/{first.name}", f"{yesterday}/part-a.parquet"]
    # one day: the report names the day folder, and its files by name
    one = steps.find_batch(predictions, days=1)
    assert (one.path, one.files, one.name) == (predictions / yesterday, [last], yesterday)
    assert one.digest() == steps.find_batch(predictions / yesterday).digest()
    with pytest.raises(DataError, match="days apply to the prediction log's folder"):
        steps.find_batch(tmp_path / "batches", days=1)
    with pytest.raises(DataError, match=r"labels: .*no such file or folder"):
        steps.find_labels(tmp_path / "missing")
