"""The lineage records of training, scoring and retraining runs, and their tags.

A training run produces the chain

    data version (DVC md5) ─contains─▶ data file (md5) ─checked_by─▶ validation (sha256)
                                           │                              │
                                           └──────input_of──▶ MLflow run ◀┘ gated
                                                                  │
                                                      produced ───▶ model version (weights sha256)

The same facts are written three ways, so each place a user looks agrees: as the run's
:class:`~stemma.components.platform.lineage.LineageRecord` (``lineage/record.json``), as
``stemma.*`` tags on the MLflow run, and as tags on the model version. The record type,
node ids and index tags live in :mod:`stemma.components.platform.lineage`; the names
re-exported below keep ``records.<name>`` working for the flows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from stemma.components.platform import tags as tag_names
from stemma.components.platform.lineage import (
    EDGES_TAG,
    MAX_INDEX_TAG_CHARS,
    RECORD_ARTIFACT,
    RECORD_SCHEMA,
    Edge,
    LineageRecord,
    Node,
    asset_key,
    created_stamp,
    data_node_id,
    file_node_id,
    index_tags,
    input_node_id,
    made_tag,
    model_node_id,
    predictions_node_id,
    record_roles,
    run_node_id,
    used_tag,
    validation_node_id,
)
from stemma.components.platform.redaction import redact

#: The builders here, and the record names the flows and tests read as ``records.<name>``.
__all__ = [
    "EDGES_TAG",
    "MAX_INDEX_TAG_CHARS",
    "RECORD_ARTIFACT",
    "RECORD_SCHEMA",
    "ScoringLineage",
    "TrainingLineage",
    "artifact_digests",
    "asset_key",
    "build_retrain_record",
    "build_scoring_record",
    "build_training_record",
    "data_node_id",
    "file_node_id",
    "index_tags",
    "input_node_id",
    "made_tag",
    "model_node_id",
    "model_version_tags",
    "predictions_node_id",
    "record_roles",
    "run_node_id",
    "run_tags",
    "used_tag",
    "validation_node_id",
]


@dataclass(frozen=True)
class TrainingLineage:
    """The digests one training run read and wrote."""

    pipeline: str
    data_pointer: str
    data_md5: str
    data_path: str
    file_path: str
    file_md5: str
    git_rev: str | None
    git_dirty: bool
    validation_digest: str
    validation_success: bool
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    config_path: str
    config_sha256: str
    model_name: str | None = None
    model_version: str | None = None
    weights_sha256: str | None = None
    #: sha256 of every other file the run logged, by artifact path.
    artifacts: dict[str, str] = field(default_factory=dict)


def build_training_record(
    lineage: TrainingLineage, *, created: datetime | None = None
) -> LineageRecord:
    """The lineage record of a training run."""
    data = data_node_id(lineage.data_pointer, lineage.data_md5)
    data_file = file_node_id(lineage.file_path, lineage.file_md5)
    validation = validation_node_id(lineage.validation_digest)
    run = run_node_id(lineage.run_id)
    nodes = [
        Node(
            "data_version",
            data,
            f"md5:{lineage.data_md5}",
            {
                "pointer": lineage.data_pointer,
                "path": lineage.data_path,
                "git_rev": lineage.git_rev,
            },
        ),
        Node("data_file", data_file, f"md5:{lineage.file_md5}", {"path": lineage.file_path}),
        Node(
            "validation",
            validation,
            f"sha256:{lineage.validation_digest}",
            {"success": lineage.validation_success, "artifact": "checks/validation_result.json"},
        ),
        Node(
            "run",
            run,
            None,
            {
                "experiment_id": lineage.experiment_id,
                "flow_run_id": lineage.flow_run_id,
                "config": lineage.config_path,
                "config_sha256": lineage.config_sha256,
                "git_rev": lineage.git_rev,
                "git_dirty": lineage.git_dirty,
            },
        ),
    ]
    edges = [
        Edge(data, data_file, "contains"),
        Edge(data_file, validation, "checked_by"),
        Edge(data_file, run, "input_of"),
        Edge(validation, run, "gated"),
    ]
    if lineage.model_name and lineage.model_version:
        model = model_node_id(lineage.model_name, lineage.model_version)
        nodes.append(Node("model_version", model, f"sha256:{lineage.weights_sha256}", {}))
        edges.append(Edge(run, model, "produced"))
    return LineageRecord(
        flow="train",
        pipeline=lineage.pipeline,
        created=created_stamp(created),
        nodes=nodes,
        edges=edges,
        artifacts={path: f"sha256:{digest}" for path, digest in lineage.artifacts.items()},
    )


def artifact_digests(folder: Path, prefix: str) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its artifact path ``prefix/relative``."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        digests[f"{prefix}/{relative}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def run_tags(lineage: TrainingLineage) -> dict[str, str]:
    """``stemma.*`` tags for the MLflow run, mirroring the record."""
    tags = {
        tag_names.PIPELINE: lineage.pipeline,
        tag_names.DATA_POINTER: lineage.data_pointer,
        tag_names.DATA_MD5: lineage.data_md5,
        tag_names.DATA_PATH: lineage.file_path,
        tag_names.DATA_FILE_MD5: lineage.file_md5,
        tag_names.CHECKS_DIGEST: lineage.validation_digest,
        tag_names.CHECKS_SUCCESS: str(lineage.validation_success).lower(),
        tag_names.CONFIG_PATH: lineage.config_path,
        tag_names.CONFIG_SHA256: lineage.config_sha256,
        tag_names.GIT_DIRTY: str(lineage.git_dirty).lower(),
    }
    if lineage.git_rev:
        tags[tag_names.GIT_REV] = lineage.git_rev
    if lineage.flow_run_id:
        tags[tag_names.PREFECT_FLOW_RUN_ID] = lineage.flow_run_id
    return redact(tags)


def model_version_tags(lineage: TrainingLineage) -> dict[str, str]:
    """``stemma.*`` tags for the registered model version, mirroring the record."""
    tags = {
        tag_names.RUN_ID: lineage.run_id,
        tag_names.DATA_MD5: lineage.data_md5,
        tag_names.DATA_FILE_MD5: lineage.file_md5,
        tag_names.CHECKS_DIGEST: lineage.validation_digest,
    }
    if lineage.weights_sha256:
        tags[tag_names.WEIGHTS_SHA256] = lineage.weights_sha256
    if lineage.git_rev:
        tags[tag_names.GIT_REV] = lineage.git_rev
    return tags


@dataclass(frozen=True)
class ScoringLineage:
    """The digests one batch-scoring run read and wrote."""

    pipeline: str
    input_path: str
    input_digest: str
    input_files: dict[str, str]
    data_pointer: str | None
    data_md5: str | None
    model_name: str
    model_version: str
    weights_sha256: str
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    output_path: str
    manifest_sha256: str
    parts: dict[str, str]
    rows_scored: int
    rows_rejected: int


def build_scoring_record(
    lineage: ScoringLineage, *, created: datetime | None = None
) -> LineageRecord:
    """The lineage record of a scoring run: input and model in, predictions out."""
    batch = input_node_id(lineage.input_path, lineage.input_digest)
    model = model_node_id(lineage.model_name, lineage.model_version)
    run = run_node_id(lineage.run_id)
    predictions = predictions_node_id(lineage.output_path, lineage.manifest_sha256)
    nodes = [
        Node(
            "input",
            batch,
            f"md5:{lineage.input_digest}",
            {"path": lineage.input_path, "files": dict(lineage.input_files)},
        ),
        Node("model_version", model, f"sha256:{lineage.weights_sha256}", {}),
        Node(
            "run",
            run,
            None,
            {"experiment_id": lineage.experiment_id, "flow_run_id": lineage.flow_run_id},
        ),
        Node(
            "predictions",
            predictions,
            f"sha256:{lineage.manifest_sha256}",
            {
                "path": lineage.output_path,
                "parts": dict(lineage.parts),
                "rows_scored": lineage.rows_scored,
                "rows_rejected": lineage.rows_rejected,
            },
        ),
    ]
    edges = [
        Edge(batch, run, "input_of"),
        Edge(model, run, "scored_with"),
        Edge(run, predictions, "produced"),
    ]
    if lineage.data_pointer and lineage.data_md5:
        data = data_node_id(lineage.data_pointer, lineage.data_md5)
        attributes = {"pointer": lineage.data_pointer}
        nodes.insert(0, Node("data_version", data, f"md5:{lineage.data_md5}", attributes))
        edges.insert(0, Edge(data, batch, "contains"))
    return LineageRecord(
        flow="score",
        pipeline=lineage.pipeline,
        created=created_stamp(created),
        nodes=nodes,
        edges=edges,
    )


def _retrain_cause(cause: dict[str, str], run: str, nodes: list[Node], edges: list[Edge]) -> None:
    """Add the drift report (or run) that caused a retraining, and the batch it judged."""
    report = run_node_id(cause["run_id"])
    kind = "drift_report" if cause.get("kind") == "drift_report" else "run"
    attributes = {k: v for k, v in cause.items() if k != "run_id" and v}
    nodes.append(Node(kind, report, None, attributes))
    edges.append(Edge(report, run, "caused"))
    if cause.get("batch") and cause.get("batch_digest"):
        batch = input_node_id(cause["batch"], cause["batch_digest"])
        digest = f"md5:{cause['batch_digest']}"
        nodes.append(Node("input", batch, digest, {"path": cause["batch"]}))
        edges.append(Edge(batch, report, "monitored_in"))


def build_retrain_record(
    *,
    pipeline: str,
    run_id: str,
    cause: dict[str, str],
    previous_data_md5: str,
    data_md5: str,
    data_pointer: str,
    train_run_id: str,
    model_name: str,
    model_version: str,
    shadow_run_id: str | None,
    decision: str,
    created: datetime | None = None,
) -> LineageRecord:
    """The lineage record of a retraining run: why it ran and what it made.

    A drift report that caused the run is a ``drift_report`` node (the monitor's MLflow
    run) linked from the batch it judged, so walking upstream from the new model version
    reads "retrained because of drift report X on batch Y".
    """
    run = run_node_id(run_id)
    before = data_node_id(data_pointer, previous_data_md5)
    after = data_node_id(data_pointer, data_md5)
    train = run_node_id(train_run_id)
    model = model_node_id(model_name, model_version)
    nodes = [
        Node("run", run, None, {"flow": "retrain", "decision": decision}),
        Node("data_version", before, f"md5:{previous_data_md5}", {"pointer": data_pointer}),
        Node("data_version", after, f"md5:{data_md5}", {"pointer": data_pointer}),
        Node("run", train, None, {"flow": "train"}),
        Node("model_version", model, None, {}),
    ]
    edges = [
        Edge(before, run, "input_of"),
        Edge(run, after, "produced"),
        Edge(run, train, "triggered"),
        Edge(after, train, "input_of"),
        Edge(train, model, "produced"),
    ]
    if cause.get("run_id"):
        _retrain_cause(cause, run, nodes, edges)
    if shadow_run_id:
        shadow = run_node_id(shadow_run_id)
        nodes.append(Node("run", shadow, None, {"flow": "shadow"}))
        edges.append(Edge(model, shadow, "evaluated_in"))
    return LineageRecord(
        flow="retrain",
        pipeline=pipeline,
        created=created_stamp(created),
        nodes=nodes,
        edges=edges,
    )
