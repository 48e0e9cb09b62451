"""The shadow flow: the challenger scores the champion's rows; the champion alone serves.

The champion's scores go where batch scoring writes them (``--output``, else
``score.output`` for ``score.input`` and ``<score.output>-<batch>`` for another batch); the
challenger's go to ``<that folder>-shadow`` beside it. Both are compared in one MLflow run
(agreement, score distances, latency, and once labels arrive the primary metric of each
with a paired-bootstrap interval of the difference, overall and per segment), which
records the decision (``promote``, ``reject``, ``wait``) with its reasons and a lineage
record. With ``evaluate.shadow.auto_promote`` a ``promote`` moves the champion alias by
compare-and-set against the champion that was shadowed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stemma.components.errors import SpecError
from stemma.components.evaluation import shadow
from stemma.components.platform import tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.registry.promotion import OUTCOME_DONE, PromotionError
from stemma.components.scoring import engine as scoring
from stemma.components.spec import EvaluateSpec, LoadedSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import config_run_name, load_model_step, load_spec_step, scoring_options

_run_name = config_run_name("shadow")


def evaluate_settings(loaded: LoadedSpec) -> tuple[EvaluateSpec, str]:
    """The spec's ``evaluate`` section (defaults when absent) and the id column.

    Raises:
        SpecError: the spec names no ``data.id``: rows are joined by id.
    """
    spec = loaded.spec
    if spec.data.id is None:
        raise SpecError(
            f"{loaded.path}: shadow and canary evaluation join rows by id, and data.id is not set",
            ["set data.id to the entity id column (application_id in the worked example)"],
        )
    return spec.evaluate or EvaluateSpec(), spec.data.id


def labels_location(
    loaded: LoadedSpec, settings: EvaluateSpec, labels: str | None
) -> tuple[Path | None, bool]:
    """Where the labels are and whether they must exist (named explicitly) or may lag."""
    if labels:
        return loaded.resolve(labels), True
    if settings.labels:
        return loaded.resolve(settings.labels), False
    return None, False


def read_labels(
    loaded: LoadedSpec, path: Path | None, required: bool
) -> tuple[Any, str | None, str]:
    """The labels (None when none have arrived), their digest, and a note on them.

    Raises:
        DataError: labels named explicitly are missing or malformed; labels from the spec
            are malformed.
    """
    spec = loaded.spec
    if path is None:
        return None, None, "no labels configured (evaluate.labels or --labels)"
    if not path.exists() and not required:
        return None, None, f"no labels at {path} yet"
    labels = shadow.load_labels(
        path, id_column=str(spec.data.id), target=spec.data.target, task=spec.data.task
    )
    digest, _ = scoring.input_digest(scoring.input_files(path))
    return labels, digest, f"{len(labels):,} labels from {path}"


@task(name="load labels")
def load_labels_step(loaded: LoadedSpec, path: Path | None, required: bool):
    return read_labels(loaded, path, required)


@task(name="score champion and challenger")
def score_pair_step(
    loaded: LoadedSpec,
    champion: scoring.ScoringModel,
    challenger: scoring.ScoringModel,
    files: list[Path],
    served_dir: Path,
) -> shadow.ScoredPair:
    # The flow has checked that data.id is set (evaluate_settings).
    return shadow.score_pair(champion, challenger, files, served_dir, **scoring_options(loaded))


@task(name="compare and decide")
def compare_step(
    loaded: LoadedSpec,
    settings: EvaluateSpec,
    pair: shadow.ScoredPair,
    champion: scoring.ScoringModel,
    challenger: scoring.ScoringModel,
    labels: Any,
    labels_required: bool,
    labels_source: str,
) -> tuple[Any, shadow.ShadowReport]:
    spec = loaded.spec
    id_column = str(spec.data.id)
    segments = [column for column in settings.shadow.segments if column != id_column]
    batch = shadow.read_batch_columns(pair.files, [id_column, *segments])
    rows = shadow.build_shadow_rows(
        batch,
        shadow.read_scores(pair.served, id_column),
        shadow.read_scores(pair.shadow, id_column),
        id_column=id_column,
        labels=labels,
        labels_required=labels_required,
        labels_source=labels_source,
    )
    # Per-request latency of each model, and the batch scoring's own throughput when this
    # run scored (a folder already complete was not timed).
    latency = shadow.measure_latency({"champion": champion, "challenger": challenger}, pair.files)
    for name, result in (("champion", pair.served), ("challenger", pair.shadow)):
        if not result.already_complete:
            latency.setdefault(name, {})["rows_per_second"] = result.rows_per_second
    report = shadow.shadow_evaluate(
        rows,
        task=spec.data.task,
        metric=spec.gate.metric,
        settings=settings,
        champion=champion,
        challenger=challenger,
        latency=latency,
    )
    return rows, report


@task(name="promote")
def promote_step(report: shadow.ShadowReport, model_name: str, run_id: str, experiment_id: str):
    return shadow.promote_challenger(
        mlflow.MlflowClient(),
        report,
        model_name=model_name,
        run_id=run_id,
        flow_run_id=str(flow_run.get_id() or "") or None,
        experiment_id=experiment_id,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@flow(name="shadow", flow_run_name=_run_name, validate_parameters=True)
def shadow_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    challenger: str | None = None,
    batch: str | None = None,
    labels: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Shadow-evaluate a challenger against the champion on a production batch.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `evaluate.shadow.min_labelled_rows=500`.
        challenger: `models:/<name>@<alias>` or `models:/<name>/<version>` (default: the
            pipeline's model @challenger).
        batch: file or folder of production rows (default: `score.input`).
        labels: labels of those rows, a file or folder joined by `data.id` (default:
            `evaluate.labels`; labels named here must exist and match the batch's ids).
        output: where the champion's (served) scores go (default: `score.output` for
            `score.input`, else `<score.output>-<batch name>`); the challenger's go to
            `<output>-shadow`.

    Returns:
        The decision (`promote`, `reject`, `wait`), its reasons, the numbers, the MLflow
        run and, when the champion moved, the promotion record.
    """
    logger = get_run_logger()
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings, _ = evaluate_settings(loaded)
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    model_name = spec.pipeline.registered_model_name

    # Everything that can be checked is checked before a row is scored.
    champion = load_model_step(f"models:/{model_name}@champion", loaded)
    challenger_model = load_model_step(challenger or f"models:/{model_name}@challenger", loaded)
    batch_path = loaded.resolve(batch or spec.score.input)
    files = scoring.input_files(batch_path)
    served_dir = (
        loaded.resolve(output)
        if output
        else shadow.default_served_output(
            loaded.resolve(spec.score.output), loaded.resolve(spec.score.input), batch_path
        )
    )
    labels_path, labels_required = labels_location(loaded, settings, labels)
    label_frame, labels_digest, labels_note = load_labels_step(loaded, labels_path, labels_required)
    logger.info("%s", labels_note)

    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=flow_run.get_name(),
        nested=mlflow.active_run() is not None,
    )
    record = None
    promotion_error: PromotionError | None = None
    try:
        mlflow.set_tags(
            {
                "stemma.pipeline": spec.pipeline.name,
                "stemma.flow": "shadow",
                "stemma.prefect.flow_run_id": str(flow_run.get_id() or ""),
                "stemma.model.champion": champion.version,
                "stemma.model.challenger": challenger_model.version,
                "stemma.status": "running",
            }
        )
        tracking.log_params_flat(
            {
                **{
                    f"evaluate.{key}": json.dumps(value)
                    for key, value in settings.model_dump(mode="json").items()
                },
                "shadow.champion": champion.model_uri,
                "shadow.challenger": challenger_model.model_uri,
                "shadow.batch": _relative(batch_path, loaded.root),
                "shadow.labels": _relative(labels_path, loaded.root) if labels_path else "",
                "shadow.metric": spec.gate.metric,
            }
        )
        pair = score_pair_step(loaded, champion, challenger_model, files, served_dir)
        rows, report = compare_step(
            loaded,
            settings,
            pair,
            champion,
            challenger_model,
            label_frame,
            labels_required,
            str(labels_path),
        )
        tracking.log_metrics_batch(report.metrics())
        mlflow.log_dict(report.to_dict(), "shadow/report.json")
        with tempfile.TemporaryDirectory(prefix="stemma-shadow-") as tmp:
            for plot in shadow.plot_shadow(rows, report, Path(tmp)):
                mlflow.log_artifact(str(plot), "shadow")
        if report.decision == shadow.PROMOTE and settings.shadow.auto_promote:
            try:
                record = promote_step(report, model_name, run.info.run_id, experiment_id)
            except PromotionError as error:
                promotion_error = error
                record = error.record
        facts = shadow.ShadowLineage(
            pipeline=spec.pipeline.name,
            model_name=model_name,
            champion_version=champion.version,
            champion_weights=champion.weights_sha256,
            challenger_version=challenger_model.version,
            challenger_weights=challenger_model.weights_sha256,
            input_path=_relative(batch_path, loaded.root),
            input_digest=pair.served.manifest["input"]["digest"],
            input_files={
                item["name"]: item["md5"] for item in pair.served.manifest["input"]["files"]
            },
            served_path=_relative(pair.served.output_dir, loaded.root),
            served_sha256=pair.served.output_digest,
            shadow_path=_relative(pair.shadow.output_dir, loaded.root),
            shadow_sha256=pair.shadow.output_digest,
            labels_path=_relative(labels_path, loaded.root)
            if labels_digest and labels_path
            else None,
            labels_digest=labels_digest,
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            flow_run_id=str(flow_run.get_id() or "") or None,
            decision=report.decision,
            reasons=list(report.reasons),
            promotion_run_id=record.record_run_id if record is not None else None,
            promotion_outcome=record.outcome if record is not None else None,
        )
        record_lineage(shadow.build_shadow_record(facts, report))
        mlflow.set_tags(
            {
                "stemma.shadow.decision": report.decision,
                "stemma.shadow.reasons": " | ".join(report.reasons)[: tracking.MAX_ERROR_TAG_CHARS],
                "stemma.input.digest": facts.input_digest,
                "stemma.output.sha256": facts.served_sha256,
                "stemma.shadow.output.sha256": facts.shadow_sha256,
                "stemma.status": "completed",
                **({"stemma.promotion.outcome": record.outcome} if record is not None else {}),
            }
        )
        client = mlflow.MlflowClient()
        client.set_model_version_tag(
            model_name, challenger_model.version, shadow.SHADOW_DECISION_TAG, report.decision
        )
        client.set_model_version_tag(
            model_name, challenger_model.version, shadow.SHADOW_RUN_TAG, run.info.run_id
        )
    except BaseException as error:
        tracking.end_run_after(error)
        raise
    mlflow.end_run(status="FINISHED")
    if promotion_error is not None:
        raise promotion_error
    return {
        "run_id": run.info.run_id,
        "tracking_uri": redact_url(tracking_uri),
        "model_name": model_name,
        "champion_version": champion.version,
        "challenger_version": challenger_model.version,
        "decision": report.decision,
        "reasons": list(report.reasons),
        "metric": report.metric,
        "comparison": None if report.comparison is None else report.comparison.to_dict(),
        "labelled_rows": report.labelled_rows,
        "compared_rows": report.compared_rows,
        "agreement": report.agreement,
        "distances": dict(report.distances),
        "challenger_error_rate": report.challenger_failures.error_rate,
        "segments": [segment.to_dict() for segment in report.segments],
        "served_output": str(pair.served.output_dir),
        "shadow_output": str(pair.shadow.output_dir),
        "labels": labels_note,
        "promoted": record is not None and record.outcome == OUTCOME_DONE,
        "promotion": None if record is None else json.loads(record.to_json()),
    }
