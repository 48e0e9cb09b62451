"""The shadow and canary flows' plain steps: settings, labels' location, versions named."""

from __future__ import annotations

from pathlib import Path

import pytest

from stemma.components.errors import SpecError
from stemma.components.evaluation import steps
from stemma.components.spec import EvaluateSpec, load_spec


@pytest.fixture
def loaded(repo_root: Path):
    return load_spec(repo_root / "configs" / "credit.yaml", check_paths=False)


def test_evaluation_needs_an_id_column(repo_root: Path) -> None:
    without_id = load_spec(
        repo_root / "configs" / "credit.yaml",
        ["data.id=null", "evaluate=null", "retrain=null"],
        check_paths=False,
    )
    with pytest.raises(SpecError, match=r"data\.id is not set"):
        steps.evaluate_settings(without_id)


def test_labels_named_must_exist_and_labels_of_the_spec_may_lag(loaded) -> None:
    settings = EvaluateSpec(labels="data/credit/labels")
    assert steps.labels_location(loaded, settings, "other/labels") == (
        loaded.resolve("other/labels"),
        True,
    )
    assert steps.labels_location(loaded, settings, None) == (
        loaded.resolve("data/credit/labels"),
        False,
    )
    assert steps.labels_location(loaded, EvaluateSpec(), None) == (None, False)


def test_labels_not_arrived_yet_are_none_with_a_note(loaded, tmp_path: Path) -> None:
    labels, digest, note = steps.read_labels(loaded, tmp_path / "missing", False)
    assert (labels, digest) == (None, None) and "no labels at" in note
    assert "no labels configured" in steps.read_labels(loaded, None, False)[2]


def test_a_version_reference_needs_no_registry() -> None:
    assert steps.version_of(None, "models:/credit/7") == "7"  # type: ignore[arg-type]
