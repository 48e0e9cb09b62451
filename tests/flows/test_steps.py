"""What the flows share: the spec path a served run opens, paths as lineage names them."""

from __future__ import annotations

from pathlib import Path

from stemma.flows.steps import PROJECT_ROOT_VARIABLE, config_location, relative


def test_a_served_run_opens_a_relative_spec_under_the_served_root(monkeypatch, tmp_path):
    monkeypatch.delenv(PROJECT_ROOT_VARIABLE, raising=False)
    assert config_location("configs/credit.yaml") == "configs/credit.yaml"
    monkeypatch.setenv(PROJECT_ROOT_VARIABLE, str(tmp_path))
    assert config_location("configs/credit.yaml") == str(tmp_path / "configs" / "credit.yaml")
    assert config_location("/elsewhere/spec.yaml") == "/elsewhere/spec.yaml"


def test_paths_are_named_relative_to_the_root_when_inside_it(tmp_path: Path) -> None:
    assert relative(tmp_path / "data" / "day.parquet", tmp_path) == "data/day.parquet"
    assert relative(Path("/outside/x"), tmp_path) == "/outside/x"
