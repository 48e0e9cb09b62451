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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger

from stemma.components.data import prediction_log
from stemma.components.errors import SpecError
from stemma.components.evaluation import live, log_rows, shadow
from stemma.components.evaluation import steps as evaluation
from stemma.components.platform import metric_names, tags, tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.refs import format_model_ref
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.registry.promotion import OUTCOME_DONE, PromotionError
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.inputs import input_files
from stemma.components.spec import EvaluateSpec, LoadedSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import (
    config_run_name,
    flow_run_id,
    load_model_step,
    load_spec_step,
    relative,
    scoring_options,
    step,
    tracked,
)

_run_name = config_run_name("shadow")

# Kept importable from here: the canary flow and older callers use them.
evaluate_settings = evaluation.evaluate_settings
labels_location = evaluation.labels_location
read_labels = evaluation.read_labels


@dataclass(frozen=True)
class Inputs:
    """Everything checked before a row is scored."""

    champion: ScoringModel
    challenger: ScoringModel
    batch_path: Path
    files: list[Path]
    served_dir: Path
    labels_path: Path | None
    labels_required: bool
    labels: Any
    labels_digest: str | None
    labels_note: str


@step(name="load labels")
def load_labels_step(loaded: LoadedSpec, path: Path | None, required: bool):
    return evaluation.read_labels(loaded, path, required)


@step(name="score champion and challenger")
def score_pair_step(loaded: LoadedSpec, inputs: Inputs) -> shadow.ScoredPair:
    # The flow has checked that data.id is set (evaluate_settings).
    return shadow.score_pair(
        inputs.champion,
        inputs.challenger,
        inputs.files,
        inputs.served_dir,
        **scoring_options(loaded),
    )


@step(name="compare and decide")
def compare_step(
    loaded: LoadedSpec, settings: EvaluateSpec, pair: shadow.ScoredPair, inputs: Inputs
) -> tuple[Any, shadow.ShadowReport]:
    return evaluation.compare_shadow(
        loaded,
        settings,
        pair,
        (inputs.champion, inputs.challenger),
        inputs.labels,
        inputs.labels_required,
        str(inputs.labels_path),
    )


@step(name="promote")
def promote_step(report: shadow.ShadowReport, model_name: str, run_id: str, experiment_id: str):
    return shadow.promote_challenger(
        mlflow.MlflowClient(),
        report,
        model_name=model_name,
        run_id=run_id,
        flow_run_id=flow_run_id(),
        experiment_id=experiment_id,
    )


def _inputs(loaded: LoadedSpec, settings: EvaluateSpec, references: tuple, paths: tuple) -> Inputs:
    """Load both models and the labels and find the batch: everything a check can find."""
    spec = loaded.spec
    model_name = spec.pipeline.registered_model_name
    challenger, batch, labels, output = (*references, *paths)
    champion = load_model_step(format_model_ref(model_name, alias="champion"), loaded)
    challenger_ref = challenger or format_model_ref(model_name, alias="challenger")
    challenger_model = load_model_step(challenger_ref, loaded)
    batch_path = loaded.resolve(batch or spec.score.input)
    files = input_files(batch_path)
    score = spec.score
    served_dir = (
        loaded.resolve(output)
        if output
        else shadow.default_served_output(
            loaded.resolve(score.output), loaded.resolve(score.input), batch_path
        )
    )
    labels_path, required = evaluation.labels_location(loaded, settings, labels)
    label_frame, digest, note = load_labels_step(loaded, labels_path, required)
    get_run_logger().info("%s", note)
    return Inputs(
        champion, challenger_model, batch_path, files, served_dir, labels_path, required,
        label_frame, digest, note,
    )  # fmt: skip


def _params(loaded: LoadedSpec, settings: EvaluateSpec, inputs: Inputs) -> dict[str, str]:
    root = loaded.root
    return {
        **{
            f"evaluate.{key}": json.dumps(value)
            for key, value in settings.model_dump(mode="json").items()
        },
        "shadow.champion": inputs.champion.model_uri,
        "shadow.challenger": inputs.challenger.model_uri,
        "shadow.batch": relative(inputs.batch_path, root),
        "shadow.labels": relative(inputs.labels_path, root) if inputs.labels_path else "",
        "shadow.metric": loaded.spec.gate.metric,
    }


