"""The canary flow: one canary step per batch, guards, and automatic promotion or rollback.

Each run continues the canary recorded on the registered model (tag
``stemma.canary.state``), or starts one for the challenger (``--challenger``, default
``@challenger``) against the champion. For every batch it has not processed yet, it routes
entities by the stable hash of their id, scores each arm, writes the served predictions
(``<output>/v<challenger>/<batch>/predictions.parquet``, default output
``<score.output>-canary``), runs the guards, records the step as an MLflow run with a
lineage record, moves the aliases through the promotion module when the step says so, and
then records the new state. See :mod:`stemma.components.evaluation.canary` for the state machine.
"""

from __future__ import annotations

import getpass
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger

from stemma.components.errors import SpecError
from stemma.components.evaluation import canary, canary_steps, comparison, live, log_rows, rows
from stemma.components.evaluation import steps as evaluation
from stemma.components.platform import metric_names, tags, tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.refs import format_model_ref
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.inputs import input_digest, input_files
from stemma.components.spec import EvaluateSpec, LoadedSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.shadow import load_labels_step, log_labels_step
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

_run_name = config_run_name("canary")


@dataclass(frozen=True)
class Canary:
    """What every step of this run shares."""

    loaded: LoadedSpec
    settings: EvaluateSpec
    models: tuple[ScoringModel, ScoringModel]  # control, challenger
    output_root: Path
    labels: tuple[Any, str | None, Path | None]  # frame, digest, path
    experiment_id: str
    log_days: dict[Path, log_rows.LogDay] | None = None  # judged from the endpoint's log

    def digest(self, batch: Path) -> str:
        """The content digest that identifies a batch (a day of the log by its parts)."""
        if self.log_days is not None:
            return self.log_days[batch].digest
        digest, _ = input_digest([batch])
        return digest


def batch_files(loaded: LoadedSpec, batches: list[str] | None) -> list[Path]:
    """The batches, in order: each path a file, or a folder's files sorted by name."""
    paths = [loaded.resolve(path) for path in (batches or [loaded.spec.score.input])]
    return [file for path in paths for file in input_files(path)]


@step(name="resolve canary")
def resolve_state_step(
    loaded: LoadedSpec, settings: EvaluateSpec, challenger: str | None
) -> tuple[canary.CanaryState, bool]:
    """The canary to continue, or a new one; and whether it was just started."""
    model_name = loaded.spec.pipeline.registered_model_name
    return evaluation.resolve_canary(mlflow.MlflowClient(), model_name, settings, challenger)


@step(name="score step")
def score_step(
    run: Canary, state: canary.CanaryState, batch: Path, folder: Path
) -> canary_steps.StepScores:
    # The flow has checked that data.id is set (evaluate_settings).
    control, challenger = run.models
    return canary_steps.score_step(
        control,
        challenger,
        batch,
        folder,
        fraction=state.fraction,
        salt=state.salt,
        **scoring_options(run.loaded),
    )


@step(name="read step from the log")
def log_step(
    run: Canary, state: canary.CanaryState, day: log_rows.LogDay, folder: Path
) -> canary_steps.StepScores:
    control, _ = run.models
    return live.log_step_scores(
        control,
        day,
        folder,
        challenger_version=state.challenger,
        control_version=state.control,
        promoted=state.phase == canary.PHASE_BAKE,
        **scoring_options(run.loaded),
    )


@step(name="decide step")
def decide_step(
    run: Canary, state: canary.CanaryState, scores: canary_steps.StepScores, key: str
) -> dict[str, Any]:
    """The step's decision: the one already on disk for this step, else a new one."""
    return evaluation.decide_canary_step(
        run.loaded, run.settings, state, scores, run.labels[0], run.models, key
    )


@step(name="move aliases")
def apply_step(
    state: canary.CanaryState,
    transition: canary.Transition,
    evidence: dict[str, Any],
    experiment_id: str,
) -> canary.AppliedAction:
    return canary.apply_transition(
        mlflow.MlflowClient(),
        state,
        transition,
        evidence=evidence,
        flow_run_id=flow_run_id(),
        experiment_id=experiment_id,
    )


