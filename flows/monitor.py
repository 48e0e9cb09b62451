"""The drift-monitoring flow: a production batch against the model's reference profile.

The flow resolves the model (the champion by default) and loads the reference profile saved
with it at training time, checks the batch's columns (and the labels', when given) before
reading a row, streams the batch through :class:`~stemma.components.monitoring.drift.DriftMonitor`
(scoring it with the model for prediction drift), and writes the drift report as an MLflow
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
import json
import tempfile
import uuid
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stemma.components.data.tables import resolve_data_version
from stemma.components.errors import DataError, DataVersionError
from stemma.components.lineage import records as lineage
from stemma.components.monitoring import drift
from stemma.components.monitoring import profile as reference_profile
from stemma.components.platform import tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.scoring import engine as scoring
from stemma.components.spec import LoadedSpec, MonitorSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import load_spec_step, spec_architectures

#: The alias monitored when neither the command line nor the spec names a model.
DEFAULT_ALIAS = "champion"


def _batch_name(batch: str | None) -> str:
    if not batch:
        return "batch"
    path = Path(batch)
    return path.stem if path.suffix else path.name


def _run_name() -> str:
    return f"monitor-{_batch_name(flow_run.parameters.get('batch'))}-" + (
        flow_run.scheduled_start_time.strftime("%Y%m%d-%H%M%S")
    )


@task(name="load model and profile")
def load_model_step(
    reference: str, loaded: LoadedSpec
) -> tuple[scoring.ScoringModel, reference_profile.ReferenceProfile, str]:
    model = scoring.load_scoring_model(reference, architectures=spec_architectures(loaded))
    profile, sha256 = reference_profile.load_model_profile(
        mlflow.MlflowClient(), model.name, model.version
    )
    return model, profile, sha256


@task(name="check batch")
def check_batch_step(
    files: list[Path], model: scoring.ScoringModel, id_column: str | None
) -> tuple[str, list[str]]:
    scoring.check_input_schema(files, model, id_column=id_column, extra_columns="ignore")
    return scoring.input_digest(files)


@task(name="read labels")
def read_labels_step(files: list[Path], loaded: LoadedSpec) -> Any:
    return drift.read_labels(files, id_column=loaded.spec.data.id, target=loaded.spec.data.target)


@task(name="compare with reference")
def compare_step(
    files: list[Path],
    profile: reference_profile.ReferenceProfile,
    settings: MonitorSpec,
    model: scoring.ScoringModel,
    labels: Any,
    loaded: LoadedSpec,
) -> drift.DriftReport:
    labelled = labels is not None
    wants_scores = settings.prediction_drift or (labelled and settings.performance_decay)
    return drift.monitor_batch(
        files,
        profile,
        settings,
        scorer=drift.make_scorer(model) if wants_scores else None,
        score_columns=model.feature_columns if wants_scores else (),
        labels=labels,
        id_column=loaded.spec.data.id,
        metric=settings.metric or loaded.spec.gate.metric,
    )


@task(name="emit drift event")
def emit_step(event: dict[str, Any]) -> str | None:
    from prefect.events import emit_event

    emitted = emit_event(**event)
    return str(emitted.id) if emitted is not None else None


def model_reference(loaded: LoadedSpec, settings: MonitorSpec, override: str | None) -> str:
    """The model to monitor: the command line's, the spec's, or the champion."""
    return (
        override
        or settings.model
        or f"models:/{loaded.spec.pipeline.registered_model_name}@{DEFAULT_ALIAS}"
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _batch_source(loaded: LoadedSpec, path: Path, git_rev: str | None) -> Any:
    """A DVC source when DVC versions the batch (and the bytes match), else the local path."""
    try:
        version = resolve_data_version(loaded.root, path)
    except DataVersionError:
        return str(path)
    return tracking.DVCDatasetSource.from_version(version, loaded.root, git_rev)


def _flat(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}", item))
        return out
    return {prefix: json.dumps(value) if not isinstance(value, str) else value}


@flow(name="monitor", flow_run_name=_run_name, validate_parameters=True)
def monitor_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    batch: str | None = None,
    labels: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Compare a production batch with the model's reference profile and report drift.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `monitor.thresholds.psi=0.1`.
        batch: file or folder to monitor, one batch (default: `monitor.input`, else
            `score.input`).
        labels: the batch's labels, joined by the id column (default: `monitor.labels`);
            adds label drift and performance decay.
        model: `models:/<name>@<alias>` or `models:/<name>/<version>` (default:
            `monitor.model`, else the pipeline's champion).

    Returns:
        A summary: whether drift was detected and where, the statistics per column, the
        report's MLflow run id and the id of the event emitted (None when none was).
    """
    logger = get_run_logger()
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings = spec.monitor or MonitorSpec()
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    batch_path = loaded.resolve(batch or settings.input or spec.score.input)
    labels_text = labels or settings.labels
    labels_path = loaded.resolve(labels_text) if labels_text else None

    scoring_model, profile, profile_sha256 = load_model_step(
        model_reference(loaded, settings, model), loaded
    )
    files = scoring.input_files(batch_path)
    batch_digest, batch_md5s = check_batch_step(
        files, scoring_model, spec.data.id if labels_path else None
    )
    label_files: list[Path] = []
    label_values = None
    labels_digest = None
    if labels_path is not None:
        try:
            label_files = scoring.input_files(labels_path)
        except DataError as error:
            raise DataError(f"labels: {error.headline}", error.details) from None
        labels_digest, _ = scoring.input_digest(label_files)
        label_values = read_labels_step(label_files, loaded)
    git_rev, _ = tracking.git_revision(loaded.root)

    report = compare_step(files, profile, settings, scoring_model, label_values, loaded)
    if labels_path is not None and report.labelled_rows == 0:
        logger.warning("no label in %s matched a row of the batch by %s", labels_path, spec.data.id)

    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=f"monitor {_batch_name(str(batch_path))}"
    )
    run_id = run.info.run_id
    event_id = str(uuid.uuid4()) if report.detected else None
    try:
        mlflow.set_tags(
            {
                "stemma.pipeline": spec.pipeline.name,
                "stemma.flow": "monitor",
                "stemma.prefect.flow_run_id": str(flow_run.get_id() or ""),
                "stemma.model.uri": scoring_model.model_uri,
                "stemma.model.version": scoring_model.version,
                "stemma.model.reference": scoring_model.reference,
                "stemma.weights.sha256": scoring_model.weights_sha256,
                "stemma.profile.sha256": profile_sha256,
                "stemma.input.path": _relative(batch_path, loaded.root),
                "stemma.input.digest": batch_digest,
                "stemma.status": "running",
                **(
                    {
                        "stemma.labels.path": _relative(labels_path, loaded.root),
                        "stemma.labels.digest": str(labels_digest),
                    }
                    if labels_path is not None
                    else {}
                ),
                **drift.run_tags(report),
                **({"stemma.drift.event_id": event_id} if event_id else {}),
            }
        )
        tracking.log_params_flat(_flat("monitor", settings.model_dump(mode="json")))
        tracking.log_dataset_reference(
            name=f"{spec.pipeline.name}-batch",
            source=_batch_source(loaded, batch_path, git_rev),
            context="monitoring",
            digest=batch_digest,
            columns=dict(scoring_model.signature_columns),
        )
        tracking.log_metrics_batch(report.metrics())
        with tempfile.TemporaryDirectory(prefix="stemma-monitor-") as tmp:
            folder = Path(tmp) / "drift"
            folder.mkdir()
            document = json.dumps(report.to_dict(), indent=2, sort_keys=True).encode("utf-8")
            (folder / "report.json").write_bytes(document)
            report.table().to_csv(folder / "statistics.csv", index=False)
            drift.plot_drift_report(
                report,
                folder / "summary.png",
                title=(
                    f"{_batch_name(str(batch_path))} vs {scoring_model.label} "
                    f"(reference: training data {profile.source.get('data_md5', '?')[:12]})"
                ),
            )
            mlflow.log_artifacts(str(folder), "drift")
            mlflow.log_table(report.table(), drift.TABLE_ARTIFACT)
            artifacts = lineage.artifact_digests(folder, "drift")
        facts = drift.MonitorFacts(
            pipeline=spec.pipeline.name,
            model_name=scoring_model.name,
            model_version=scoring_model.version,
            weights_sha256=scoring_model.weights_sha256,
            profile_sha256=profile_sha256,
            training_run_id=scoring_model.run_id,
            batch_path=_relative(batch_path, loaded.root),
            batch_digest=batch_digest,
            batch_files={path.name: md5 for path, md5 in zip(files, batch_md5s, strict=True)},
            run_id=run_id,
            experiment_id=run.info.experiment_id,
            flow_run_id=str(flow_run.get_id() or "") or None,
            report_sha256=hashlib.sha256(document).hexdigest(),
            labels_path=_relative(labels_path, loaded.root) if labels_path else None,
            labels_digest=labels_digest,
            event_id=event_id,
            artifacts=artifacts,
        )
        record_lineage(drift.build_monitor_record(report, facts))
        mlflow.set_tag("stemma.status", "completed")
    except BaseException as error:
        tracking.end_run_after(error)
        raise
    mlflow.end_run(status="FINISHED")

    # The event goes out once the report is complete, so whatever it triggers can read it.
    emitted = None
    event = drift.drift_event(report, facts)
    if event is not None:
        emitted = emit_step({**event, "id": uuid.UUID(event_id)})
        if emitted is None:
            logger.warning("drift detected, but no Prefect API took the event %s", event_id)
            mlflow.MlflowClient().set_tag(run_id, "stemma.drift.event_emitted", "false")
    for line in report.reasons():
        logger.info(line)
    return {
        "run_id": run_id,
        "experiment": spec.pipeline.experiment_name,
        "tracking_uri": redact_url(tracking_uri),
        "model_uri": scoring_model.model_uri,
        "model_version": scoring_model.version,
        "batch": str(batch_path),
        "batch_digest": batch_digest,
        "labels": str(labels_path) if labels_path else None,
        "rows": report.rows,
        "labelled_rows": report.labelled_rows,
        "drift_detected": report.detected,
        "kinds": report.kinds,
        "drifted_features": report.drifted_features,
        "columns": {
            column.name if column.role == drift.FEATURE else column.role: {
                "role": column.role,
                "drifted": column.drifted,
                "breaches": list(column.breaches),
                **drift.json_safe(dict(column.statistics)),
            }
            for column in report.columns
        },
        "performance": drift.json_safe(report.to_dict()["performance"]),
        "reasons": report.reasons(),
        "event_id": emitted,
        "summary": report.summary(),
    }
