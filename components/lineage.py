"""Lineage records: what a flow run read and wrote, with content digests, and how they link.

A training run produces the chain

    data version (DVC md5) ─contains─▶ data file (md5) ─checked_by─▶ validation (sha256)
                                           │                              │
                                           └──────input_of──▶ MLflow run ◀┘ gated
                                                                  │
                                                      produced ───▶ model version (weights sha256)

The same facts are written three ways, so each place a user looks agrees: as a JSON
document in the run's artifacts (``lineage/record.json``), as ``stemma.*`` tags on the
MLflow run, and as tags on the model version. Later commands (``stemma lineage``) walk
these records; this module only builds them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: Version of the record layout, so readers can tell old records from new ones.
RECORD_SCHEMA = "stemma.lineage/1"
#: Where the record lives among a run's artifacts.
RECORD_ARTIFACT = "lineage/record.json"


@dataclass(frozen=True)
class Node:
    """One thing in the lineage graph."""

    kind: str
    id: str
    digest: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    """``source`` led to ``target``; ``relation`` says how."""

    source: str
    target: str
    relation: str


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


def data_node_id(pointer: str, md5: str) -> str:
    """Id of a data version: the DVC pointer and the md5 it records."""
    return f"dvc:{pointer}@{md5}"


def file_node_id(path: str, md5: str) -> str:
    return f"file:{path}@{md5}"


def validation_node_id(digest: str) -> str:
    return f"gx-validation:{digest}"


def run_node_id(run_id: str) -> str:
    return f"mlflow-run:{run_id}"


def model_node_id(model_name: str, version: str) -> str:
    return f"models:/{model_name}/{version}"


def build_training_record(
    lineage: TrainingLineage, *, created: datetime | None = None
) -> dict[str, Any]:
    """The lineage record of a training run as a JSON-able document."""
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
    return {
        "schema": RECORD_SCHEMA,
        "pipeline": lineage.pipeline,
        "flow": "train",
        "created": (created or datetime.now(UTC)).isoformat(),
        "nodes": [asdict(node) for node in nodes],
        "edges": [asdict(edge) for edge in edges],
        "artifacts": {
            path: f"sha256:{digest}" for path, digest in sorted(lineage.artifacts.items())
        },
    }


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
        "stemma.pipeline": lineage.pipeline,
        "stemma.data.pointer": lineage.data_pointer,
        "stemma.data.md5": lineage.data_md5,
        "stemma.data.path": lineage.file_path,
        "stemma.data.file_md5": lineage.file_md5,
        "stemma.checks.digest": lineage.validation_digest,
        "stemma.checks.success": str(lineage.validation_success).lower(),
        "stemma.config.path": lineage.config_path,
        "stemma.config.sha256": lineage.config_sha256,
        "stemma.git.dirty": str(lineage.git_dirty).lower(),
    }
    if lineage.git_rev:
        tags["stemma.git.rev"] = lineage.git_rev
    if lineage.flow_run_id:
        tags["stemma.prefect.flow_run_id"] = lineage.flow_run_id
    return tags


def model_version_tags(lineage: TrainingLineage) -> dict[str, str]:
    """``stemma.*`` tags for the registered model version, mirroring the record."""
    tags = {
        "stemma.run_id": lineage.run_id,
        "stemma.data.md5": lineage.data_md5,
        "stemma.data.file_md5": lineage.file_md5,
        "stemma.checks.digest": lineage.validation_digest,
    }
    if lineage.weights_sha256:
        tags["stemma.weights.sha256"] = lineage.weights_sha256
    if lineage.git_rev:
        tags["stemma.git.rev"] = lineage.git_rev
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


def input_node_id(path: str, digest: str) -> str:
    """Id of a scored input (a file or folder of batches) by its content digest."""
    return f"input:{path}@{digest}"


def predictions_node_id(path: str, manifest_sha256: str) -> str:
    """Id of a prediction output: its folder and the sha256 of its `_SUCCESS` manifest."""
    return f"predictions:{path}@{manifest_sha256}"


def build_scoring_record(
    lineage: ScoringLineage, *, created: datetime | None = None
) -> dict[str, Any]:
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
        nodes.insert(
            0,
            Node(
                "data_version", data, f"md5:{lineage.data_md5}", {"pointer": lineage.data_pointer}
            ),
        )
        edges.insert(0, Edge(data, batch, "contains"))
    return {
        "schema": RECORD_SCHEMA,
        "pipeline": lineage.pipeline,
        "flow": "score",
        "created": (created or datetime.now(UTC)).isoformat(),
        "nodes": [asdict(node) for node in nodes],
        "edges": [asdict(edge) for edge in edges],
    }
