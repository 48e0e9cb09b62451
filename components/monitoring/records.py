"""What a monitoring run publishes: the drift event, its lineage record and its run tags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from stemma.components.monitoring.report import DriftReport, json_safe
from stemma.components.platform import tags
from stemma.components.platform.deployments import pipeline_resource_id
from stemma.components.platform.lineage import (
    Edge,
    LineageRecord,
    Node,
    created_stamp,
    input_node_id,
    model_node_id,
    run_node,
    run_node_id,
)

#: Name of the Prefect event emitted when a batch drifts over the thresholds.
DRIFT_EVENT = tags.DRIFT_DETECTED
#: Where the report's files go among the run's artifacts.
REPORT_ARTIFACT = "drift/report.json"
TABLE_ARTIFACT = "drift/statistics.json"


@dataclass(frozen=True)
class MonitorFacts:
    """What a monitoring run read and wrote, for its event and lineage record."""

    pipeline: str
    model_name: str
    model_version: str
    weights_sha256: str
    profile_sha256: str
    training_run_id: str | None
    batch_path: str
    batch_digest: str
    batch_files: dict[str, str]
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    report_sha256: str
    labels_path: str | None = None
    labels_digest: str | None = None
    event_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def model_uri(self) -> str:
        return model_node_id(self.model_name, self.model_version)


def drift_event(report: DriftReport, facts: MonitorFacts) -> dict[str, Any] | None:
    """The ``stemma.drift.detected`` event for ``prefect.events.emit_event(**event)``.

    Returns None when the batch did not drift over the thresholds: no event then.
    """
    if not report.detected:
        return None
    drifted = {
        column.name: json_safe(dict(column.statistics))
        for column in report.features
        if column.drifted
    }
    payload: dict[str, Any] = {
        "pipeline": facts.pipeline,
        "model": facts.model_uri,
        "model_name": facts.model_name,
        "model_version": facts.model_version,
        "report_run_id": facts.run_id,
        "batch": facts.batch_path,
        "batch_digest": facts.batch_digest,
        "labels": facts.labels_path,
        "rows": report.rows,
        "kinds": report.kinds,
        "drifted_features": report.drifted_features,
        "statistics": drifted,
        **{
            role: json_safe({"drifted": column.drifted, **column.statistics}) if column else None
            for role, column in (
                ("prediction", report.prediction),
                ("predicted_class", report.predicted_class),
                ("label", report.label),
            )
        },
        "performance": json_safe(asdict(report.performance)) if report.performance else None,
        "reasons": report.reasons(),
    }
    return {
        "event": DRIFT_EVENT,
        "resource": {
            "prefect.resource.id": pipeline_resource_id(facts.pipeline),
            "prefect.resource.name": facts.pipeline,
            tags.PIPELINE: facts.pipeline,
        },
        "related": [
            {
                "prefect.resource.id": (
                    f"stemma.model-version.{facts.model_name}.{facts.model_version}"
                ),
                "prefect.resource.role": "model-version",
                "prefect.resource.name": f"{facts.model_name} v{facts.model_version}",
                tags.MODEL_URI: facts.model_uri,
            },
            {
                "prefect.resource.id": f"stemma.drift-report.{facts.run_id}",
                "prefect.resource.role": "drift-report",
                "mlflow.run_id": facts.run_id,
            },
        ],
        "payload": payload,
    }


def build_monitor_record(report: DriftReport, facts: MonitorFacts) -> LineageRecord:
    """The lineage record of a monitoring run (``lineage/record.json``).

    The batch (by its digest), the labels, the model version and its reference profile
    go into the run, which produces the drift report; the batch and the model version are
    ``monitored_in`` the report (the edge the retraining record draws from a batch to the
    report that caused it). Only the report is reachable from the run's node, so the
    lineage index counts it as the one thing the run made.
    """
    batch = input_node_id(facts.batch_path, facts.batch_digest)
    model = model_node_id(facts.model_name, facts.model_version)
    reference = f"reference-profile:{facts.profile_sha256}"
    run = run_node(facts.run_id, facts.experiment_id, facts.flow_run_id)
    drift_report = f"drift-report:{facts.run_id}"
    batch_attributes = {"path": facts.batch_path, "files": dict(facts.batch_files), "role": "batch"}
    nodes = [
        Node("input", batch, f"md5:{facts.batch_digest}", batch_attributes),
        Node("model_version", model, f"sha256:{facts.weights_sha256}", {}),
        Node(
            "reference_profile",
            reference,
            f"sha256:{facts.profile_sha256}",
            {"training_run_id": facts.training_run_id},
        ),
        run,
        Node(
            "drift_report",
            drift_report,
            f"sha256:{facts.report_sha256}",
            _report_facts(report, facts),
        ),
    ]
    edges = [
        Edge(model, reference, "profiled_by"),
        Edge(batch, run.id, "input_of"),
        Edge(model, run.id, "monitored_with"),
        Edge(reference, run.id, "reference_of"),
        Edge(run.id, drift_report, "produced"),
        Edge(batch, drift_report, "monitored_in"),
        Edge(model, drift_report, "monitored_in"),
    ]
    if facts.labels_path and facts.labels_digest:
        labels = input_node_id(facts.labels_path, facts.labels_digest)
        labels_attributes = {"path": facts.labels_path, "role": "labels"}
        nodes.insert(1, Node("input", labels, f"md5:{facts.labels_digest}", labels_attributes))
        edges.insert(2, Edge(labels, run.id, "input_of"))
    if facts.training_run_id:
        training = run_node_id(facts.training_run_id)
        nodes.append(Node("run", training, None, {"flow": "train"}))
        edges.insert(0, Edge(training, reference, "produced"))
    return LineageRecord(
        flow="monitor",
        pipeline=facts.pipeline,
        nodes=nodes,
        edges=edges,
        created=created_stamp(),
        artifacts={path: f"sha256:{digest}" for path, digest in facts.artifacts.items()},
    )


def _report_facts(report: DriftReport, facts: MonitorFacts) -> dict[str, Any]:
    return {
        "detected": report.detected,
        "kinds": report.kinds,
        "drifted_features": report.drifted_features,
        "summary": report.summary(),
        "artifact": REPORT_ARTIFACT,
        "event_id": facts.event_id,
    }


def run_tags(report: DriftReport) -> dict[str, str]:
    """``stemma.drift.*`` tags of the report's MLflow run: whether it drifted (the drifted
    features, kinds and summary are the ``drift_report`` node's attributes in the record)."""
    return {tags.DRIFT_DETECTED: str(report.detected).lower()}
