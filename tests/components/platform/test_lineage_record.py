"""The typed lineage record reads and writes exactly the layout of ``lineage/record.json``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from stemma.components.errors import LineageError
from stemma.components.platform import lineage as records
from stemma.components.platform.decisions import Decided, build_decision_record
from stemma.components.platform.lineage import (
    RECORD_SCHEMA,
    Edge,
    LineageRecord,
    Node,
    index_tags,
    record_roles,
    run_node,
)

#: A training record as the code before the typed record wrote it (``MlflowClient.log_dict``
#: writes ``json.dump(document, indent=2)``): the new code must read it and write it alike.
OLD_TRAINING_RECORD = """{
  "schema": "stemma.lineage/1",
  "pipeline": "credit",
  "flow": "train",
  "created": "2026-12-01T00:00:00+00:00",
  "nodes": [
    {
      "kind": "data_version",
      "id": "dvc:data.dvc@aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "digest": "md5:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "attributes": {
        "pointer": "data.dvc",
        "path": "data",
        "git_rev": "abc123"
      }
    },
    {
      "kind": "data_file",
      "id": "file:data/credit/train.parquet@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
      "digest": "md5:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
      "attributes": {
        "path": "data/credit/train.parquet"
      }
    },
    {
      "kind": "validation",
      "id": "gx-validation:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
      "digest": "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
      "attributes": {
        "success": true,
        "artifact": "checks/validation_result.json"
      }
    },
    {
      "kind": "run",
      "id": "mlflow-run:dddddddddddddddddddddddddddddddd",
      "digest": null,
      "attributes": {
        "experiment_id": "1",
        "flow_run_id": "flow-1",
        "config": "configs/credit.yaml",
        "config_sha256": "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
        "git_rev": "abc123",
        "git_dirty": false
      }
    },
    {
      "kind": "model_version",
      "id": "models:/credit/7",
      "digest": "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
      "attributes": {}
    }
  ],
  "edges": [
    {
      "source": "dvc:data.dvc@aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "target": "file:data/credit/train.parquet@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
      "relation": "contains"
    },
    {
      "source": "file:data/credit/train.parquet@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
      "target": "gx-validation:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
      "relation": "checked_by"
    },
    {
      "source": "file:data/credit/train.parquet@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
      "target": "mlflow-run:dddddddddddddddddddddddddddddddd",
      "relation": "input_of"
    },
    {
      "source": "gx-validation:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
      "target": "mlflow-run:dddddddddddddddddddddddddddddddd",
      "relation": "gated"
    },
    {
      "source": "mlflow-run:dddddddddddddddddddddddddddddddd",
      "target": "models:/credit/7",
      "relation": "produced"
    }
  ],
  "artifacts": {
    "model/a.txt": "sha256:2222222222222222222222222222222222222222222222222222222222222222",
    "model/b.txt": "sha256:1111111111111111111111111111111111111111111111111111111111111111"
  }
}
"""

#: A shadow decision record as the code before the typed record built it.
OLD_DECISION_RECORD = {
    "schema": "stemma.lineage/1",
    "pipeline": "credit",
    "flow": "shadow",
    "created": "2026-12-01T00:00:00+00:00",
    "decision": {
        "decision": "promote",
        "metric": "roc_auc",
        "reasons": ["better"],
        "who": "ana",
        "when": "2026-12-01T00:00:00+00:00",
    },
    "nodes": [
        {
            "kind": "run",
            "id": "mlflow-run:" + "d" * 32,
            "digest": None,
            "attributes": {"experiment_id": "1", "flow_run_id": None},
        },
        {
            "kind": "labels",
            "id": "labels:data/labels.parquet@" + "9" * 32,
            "digest": "md5:" + "9" * 32,
            "attributes": {"path": "data/labels.parquet"},
        },
        {
            "kind": "run",
            "id": "mlflow-run:" + "8" * 32,
            "digest": None,
            "attributes": {"action": "promote", "outcome": "done"},
        },
    ],
    "edges": [
        {
            "source": "shadow-evaluation:" + "d" * 32,
            "target": "decision:" + "d" * 32,
            "relation": "decided",
        },
        {"source": "decision:" + "d" * 32, "target": "models:/credit/8", "relation": "promote"},
        {"source": "decision:" + "d" * 32, "target": "models:/credit/7", "relation": "against"},
        {
            "source": "labels:data/labels.parquet@" + "9" * 32,
            "target": "shadow-evaluation:" + "d" * 32,
            "relation": "labelled",
        },
        {
            "source": "decision:" + "d" * 32,
            "target": "mlflow-run:" + "8" * 32,
            "relation": "carried_out_by",
        },
        {"source": "models:/credit/8", "target": "models:/credit/7", "relation": "promoted_over"},
    ],
}


def _training_facts() -> records.TrainingLineage:
    return records.TrainingLineage(
        pipeline="credit",
        data_pointer="data.dvc",
        data_md5="a" * 32,
        data_path="data",
        file_path="data/credit/train.parquet",
        file_md5="b" * 32,
        git_rev="abc123",
        git_dirty=False,
        validation_digest="c" * 64,
        validation_success=True,
        run_id="d" * 32,
        experiment_id="1",
        flow_run_id="flow-1",
        config_path="configs/credit.yaml",
        config_sha256="e" * 64,
        model_name="credit",
        model_version="7",
        weights_sha256="f" * 64,
        artifacts={"model/b.txt": "1" * 64, "model/a.txt": "2" * 64},
    )


def test_an_old_record_reads_and_writes_back_byte_for_byte():
    record = LineageRecord.from_json(OLD_TRAINING_RECORD)
    assert record.flow == "train"
    assert record.schema == RECORD_SCHEMA
    assert record.nodes[-1] == Node("model_version", "models:/credit/7", "sha256:" + "f" * 64, {})
    assert record.edges[0].relation == "contains"
    assert record.to_json() + "\n" == OLD_TRAINING_RECORD
    assert record.to_dict() == json.loads(OLD_TRAINING_RECORD)


def test_the_training_builder_writes_the_old_layout():
    record = records.build_training_record(
        _training_facts(), created=datetime(2026, 12, 1, tzinfo=UTC)
    )
    assert isinstance(record, LineageRecord)
    assert record.to_json() + "\n" == OLD_TRAINING_RECORD
    assert list(record.to_dict()) == [
        "schema",
        "pipeline",
        "flow",
        "created",
        "nodes",
        "edges",
        "artifacts",
    ]


def test_a_decision_record_keeps_its_layout_and_round_trips():
    decided = Decided(
        evaluation="shadow-evaluation:" + "d" * 32,
        decision="decision:" + "d" * 32,
        challenger="models:/credit/8",
        incumbent="models:/credit/7",
        verdict="promote",
        reasons=["better"],
        who="ana",
        when="2026-12-01T00:00:00+00:00",
        labels_path="data/labels.parquet",
        labels_digest="9" * 32,
        action="promote",
        action_outcome="done",
        action_run_id="8" * 32,
    )
    record = build_decision_record(
        flow="shadow",
        pipeline="credit",
        nodes=[run_node("d" * 32, "1", None)],
        edges=[],
        decided=decided,
        summary={"metric": "roc_auc"},
    )
    document = record.to_dict()
    assert document == OLD_DECISION_RECORD
    assert list(document) == list(OLD_DECISION_RECORD)
    assert LineageRecord.from_dict(OLD_DECISION_RECORD) == record
    assert LineageRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "extra",
    [
        {"artifacts": {"drift/report.json": "sha256:" + "1" * 64}},
        {"variants": [{"method": "int8_dynamic", "version": "9", "speedup": 1.4}]},
        {"written_by": "a later Stemma"},
    ],
    ids=["monitor-artifacts", "quantize-variants", "unknown-key"],
)
def test_optional_and_unknown_keys_round_trip(extra):
    document = {
        "schema": RECORD_SCHEMA,
        "pipeline": "credit",
        "flow": "monitor",
        "created": "2026-12-01T00:00:00+00:00",
        "nodes": [{"kind": "run", "id": "mlflow-run:r", "digest": None, "attributes": {}}],
        "edges": [],
        **extra,
    }
    record = LineageRecord.from_dict(document)
    assert record.to_dict() == document
    assert list(record.to_dict()) == list(document)


def test_a_node_without_digest_or_attributes_reads_with_defaults():
    record = LineageRecord.from_dict(
        {"flow": "monitor", "nodes": [{"id": "predictions:x@1", "kind": "predictions"}]}
    )
    assert record.nodes == [Node("predictions", "predictions:x@1", None, {})]
    assert record.schema == RECORD_SCHEMA


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"nodes": [{"kind": "run"}]}', "a node needs an id"),
        ('{"edges": [{"source": "a"}]}', "an edge a source, target and relation"),
    ],
    ids=["not-json", "not-an-object", "node-without-id", "edge-without-target"],
)
def test_a_bad_record_is_a_clear_error(text, detail):
    with pytest.raises(LineageError) as raised:
        LineageRecord.from_json(text)
    assert raised.value.headline == "not a lineage record"
    assert any(detail in line for line in raised.value.details)


def test_credentials_never_enter_a_record():
    record = LineageRecord(
        flow="score",
        pipeline="credit",
        nodes=[Node("input", "input:s3://reader:SECRET@bucket/b@1", None, {"url": "s3://t@b/x"})],
        edges=[Edge("input:s3://reader:SECRET@bucket/b@1", "mlflow-run:r", "input_of")],
    )
    assert "SECRET" not in repr(record)
    assert "SECRET" not in record.to_json()
    assert "s3://reader:***@bucket" in record.to_json()
    assert "s3://***@b/x" in record.to_json()


def test_index_tags_read_a_record_or_its_document_alike():
    record = LineageRecord.from_json(OLD_TRAINING_RECORD)
    assert index_tags(record, "d" * 32) == index_tags(record.to_dict(), "d" * 32)
    assert record_roles(record, "d" * 32)[0] == {"models:/credit/7"}
