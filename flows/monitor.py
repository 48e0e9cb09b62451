"""The drift-monitoring flow: a production batch against the model's reference profile.

The batch is a file, a folder of files, or the online endpoint's prediction log
(``<endpoint.log.path>/predictions``: every day, the last ``days`` complete days, or one
day folder), whose labels may be the log's ``labels`` folder. The flow resolves the model
(the champion by default) and loads the reference profile saved with it at training time,
checks the batch's columns (and the labels', when given) before reading a row, streams the
batch through :class:`~stemma.components.monitoring.drift.DriftMonitor` (scoring it with
the model for prediction drift; a log's rows keep the score the endpoint logged when the
monitored version scored them), and writes the drift report as an MLflow
run of the pipeline's experiment named ``monitor <batch>``: the statistics as metrics (one
request), a table, a plot, the report JSON, the lineage record (a ``drift_report`` node
linked to the batch digest and the model version) and ``stemma.drift.*`` tags.

When the batch drifts over the spec's thresholds the flow emits the Prefect event
``stemma.drift.detected`` about the resource ``stemma.pipeline.<name>``, with the model
version as a related resource and the drifted features, their statistics, the report's run
id and the batch's digest in the payload: the continuous-training deployment triggers on it.
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from stemma.components.data.labels import labels_are_classes, read_labels
from stemma.components.data.prediction_log import NothingLoggedError
from stemma.components.evaluation.rows import known_labels
from stemma.components.monitoring import drift, records, steps
from stemma.components.monitoring import profile as reference_profile
from stemma.components.monitoring.report import json_safe
from stemma.components.platform import metric_names, tags, tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.refs import format_model_ref
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.scoring.inputs import check_input_schema
from stemma.components.spec import LoadedSpec, MonitorSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import (
    check_champion,
    flow_run_id,
    load_spec_step,
    relative,
    spec_architectures,
    step,
    tracked,
)

#: The alias monitored when neither the command line nor the spec names a model.
DEFAULT_ALIAS = "champion"


def _run_name() -> str:
    return f"monitor-{steps.batch_name(flow_run.parameters.get('batch'))}-" + (
        flow_run.scheduled_start_time.strftime("%Y%m%d-%H%M%S")
    )


@dataclass(frozen=True)
class Batch:
    """The batch and its labels, checked, with the model and profile they are compared with."""

    found: steps.BatchInput
    digest: str
    md5s: list[str]
    labels_path: Path | None
    labels_digest: str | None
    labels: Any
    model: ScoringModel
    profile: reference_profile.ReferenceProfile
    profile_sha256: str
    #: Labels that are no class of the model: counted (a metric), left out of the check.
    unknown_labels: int = 0

    @property
    def path(self) -> Path:
        return self.found.path

    @property
    def files(self) -> list[Path]:
        return self.found.files


@step(name="load model and profile")
def load_model_step(
    reference: str, loaded: LoadedSpec
) -> tuple[ScoringModel, reference_profile.ReferenceProfile, str]:
    check_champion(reference, loaded)
    model = load_scoring_model(reference, architectures=spec_architectures(loaded))
    profile, sha256 = reference_profile.load_model_profile(
        mlflow.MlflowClient(), model.name, model.version
    )
    return model, profile, sha256


@step(name="find batch")
def find_batch_step(path: Path, days: int | None) -> steps.BatchInput:
    return steps.find_batch(path, days)


@step(name="check batch")
def check_batch_step(
    found: steps.BatchInput, model: ScoringModel, id_column: str | None
) -> tuple[str, list[str]]:
    # Columns the model does not take (the log's scores, times and versions) are ignored.
    check_input_schema(found.files, model, id_column=id_column, extra_columns="ignore")
    return found.digest()


@step(name="read labels")
def read_labels_step(files: list[Path], loaded: LoadedSpec, model: ScoringModel) -> tuple:
    """The labels as the model's class codes (or values), and those of no class of the
    model: how many, and a sentence naming them."""
    data = loaded.spec.data
    frame = read_labels(
        files, data.id, data.target, missing="error", classes=labels_are_classes(data)
    )
    return known_labels(frame, model.preprocessor, column=data.target)


@step(name="compare with reference")
def compare_step(
    batch: Batch, settings: MonitorSpec, loaded: LoadedSpec
) -> tuple[drift.DriftReport, dict[str, int] | None]:
    """The report, and for a prediction log how many scores were logged or scored again."""
    labelled = batch.labels is not None
    wants_scores = settings.prediction_drift or (labelled and settings.performance_decay)
    scorer, columns = drift.scorer_for(batch.model, batch.files) if wants_scores else (None, [])
    report = drift.monitor_batch(
        batch.files,
        batch.profile,
        settings,
        scorer=scorer,
        score_columns=columns,
        labels=batch.labels,
        id_column=loaded.spec.data.id,
        metric=settings.metric or loaded.spec.gate.metric,
    )
    if not isinstance(scorer, drift.LoggedScores):
        return report, None
    get_run_logger().info(
        "scores: %d logged by v%s, %d scored again (logged by another version)",
        scorer.logged, batch.model.version, scorer.rescored,
    )  # fmt: skip
    return report, {"logged": scorer.logged, "rescored": scorer.rescored}


@step(name="emit drift event")
def emit_step(event: dict[str, Any]) -> str | None:
    from prefect.events import emit_event

    emitted = emit_event(**event)
    return str(emitted.id) if emitted is not None else None


def model_reference(loaded: LoadedSpec, settings: MonitorSpec, override: str | None) -> str:
    """The model to monitor: the command line's, the spec's, or the champion."""
    name = loaded.spec.pipeline.registered_model_name
    return override or settings.model or format_model_ref(name, alias=DEFAULT_ALIAS)


def _batch(
    loaded: LoadedSpec, settings: MonitorSpec, found: steps.BatchInput, labels_path: Path | None,
    model: str | None,
) -> Batch:  # fmt: skip
    """Load the model and profile, then check the batch and the labels before a row is read."""
    scoring_model, profile, profile_sha256 = load_model_step(
        model_reference(loaded, settings, model), loaded
    )
    digest, md5s = check_batch_step(
        found, scoring_model, loaded.spec.data.id if labels_path else None
    )
    labels = labels_digest = None
    unknown = 0
    if labels_path is not None:
        label_files = steps.find_labels(labels_path)
        labels_digest, _ = label_files.digest()
        labels, unknown, note = read_labels_step(label_files.files, loaded, scoring_model)
        if note:
            get_run_logger().warning("%s", note)
    return Batch(
        found, digest, md5s, labels_path, labels_digest, labels,
        scoring_model, profile, profile_sha256, unknown,
    )  # fmt: skip


def _run_tags(loaded: LoadedSpec, batch: Batch, report: Any, event_id: str | None) -> dict:
    # Paths, the labels, the model's URI and hashes and the drifted features are in the
    # run's lineage record; the tags are what a search filters on.
    return {
        tags.MODEL_VERSION: batch.model.version,
        tags.INPUT_DIGEST: batch.digest,
        **records.run_tags(report),
        **({tags.DRIFT_EVENT_ID: event_id} if event_id else {}),
    }


def _record(
    loaded: LoadedSpec,
    run: TrackedRun,
    batch: Batch,
    report: drift.DriftReport,
    settings: MonitorSpec,
    event_id: str | None,
) -> records.MonitorFacts:
    """Log the report (params, input, metrics, files) and its lineage; the lineage facts."""
    spec = loaded.spec
    run.log_params(steps.flat_params("monitor", settings.model_dump(mode="json")))
    tracking.log_dataset_reference(
        name=f"{spec.pipeline.name}-batch",
        source=steps.batch_source(loaded.root, batch.path, tracking.git_revision(loaded.root)[0]),
        context="monitoring",
        digest=batch.digest,
        columns=dict(batch.model.signature_columns),
    )
    numbers = report.metrics()
    if batch.labels_path is not None:
        numbers["unknown_labels"] = float(batch.unknown_labels)
    run.log_metrics(metric_names.in_section(metric_names.DRIFT, numbers))
    reference = batch.profile.source.get("data_md5", "?")[:12]
    title = f"{batch.found.name} vs {batch.model.label} (reference: training data {reference})"
    with tempfile.TemporaryDirectory(prefix="stemma-monitor-") as tmp:
        document = steps.write_report_files(report, Path(tmp) / "drift", title=title)
        artifacts = run.log_artifacts(Path(tmp) / "drift", "drift")
        mlflow.log_table(report.table(), records.TABLE_ARTIFACT)
    facts = records.MonitorFacts(
        pipeline=spec.pipeline.name,
        model_name=batch.model.name,
        model_version=batch.model.version,
        weights_sha256=batch.model.weights_sha256,
        profile_sha256=batch.profile_sha256,
        training_run_id=batch.model.run_id,
        batch_path=relative(batch.path, loaded.root),
        batch_digest=batch.digest,
        batch_files=dict(zip(batch.found.file_names(), batch.md5s, strict=True)),
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        report_sha256=hashlib.sha256(document).hexdigest(),
        labels_path=relative(batch.labels_path, loaded.root) if batch.labels_path else None,
        labels_digest=batch.labels_digest,
        event_id=event_id,
        artifacts=artifacts,
    )
    run.record_lineage(records.build_monitor_record(report, facts))
    return facts


def _emit(report: drift.DriftReport, facts: Any, run_id: str, event_id: str | None) -> str | None:
    """Emit the drift event once the report is complete, so whatever it triggers can read it."""
    event = records.drift_event(report, facts)
    if event is None:
        return None
    emitted = emit_step({**event, "id": uuid.UUID(event_id)})
    if emitted is None:
        get_run_logger().warning("drift detected, but no Prefect API took the event %s", event_id)
        mlflow.MlflowClient().set_tag(run_id, tags.DRIFT_EVENT_EMITTED, "false")
    return emitted


@flow(name="monitor", flow_run_name=_run_name, validate_parameters=True)
def monitor_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    batch: str | None = None,
    labels: str | None = None,
    model: str | None = None,
    days: int | None = None,
) -> dict[str, Any]:
    """Compare a production batch with the model's reference profile and report drift.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `monitor.thresholds.psi=0.1`.
        batch: file or folder to monitor, one batch (default: `monitor.input`, else
            `score.input`); or the endpoint's prediction log, `<endpoint.log.path>/predictions`
            (its day folders) or one of its day folders.
        labels: the batch's labels, joined by the id column (default: `monitor.labels`);
            adds label drift and performance decay. The log's `labels` folder works.
        model: `models:/<name>@<alias>` or `models:/<name>/<version>` (default:
            `monitor.model`, else the pipeline's champion).
        days: with the prediction log as the batch, only its last N complete days (UTC;
            default: every day in the log).

    Returns:
        A summary: whether drift was detected and where, the statistics per column, the
        report's MLflow run id and the id of the event emitted (None when none was). When
        the log holds nothing in the last `days` days, a Completed state that says so.
    """
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings = spec.monitor or MonitorSpec()
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    labels_text = labels or settings.labels
    try:
        found = find_batch_step(loaded.resolve(batch or settings.input or spec.score.input), days)
    except NothingLoggedError as error:
        return _nothing_logged(error)
    labels_path = loaded.resolve(labels_text) if labels_text else None
    checked = _batch(loaded, settings, found, labels_path, model)
    report, scores = compare_step(checked, settings, loaded)
    if checked.labels_path is not None and report.labelled_rows == 0:
        get_run_logger().warning(
            "no label in %s matched a row of the batch by %s", checked.labels_path, spec.data.id
        )
    event_id = str(uuid.uuid4()) if report.detected else None
    name = f"monitor {checked.found.name}"
    extra = _run_tags(loaded, checked, report, event_id)
    with tracked(loaded, "monitor", experiment_id, record_lineage, None, extra, name=name) as run:
        facts = _record(loaded, run, checked, report, settings, event_id)
    emitted = _emit(report, facts, run.run_id, event_id)
    for line in report.reasons():
        get_run_logger().info(line)
    return {
        "run_id": run.run_id,
        "experiment": spec.pipeline.experiment_name,
        "tracking_uri": redact_url(tracking_uri),
        "model_uri": checked.model.model_uri,
        "model_version": checked.model.version,
        "batch": str(checked.path),
        "batch_digest": checked.digest,
        "days": list(checked.found.days),
        "scores": scores,
        "labels": str(checked.labels_path) if checked.labels_path else None,
        "rows": report.rows,
        "labelled_rows": report.labelled_rows,
        "unknown_labels": checked.unknown_labels,
        "drift_detected": report.detected,
        "kinds": report.kinds,
        "drifted_features": report.drifted_features,
        "columns": steps.column_summary(report),
        "performance": json_safe(report.to_dict()["performance"]),
        "reasons": report.reasons(),
        "event_id": emitted,
        "summary": report.summary(),
    }


def _nothing_logged(error: NothingLoggedError) -> Any:
    """A run with no logged rows to monitor ends Completed, saying so where the Prefect UI
    shows its state: a scheduled monitor of an idle endpoint is not a failure."""
    message = f"nothing to do: {error.headline}"
    get_run_logger().info(message)
    return Completed(message=message, data={"outcome": "nothing_logged", "summary": message})
