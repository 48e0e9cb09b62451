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
