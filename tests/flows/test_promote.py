"""`stemma promote` / `stemma rollback` entry points, against the project's local MLflow store."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from stemma.components.errors import RegistryError
from stemma.components.platform.tracking import configure_tracking
from stemma.flows.promote import format_record, parse_reference, run_promote, run_rollback
from tests.support import isolated_mlflow

REFERENCES = [
    ("version", "models:/credit/7", ("credit", "7", None)),
    ("alias", "models:/credit@challenger", ("credit", None, "challenger")),
]


@pytest.mark.parametrize(
    "reference,expected", [c[1:] for c in REFERENCES], ids=[c[0] for c in REFERENCES]
)
def test_parse_reference(reference, expected):
    assert parse_reference(reference) == expected


@pytest.mark.parametrize(
    "reference",
    ["credit/7", "models:/credit", "models:/credit/x"],
    ids=["no-scheme", "bare", "not-a-number"],
)
def test_parse_reference_rejects_other_shapes(reference):
    with pytest.raises(RegistryError, match="is not a model reference"):
        parse_reference(reference)


def test_promote_challenger_then_roll_back(tmp_path):
    with isolated_mlflow():
        configure_tracking(tmp_path)
        client = MlflowClient()
        client.create_registered_model("credit")
        for _ in range(2):
            client.create_model_version(
                "credit", source=str(tmp_path), tags={"stemma.gate.decision": "passed"}
            )
        client.set_registered_model_alias("credit", "champion", "1")
        client.set_registered_model_alias("credit", "challenger", "2")

        with pytest.raises(RegistryError, match="expected v5; someone else moved it"):
            run_promote("models:/credit@challenger", tmp_path, reason="x", expected="5")
        promoted = run_promote(
            "models:/credit@challenger", tmp_path, reason="shadow win", expected="v1"
        )
        rolled = run_rollback("credit", tmp_path, reason="canary alarm")

        aliases = {k: str(v) for k, v in client.get_registered_model("credit").aliases.items()}
    assert (promoted.from_version, promoted.to_version, promoted.outcome) == ("1", "2", "done")
    assert (rolled.from_version, rolled.to_version) == ("2", "1")
    assert aliases == {"champion": "1", "previous-champion": "2"}
    text = format_record(promoted)
    assert text.startswith("promote: credit champion v1 -> v2 (done)")
    assert "reason: shadow win" in text and promoted.record_run_id in text