def _step_run_id(experiment_id: str, key: str) -> str | None:
    """The MLflow run a killed run started for this step, if any."""
    found = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{canary.STEP_KEY_TAG}` = '{key}'", max_results=1
    )
    return found[0].info.run_id if found else None


def _log_step(run: TrackedRun, state: canary.CanaryState, decided: dict, scores: Any) -> None:
    control, challenger = state.control, state.challenger
    numbers = {**decided["metrics"], "fraction": state.fraction}
    run.log_metrics(metric_names.in_section(metric_names.CANARY, numbers))
    run.log_dict(decided, "canary/step.json")
    arm = scores.rows[scores.rows[canary_steps.ARM_COLUMN] == canary_steps.ARM_CHALLENGER]
    with tempfile.TemporaryDirectory(prefix="stemma-canary-") as tmp:
        comparison.plot_score_scatter(
            arm[rows.CHAMPION_SCORE].to_numpy(),
            arm[rows.CHALLENGER_SCORE].to_numpy(),
            Path(tmp) / "score_scatter.png",
            title=f"Challenger's arm at {state.fraction:.0%}: v{challenger} vs v{control}",
            champion_label=f"champion v{control}",
            challenger_label=f"challenger v{challenger}",
        )
        run.log_artifacts(Path(tmp), "canary")


def _step_facts(
    shared: Canary, run: TrackedRun, state: Any, step: tuple, applied: Any
) -> canary.StepLineage:
    root = shared.loaded.root
    batch, digest, scores, decided = step
    control, challenger = shared.models
    _, labels_digest, labels_path = shared.labels
    return canary.StepLineage(
        pipeline=shared.loaded.spec.pipeline.name,
        model_name=state.model,
        control_version=control.version,
        control_weights=control.weights_sha256,
        challenger_version=challenger.version,
        challenger_weights=challenger.weights_sha256,
        batch_path=relative(batch, root),
        batch_digest=digest,
        labels_path=relative(labels_path, root) if labels_digest and labels_path else None,
        labels_digest=labels_digest,
        predictions_path=relative(scores.predictions, root) if scores.predictions else None,
        predictions_sha256=scores.predictions_sha256,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        phase=state.phase,
        step=state.step,
        fraction=state.fraction,
        decision=decided["decision"],
        reasons=list(decided["reasons"]),
        action=applied.action,
        outcome=applied.outcome,
        who=getpass.getuser(),
        when=canary.utc_now(),
        action_run_id=applied.record.record_run_id if applied.record is not None else None,
        batch_files=scores.log.get("parts"),
    )


def _record_step(shared: Canary, run: TrackedRun, state: Any, step: tuple) -> tuple:
    """Log the step, move the aliases, record lineage and the canary's new state."""
    batch, digest, scores, decided = step
    transition = canary.plan_transition(state, decided["decision"], decided["reasons"])
    _log_step(run, state, decided, scores)
    evidence = {
        "flow": "canary",
        "step_run_id": run.run_id,
        "batch": batch.name,
        "fraction": state.fraction,
        "decision": decided["decision"],
        "reasons": decided["reasons"],
        "metrics": decided["metrics"],
    }
    applied = apply_step(state, transition, evidence, shared.experiment_id)
    run.record_lineage(canary.build_step_record(_step_facts(shared, run, state, step, applied)))
    following = canary.record_step(
        state,
        transition,
        applied,
        batch=batch,
        digest=digest,
        decision=decided["decision"],
        run_id=run.run_id,
    )
    written = canary.write_state(mlflow.MlflowClient(), following)
    # The action, its outcome and the canary's status are the decision node's attributes.
    if scores.predictions_sha256:
        run.set_tags({tags.OUTPUT_SHA256: scores.predictions_sha256})
    return written, applied


def run_step(
    shared: Canary, state: canary.CanaryState, batch: Path, digest: str
) -> tuple[canary.CanaryState, dict[str, Any]]:
    """One batch through the canary: score, decide, record, move aliases, record the state."""
    key = canary.step_key(state, digest)
    if shared.log_days is not None:
        folder = canary.step_folder(shared.output_root, state, Path(f"log-{batch.name}"))
        scores = log_step(shared, state, shared.log_days[batch], folder)
    else:
        folder = canary.step_folder(shared.output_root, state, batch)
        scores = score_step(shared, state, batch, folder)
    decided = decide_step(shared, state, scores, key)
    name = f"canary {state.model} v{state.challenger} {evaluation.step_where(state)} {batch.stem}"
    extra = {
        canary.STEP_KEY_TAG: key,
        tags.CANARY_CHALLENGER: state.challenger,
        tags.CANARY_CONTROL: state.control,
        tags.CANARY_DECISION: decided["decision"],
        tags.INPUT_DIGEST: digest,
    }
    resumed = _step_run_id(shared.experiment_id, key)
    with tracked(
        shared.loaded, "canary", shared.experiment_id, record_lineage, resumed, extra, name=name
    ) as run:
        written, applied = _record_step(shared, run, state, (batch, digest, scores, decided))
    metrics = decided["metrics"]
    summary = {
        "batch": str(batch),
        "phase": state.phase,
        "step": state.step,
        "fraction": state.fraction,
        "decision": decided["decision"],
        "reasons": list(decided["reasons"]),
        "action": applied.action,
        "outcome": applied.outcome,
        "action_detail": applied.detail,
        "arm_rows": int(metrics.get("arm_rows", 0)),
        "rows": int(metrics.get("rows", 0)),
        "unknown_labels": int(metrics.get("unknown_labels", 0)),
        "run_id": run.run_id,
        "predictions": str(scores.predictions or batch),
        "status": written.status,
        **({"log": scores.log} if scores.log else {}),
    }
    return written, summary


def _steps(shared: Canary, state: canary.CanaryState, files: list[Path]) -> tuple:
    """Every batch not processed yet, one step each, until the canary ends."""
    logger = get_run_logger()
    client = mlflow.MlflowClient()
    steps: list[dict[str, Any]] = []
    skipped: list[str] = []
    left: list[str] = []
    for batch in files:
        if state.ended:
            left.append(str(batch))
            continue
        digest = shared.digest(batch)
        done = state.processed(digest)
        if done is not None:
            skipped.append(f"{batch.name} (step {done.step + 1}, {done.decision})")
            continue
        moved = canary.check_aliases(client, state)
        if moved is not None:
            state = canary.write_state(client, replace(state, status=canary.ABORTED, cause=moved))
            logger.warning("canary aborted: %s", moved)
            left.append(str(batch))
            continue
        state, step = run_step(shared, state, batch, digest)
        logger.info(
            "%s at %.0f%%: %s (%s %s)",
            batch.name,
            step["fraction"] * 100,
            step["decision"],
            step["action"],
            step["outcome"],
        )
        steps.append(step)
    return state, steps, skipped, left


def _batch_inputs(
    loaded: LoadedSpec, settings: EvaluateSpec, batches: list[str] | None, labels: str | None
) -> tuple[list[Path], tuple, str]:
    """The batches and their labels (frame, digest, path), checked to share ids; a note."""
    id_column = str(loaded.spec.data.id)
    files = batch_files(loaded, batches)
    labels_path, labels_required = evaluation.labels_location(loaded, settings, labels)
    label_frame, labels_digest, labels_note = load_labels_step(loaded, labels_path, labels_required)
    if labels_required and label_frame is not None:
        ids = rows.read_batch_columns(files, [id_column])[id_column]
        rows.require_label_overlap(ids, label_frame, id_column, str(labels_path))
    return files, (label_frame, labels_digest, labels_path), labels_note


def _log_inputs(loaded: LoadedSpec, log: str, labels: str | None) -> tuple:
    """The endpoint's log, its days with a finished part, and the labels (frame, digest,
    path) the endpoint received (or those named); a note on the labels."""
    prediction_log = evaluation.open_prediction_log(loaded, log)
    days = evaluation.log_step_days(prediction_log)
    frame, labels_digest, labels_path, note = log_labels_step(loaded, prediction_log, labels)
    return prediction_log, days, (frame, labels_digest, labels_path), note


def _log_days(
    log: log_rows.LogFolder, days: list, state: canary.CanaryState, id_column: str, control: Any
) -> tuple[dict[Path, log_rows.LogDay], dict[str, Any]]:
    """The log's days to judge, by folder, and what the summary says of the log."""
    columns = [id_column, *live.STEP_COLUMNS, *control.feature_columns]
    judged, before, waiting = evaluation.log_canary_days(days, state, columns)
    notes = {"log": log.describe(), "before_start": before, "waiting": waiting}
    return {day.path: day for day in judged}, notes


@flow(name="canary", flow_run_name=_run_name, validate_parameters=True)
def canary_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    challenger: str | None = None,
    batches: list[str] | None = None,
    labels: str | None = None,
    output: str | None = None,
    log: str | None = None,
) -> dict[str, Any]:
    """Run the next canary steps, one per batch (or day of the endpoint's log) not processed yet.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `evaluate.canary.steps=[0.5,1.0]`.
        challenger: the version to canary, `models:/<name>/<version>` or
            `models:/<name>@<alias>`; only to start a canary (default: @challenger). A
            running canary continues with its own challenger.
        batches: files or folders of production rows, processed in order, one step each
            (default: `score.input`); batches the canary already processed are skipped.
        labels: labels of those rows (default: `evaluate.labels`, or with `log` the labels
            the endpoint received; labels named here must exist).
        output: folder of the canary's scores and served predictions (default:
            `<score.output>-canary`).
        log: judge what the online endpoint served instead: its prediction log's folder or
            a day folder (`<log>/predictions/YYYY-MM-DD`; `endpoint.log.path`: the spec's).
            Each UTC day since the canary started is one step once it is over, judged on
            the rows each arm served (the endpoint routes the canary's share).

    Returns:
        The canary's state and what each batch did.
    """
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings, id_column = evaluation.evaluate_settings(loaded)
    if log and batches:
        raise SpecError(
            "--log judges the days the endpoint served: --batches does not apply",
            ["give either --log or --batches"],
        )
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    files: list[Path] = []
    prediction_log, days = None, []
    if log:
        prediction_log, days, label_inputs, labels_note = _log_inputs(loaded, log, labels)
    else:
        files, label_inputs, labels_note = _batch_inputs(loaded, settings, batches, labels)
    get_run_logger().info("%s", labels_note)
    score_output = loaded.resolve(spec.score.output)
    output_root = loaded.resolve(output) if output else canary.default_output_root(score_output)
    state, started = resolve_state_step(loaded, settings, challenger)
    control = load_model_step(format_model_ref(state.model, version=state.control), loaded)
    challenger_model = load_model_step(
        format_model_ref(state.model, version=state.challenger), loaded
    )
    from_log: dict[str, Any] = {}
    log_days = None
    if prediction_log is not None:
        log_days, from_log = _log_days(prediction_log, days, state, id_column, control)
        files = list(log_days)
    shared = Canary(
        loaded, settings, (control, challenger_model), output_root, label_inputs,
        experiment_id, log_days,
    )  # fmt: skip
    state, steps, skipped, left = _steps(shared, state, files)
    return {
        "tracking_uri": redact_url(tracking_uri),
        "model_name": state.model,
        "started": started,
        "state": json.loads(state.to_json()),
        "describe": state.describe(),
        "steps": steps,
        "skipped": skipped,
        "left": left,
        "labels": labels_note,
        "output": str(output_root),
        "history": [asdict(entry) for entry in state.history],
        **from_log,
    }
