"""The continuous-training steps that need no store: the lock, the cause tags, the outcome."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from stemma.components.training import retraining


def test_a_second_holder_of_the_pipeline_lock_is_refused(tmp_path: Path) -> None:
    with retraining.pipeline_lock(tmp_path, "credit") as first:
        with retraining.pipeline_lock(tmp_path, "credit") as second:
            assert (first, second) == (True, False)
        with retraining.pipeline_lock(tmp_path, "other") as other:
            assert other is True
    with retraining.pipeline_lock(tmp_path, "credit") as again:
        assert again is True


def test_cause_tags_are_the_kind_and_the_causing_run() -> None:
    why = {"kind": "drift_report", "run_id": "abc", "batch": "b.parquet", "features": "age"}
    assert retraining.cause_tags(why) == {
        "stemma.cause.kind": "drift_report",
        "stemma.cause.run_id": "abc",
    }
    assert retraining.cause_tags({"kind": "schedule"}) == {"stemma.cause.kind": "schedule"}


def test_an_unknown_cause_is_a_retrain_error() -> None:
    class Client:
        def get_run(self, run_id: str) -> None:
            raise LookupError(run_id)

    with pytest.raises(retraining.RetrainError, match="is not an MLflow run"):
        retraining.cause_of(Client(), "nope")
    assert retraining.cause_of(Client(), None) == {"kind": "schedule"}


def test_too_few_rows_says_how_many_and_the_threshold() -> None:
    gathered = SimpleNamespace(new=SimpleNamespace(rows=12), version=SimpleNamespace(md5="m1"))
    settings = SimpleNamespace(min_new_rows=100)
    message = retraining.too_few_rows(gathered, settings)  # type: ignore[arg-type]
    assert message is not None and "12 new labelled rows" in message and "= 100" in message
    assert retraining.too_few_rows(gathered, SimpleNamespace(min_new_rows=12)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "gate,holdout,expected",
    [
        ({"passed": False}, Path("day"), retraining.GATE_FAILED),
        ({"passed": True, "alias": "champion"}, Path("day"), retraining.PROMOTED),
        ({"passed": True, "alias": "challenger"}, None, retraining.NOT_PROMOTED),
        ({"passed": True, "alias": "challenger"}, Path("day"), None),
    ],
    ids=["gate-failed", "first-champion", "nothing-held-out", "shadow-decides"],
)
def test_before_shadow(gate: dict, holdout: Path | None, expected: str | None) -> None:
    decided = retraining.before_shadow(gate, "3", "m2", holdout, "champion")
    assert (decided[0] if decided else None) == expected


def test_after_shadow_names_the_decision_and_its_first_reasons() -> None:
    shadow = {"decision": "wait", "reasons": ["a", "b", "c"]}
    outcome, summary = retraining.after_shadow(False, shadow, "3", "m2")
    assert outcome == retraining.NOT_PROMOTED and summary.endswith("shadow decided wait: a; b")
    outcome, summary = retraining.after_shadow(True, shadow, "3", "m2")
    assert outcome == retraining.PROMOTED and "v3 is the champion" in summary


def test_production_labels_the_spec_does_not_know_are_left_out_and_counted():
    """A class only production shows would stop the next training: with classes or a label
    map in the spec, such labels are counted and left out; without, any label may be a
    class the training split learns."""
    import pandas as pd

    from stemma.components.spec import DataSpec
    from stemma.components.training.retraining import known_class_labels

    labels = pd.DataFrame({"id": [1, 2, 3, 4], "y": ["Y", "N", "maybe", "Y"]})
    features = {"numeric": ["x"]}
    mapped = DataSpec(
        path="d.csv", target="y", features=features, task="binary", labels={"Y": 1, "N": 0}
    )
    kept, unknown = known_class_labels(labels, mapped)
    assert kept["id"].tolist() == [1, 2, 4] and unknown == 1

    listed = DataSpec(
        path="d.csv", target="y", features=features, task="multiclass", classes=["Y", "N"]
    )
    assert known_class_labels(labels, listed)[1] == 1
    open_classes = DataSpec(path="d.csv", target="y", features=features, task="multiclass")
    kept, unknown = known_class_labels(labels, open_classes)
    assert len(kept) == 4 and unknown == 0