def _facts(
    loaded: LoadedSpec, run: TrackedRun, inputs: Inputs, pair: Any, report: Any, record: Any
) -> shadow.ShadowLineage:
    root = loaded.root
    labelled = inputs.labels_digest and inputs.labels_path
    return shadow.ShadowLineage(
        pipeline=loaded.spec.pipeline.name,
        model_name=loaded.spec.pipeline.registered_model_name,
        champion_version=inputs.champion.version,
        champion_weights=inputs.champion.weights_sha256,
        challenger_version=inputs.challenger.version,
        challenger_weights=inputs.challenger.weights_sha256,
        input_path=relative(inputs.batch_path, root),
        input_digest=pair.served.manifest["input"]["digest"],
        input_files={item["name"]: item["md5"] for item in pair.served.manifest["input"]["files"]},
        served_path=relative(pair.served.output_dir, root),
        served_sha256=pair.served.output_digest,
        shadow_path=relative(pair.shadow.output_dir, root),
        shadow_sha256=pair.shadow.output_digest,
        labels_path=relative(inputs.labels_path, root) if labelled else None,
        labels_digest=inputs.labels_digest,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        decision=report.decision,
        reasons=list(report.reasons),
        promotion_run_id=record.record_run_id if record is not None else None,
        promotion_outcome=record.outcome if record is not None else None,
    )


def _report_and_promote(
    loaded: LoadedSpec, settings: EvaluateSpec, run: TrackedRun, joined: Any, report: Any
) -> tuple:
    """Log the report, its numbers and plots in ``run``; promote when the decision and
    ``evaluate.shadow.auto_promote`` say so. Returns the promotion record and its refusal."""
    model_name = loaded.spec.pipeline.registered_model_name
    run.log_metrics(metric_names.in_section(metric_names.SHADOW, report.metrics()))
    run.log_dict(report.to_dict(), "shadow/report.json")
    with tempfile.TemporaryDirectory(prefix="stemma-shadow-") as tmp:
        shadow.plot_shadow(joined, report, Path(tmp))
        run.log_artifacts(Path(tmp), "shadow")
    record = failed = None
    if report.decision == shadow.PROMOTE and settings.shadow.auto_promote:
        try:
            record = promote_step(report, model_name, run.run_id, run.experiment_id)
        except PromotionError as error:
            failed, record = error, error.record
    return record, failed


def _compare(loaded: LoadedSpec, settings: EvaluateSpec, inputs: Inputs, run: TrackedRun) -> tuple:
    """Score, compare, decide (and promote when allowed), and record it all in ``run``."""
    run.log_params(_params(loaded, settings, inputs))
    pair = score_pair_step(loaded, inputs)
    joined, report = compare_step(loaded, settings, pair, inputs)
    record, failed = _report_and_promote(loaded, settings, run, joined, report)
    facts = _facts(loaded, run, inputs, pair, report, record)
    run.record_lineage(shadow.build_shadow_record(facts, report))
    run.set_tags(
        {
            # The reasons, the shadow output's hash and the promotion (a child run) are in
            # the run's lineage record.
            tags.SHADOW_DECISION: report.decision,
            tags.INPUT_DIGEST: facts.input_digest,
            tags.OUTPUT_SHA256: facts.served_sha256,
        }
    )
    # The challenger is found by the run's tags (model.challenger, shadow.decision); its
    # version no longer carries the verdict.
    return pair, report, record, failed


# ---------------------------------------------------------------------------------------
# Judged from the online endpoint's prediction log


@step(name="load log labels")
def log_labels_step(loaded: LoadedSpec, log: log_rows.LogFolder, labels: str | None):
    return evaluation.read_log_labels(loaded, log, labels)


@step(name="pair the log's shadow scores and decide")
def compare_log_step(
    loaded: LoadedSpec, settings: EvaluateSpec, log: log_rows.LogFolder, models: tuple, labels: Any
) -> tuple:
    return evaluation.compare_log_shadow(loaded, settings, log, models, labels)


def _log_facts(
    loaded: LoadedSpec, run: TrackedRun, models: tuple, days: list, labels: tuple, report: Any
) -> live.LogShadowLineage:
    champion, challenger = models
    root = loaded.root
    _, labels_digest, labels_path = labels
    return live.LogShadowLineage(
        pipeline=loaded.spec.pipeline.name,
        model_name=loaded.spec.pipeline.registered_model_name,
        champion_version=champion.version,
        champion_weights=champion.weights_sha256,
        challenger_version=challenger.version,
        challenger_weights=challenger.weights_sha256,
        days=[(relative(day.path, root), day.digest, dict(day.files)) for day in days],
        labels_path=relative(labels_path, root) if labels_digest and labels_path else None,
        labels_digest=labels_digest,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        decision=report.decision,
        reasons=list(report.reasons),
    )


def _shadow_from_log(
    loaded: LoadedSpec, settings: EvaluateSpec, parameters: tuple, experiment_id: str
) -> dict[str, Any]:
    """The shadow judged from the endpoint's log, recorded as one run; its summary."""
    challenger, labels, log_argument = parameters
    model_name = loaded.spec.pipeline.registered_model_name
    log = evaluation.open_prediction_log(loaded, log_argument)
    champion = load_model_step(format_model_ref(model_name, alias="champion"), loaded)
    challenger_ref = challenger or format_model_ref(model_name, alias="challenger")
    models = (champion, load_model_step(challenger_ref, loaded))
    frame, labels_digest, labels_path, note = log_labels_step(loaded, log, labels)
    get_run_logger().info("%s", note)
    extra = {tags.MODEL_CHAMPION: champion.version, tags.MODEL_CHALLENGER: models[1].version}
    with tracked(loaded, "shadow", experiment_id, record_lineage, None, extra) as run:
        run.log_params(
            {
                **{
                    f"evaluate.{key}": json.dumps(value)
                    for key, value in settings.model_dump(mode="json").items()
                },
                "shadow.champion": champion.model_uri,
                "shadow.challenger": models[1].model_uri,
                "shadow.log": relative(Path(log.describe()), loaded.root),
                "shadow.labels": relative(labels_path, loaded.root) if labels_path else "",
                "shadow.metric": loaded.spec.gate.metric,
            }
        )
        joined, report, days = compare_log_step(loaded, settings, log, models, frame)
        record, failed = _report_and_promote(loaded, settings, run, joined, report)
        facts = _log_facts(loaded, run, models, days, (frame, labels_digest, labels_path), report)
        facts = replace(
            facts,
            promotion_run_id=record.record_run_id if record is not None else None,
            promotion_outcome=record.outcome if record is not None else None,
        )
        run.record_lineage(live.build_log_shadow_record(facts, report))
        run.set_tags(
            {
                tags.SHADOW_DECISION: report.decision,
                tags.INPUT_DIGEST: log_rows.days_digest(days) or "",
            }
        )
    if failed is not None:
        raise failed
    return _summary(run, models, report, record) | {
        "served_output": str(log.root / prediction_log.PREDICTIONS),
        "shadow_output": str(log.root / prediction_log.SHADOW),
        "labels": note,
        "log": log.describe(),
        "skipped": dict(report.skipped),
        "days": [f"{day.stream}/{day.day}" for day in days],
    }


def _summary(run: TrackedRun, models: tuple, report: Any, record: Any) -> dict[str, Any]:
    champion, challenger = models
    return {
        "run_id": run.run_id,
        "tracking_uri": redact_url(mlflow.get_tracking_uri()),
        "model_name": champion.name,
        "champion_version": champion.version,
        "challenger_version": challenger.version,
        "decision": report.decision,
        "reasons": list(report.reasons),
        "metric": report.metric,
        "comparison": None if report.comparison is None else report.comparison.to_dict(),
        "labelled_rows": report.labelled_rows,
        "unknown_labels": report.unknown_labels,
        "compared_rows": report.compared_rows,
        "agreement": report.agreement,
        "distances": dict(report.distances),
        "challenger_error_rate": report.challenger_failures.error_rate,
        "segments": [segment.to_dict() for segment in report.segments],
        "promoted": record is not None and record.outcome == OUTCOME_DONE,
        "promotion": None if record is None else json.loads(record.to_json()),
    }


@flow(name="shadow", flow_run_name=_run_name, validate_parameters=True)
def shadow_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    challenger: str | None = None,
    batch: str | None = None,
    labels: str | None = None,
    output: str | None = None,
    log: str | None = None,
) -> dict[str, Any]:
    """Shadow-evaluate a challenger against the champion on a production batch, or on what
    the online endpoint logged.

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
        log: judge from the online endpoint's prediction log instead of scoring a batch:
            its folder (every day) or one day folder (`<log>/predictions/YYYY-MM-DD`);
            `endpoint.log.path` stands for the spec's. The challenger's live shadow scores
            (`shadow/`) are paired with the champion's answers (`predictions/`) by request
            and row, and the labels the endpoint received (`labels/`, unless `labels`
            names others) join by `data.id`. Scores of other versions are not counted.

    Returns:
        The decision (`promote`, `reject`, `wait`), its reasons, the numbers, the MLflow
        run and, when the champion moved, the promotion record.
    """
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings, _ = evaluation.evaluate_settings(loaded)
    if log and (batch or output):
        raise SpecError(
            "--log judges what the endpoint served: --batch and --output do not apply",
            ["give either --log or --batch (and --output)"],
        )
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    if log:
        return _shadow_from_log(loaded, settings, (challenger, labels, log), experiment_id)
    inputs = _inputs(loaded, settings, (challenger,), (batch, labels, output))
    extra = {
        tags.MODEL_CHAMPION: inputs.champion.version,
        tags.MODEL_CHALLENGER: inputs.challenger.version,
    }
    with tracked(loaded, "shadow", experiment_id, record_lineage, None, extra) as run:
        pair, report, record, promotion_error = _compare(loaded, settings, inputs, run)
    if promotion_error is not None:
        raise promotion_error
    return _summary(run, (inputs.champion, inputs.challenger), report, record) | {
        "tracking_uri": redact_url(tracking_uri),
        "served_output": str(pair.served.output_dir),
        "shadow_output": str(pair.shadow.output_dir),
        "labels": inputs.labels_note,
    }
