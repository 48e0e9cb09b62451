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

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stemma.components.errors import RegistryError
from stemma.components.evaluation import canary, comparison, shadow
from stemma.components.platform import tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.scoring import engine as scoring
from stemma.components.spec import EvaluateSpec, LoadedSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.shadow import evaluate_settings, labels_location, load_labels_step
from stemma.flows.steps import config_run_name, load_model_step, load_spec_step, scoring_options

_run_name = config_run_name("canary")


def batch_files(loaded: LoadedSpec, batches: list[str] | None) -> list[Path]:
    """The batches, in order: each path a file, or a folder's files sorted by name."""
    paths = [loaded.resolve(path) for path in (batches or [loaded.spec.score.input])]
    return [file for path in paths for file in scoring.input_files(path)]


def _version_of(client: Any, reference: str) -> str:
    """The version a reference names (``models:/m/3`` or ``models:/m@alias``)."""
    from stemma.flows.promote import parse_reference

    name, version, alias = parse_reference(reference)
    if version is not None:
        return version
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, str(alias)).version)
    except MlflowException as error:
        aliases = canary.model_aliases(client, name)
        listing = ", ".join(f"{key} -> v{value}" for key, value in sorted(aliases.items()))
        raise RegistryError(
            f"model {name!r} has no alias {alias!r}: no challenger to canary",
            [
                f"its aliases: {listing or 'none'}",
                "register a challenger (stemma run train) or name one with --challenger",
            ],
        ) from error


@task(name="resolve canary")
def resolve_state_step(
    loaded: LoadedSpec, settings: EvaluateSpec, challenger: str | None
) -> tuple[canary.CanaryState, bool]:
    """The canary to continue, or a new one; and whether it was just started.

    Raises:
        RegistryError: a running canary is of another challenger than the one named; no
            challenger; no champion; the challenger is the champion.
    """
    client = mlflow.MlflowClient()
    model_name = loaded.spec.pipeline.registered_model_name
    state = canary.read_state(client, model_name)
    named = _version_of(client, challenger) if challenger else None
    if state is not None and not state.ended:
        if named is not None and named != state.challenger:
            raise RegistryError(
                f"{model_name}: a canary of v{state.challenger} is under way "
                f"({state.describe()}); it cannot switch to v{named}",
                [
                    "let it finish, or roll it back: stemma rollback / remove the tag "
                    f"{canary.STATE_TAG}"
                ],
            )
        return state, False
    if named is None:
        waiting = canary.model_aliases(client, model_name).get("challenger")
        if waiting is None and state is not None:
            return state, False  # the last canary ended and no new challenger waits
        named = _version_of(client, f"models:/{model_name}@challenger")
    if state is not None and state.challenger == named and not challenger:
        return state, False  # that canary ended; naming the challenger again restarts it
    control = canary.model_aliases(client, model_name).get(canary.CHAMPION_ALIAS)
    if control is None:
        raise RegistryError(
            f"{model_name} has no champion to compare the challenger with",
            ["promote one first: stemma promote models:/<name>/<version>"],
        )
    if control == named:
        raise RegistryError(
            f"the challenger is the champion ({model_name} v{named}): nothing to canary"
        )
    fresh = canary.start_state(
        model_name,
        named,
        control,
        settings,
        revision=state.revision if state is not None else 0,
    )
    return canary.write_state(client, fresh), True


@task(name="score step")
def score_step(
    loaded: LoadedSpec,
    state: canary.CanaryState,
    control: scoring.ScoringModel,
    challenger: scoring.ScoringModel,
    batch: Path,
    folder: Path,
) -> canary.StepScores:
    # The flow has checked that data.id is set (evaluate_settings).
    return canary.score_step(
        control,
        challenger,
        batch,
        folder,
        fraction=state.fraction,
        salt=state.salt,
        **scoring_options(loaded),
    )


@task(name="decide step")
def decide_step(
    loaded: LoadedSpec,
    settings: EvaluateSpec,
    state: canary.CanaryState,
    scores: canary.StepScores,
    labels: Any,
    control: scoring.ScoringModel,
    challenger: scoring.ScoringModel,
    key: str,
) -> dict[str, Any]:
    """The step's decision: the one already on disk for this step, else a new one."""
    recorded = canary.read_step_record(scores.folder, key)
    if recorded is not None:
        return recorded
    spec = loaded.spec
    evaluation = canary.evaluate_step(
        scores,
        labels=labels,
        id_column=str(spec.data.id),
        task=spec.data.task,
        metric=spec.gate.metric,
        settings=settings,
        control=control,
        challenger=challenger,
        promoting=state.phase == canary.PHASE_CANARY and state.step == len(state.steps) - 1,
    )
    document = {
        "key": key,
        "format": canary.STEP_FORMAT,
        "batch": scores.batch.name,
        "digest": scores.digest,
        "phase": state.phase,
        "step": state.step,
        "fraction": state.fraction,
        "control_version": control.version,
        "challenger_version": challenger.version,
        "decision": evaluation.decision,
        "reasons": evaluation.reasons,
        "metrics": evaluation.metrics(),
        "evaluation": evaluation.to_dict(),
        "predictions_sha256": scores.predictions_sha256,
        "decided_at": canary.utc_now(),
    }
    canary.write_step_record(scores.folder, document)
    return document


@task(name="move aliases")
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
        flow_run_id=str(flow_run.get_id() or "") or None,
        experiment_id=experiment_id,
    )


def _step_run(experiment_id: str, key: str, name: str) -> Any:
    """The MLflow run of this step: the one a killed run started, else a new one."""
    found = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{canary.STEP_KEY_TAG}` = '{key}'", max_results=1
    )
    nested = mlflow.active_run() is not None
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id, nested=nested)
    return mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=nested)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run_step(
    loaded: LoadedSpec,
    settings: EvaluateSpec,
    state: canary.CanaryState,
    batch: Path,
    digest: str,
    models: tuple[scoring.ScoringModel, scoring.ScoringModel],
    output_root: Path,
    labels: tuple[Any, str | None, Path | None],
    experiment_id: str,
) -> tuple[canary.CanaryState, dict[str, Any]]:
    """One batch through the canary: score, decide, record, move aliases, record the state."""
    spec = loaded.spec
    control, challenger = models
    label_frame, labels_digest, labels_path = labels
    folder = canary.step_folder(output_root, state, batch)
    key = canary.step_key(state, digest)
    scores = score_step(loaded, state, control, challenger, batch, folder)
    decided = decide_step(loaded, settings, state, scores, label_frame, control, challenger, key)
    transition = canary.plan_transition(state, decided["decision"], decided["reasons"])
    where = (
        f"step {state.step + 1}/{len(state.steps)} {state.fraction:.0%}"
        if state.phase == canary.PHASE_CANARY
        else f"bake {state.baked + 1}/{state.bake_batches}"
    )
    run = _step_run(
        experiment_id, key, f"canary {state.model} v{state.challenger} {where} {batch.stem}"
    )
    try:
        mlflow.set_tags(
            {
                "stemma.pipeline": spec.pipeline.name,
                "stemma.flow": "canary",
                "stemma.prefect.flow_run_id": str(flow_run.get_id() or ""),
                canary.STEP_KEY_TAG: key,
                "stemma.canary.challenger": state.challenger,
                "stemma.canary.control": state.control,
                "stemma.canary.phase": state.phase,
                "stemma.canary.step": str(state.step),
                "stemma.canary.fraction": str(state.fraction),
                "stemma.canary.decision": decided["decision"],
                "stemma.input.digest": digest,
                "stemma.status": "running",
            }
        )
        tracking.log_metrics_batch({**decided["metrics"], "fraction": state.fraction})
        mlflow.log_dict(decided, "canary/step.json")
        arm = scores.rows[scores.rows[canary.ARM_COLUMN] == canary.ARM_CHALLENGER]
        with tempfile.TemporaryDirectory(prefix="stemma-canary-") as tmp:
            plot = comparison.plot_score_scatter(
                arm["champion_score"].to_numpy(),
                arm["challenger_score"].to_numpy(),
                Path(tmp) / "score_scatter.png",
                title=f"Challenger's arm at {state.fraction:.0%}: v{challenger.version} vs "
                f"v{control.version}",
                champion_label=f"champion v{control.version}",
                challenger_label=f"challenger v{challenger.version}",
            )
            mlflow.log_artifact(str(plot), "canary")
        evidence = {
            "flow": "canary",
            "step_run_id": run.info.run_id,
            "batch": batch.name,
            "fraction": state.fraction,
            "decision": decided["decision"],
            "reasons": decided["reasons"],
            "metrics": decided["metrics"],
        }
        applied = apply_step(state, transition, evidence, experiment_id)
        facts = canary.StepLineage(
            pipeline=spec.pipeline.name,
            model_name=state.model,
            control_version=control.version,
            control_weights=control.weights_sha256,
            challenger_version=challenger.version,
            challenger_weights=challenger.weights_sha256,
            batch_path=_relative(batch, loaded.root),
            batch_digest=digest,
            labels_path=_relative(labels_path, loaded.root)
            if labels_digest and labels_path
            else None,
            labels_digest=labels_digest,
            predictions_path=_relative(scores.predictions, loaded.root),
            predictions_sha256=scores.predictions_sha256,
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            flow_run_id=str(flow_run.get_id() or "") or None,
            phase=state.phase,
            step=state.step,
            fraction=state.fraction,
            decision=decided["decision"],
            reasons=list(decided["reasons"]),
            action=applied.action,
            outcome=applied.outcome,
            who=_who(),
            when=canary.utc_now(),
            action_run_id=applied.record.record_run_id if applied.record is not None else None,
        )
        record_lineage(canary.build_step_record(facts))
        following = canary.record_step(
            state,
            transition,
            applied,
            batch=batch,
            digest=digest,
            decision=decided["decision"],
            run_id=run.info.run_id,
        )
        written = canary.write_state(mlflow.MlflowClient(), following)
        mlflow.set_tags(
            {
                "stemma.canary.action": applied.action,
                "stemma.canary.outcome": applied.outcome,
                "stemma.canary.status": written.status,
                "stemma.output.sha256": scores.predictions_sha256,
                "stemma.status": "completed",
            }
        )
    except BaseException as error:
        tracking.end_run_after(error)
        raise
    mlflow.end_run(status="FINISHED")
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
        "arm_rows": int(decided["metrics"].get("arm_rows", 0)),
        "rows": int(decided["metrics"].get("rows", 0)),
        "run_id": run.info.run_id,
        "predictions": str(scores.predictions),
        "status": written.status,
    }
    return written, summary


def _who() -> str:
    import getpass

    return getpass.getuser()


@flow(name="canary", flow_run_name=_run_name, validate_parameters=True)
def canary_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    challenger: str | None = None,
    batches: list[str] | None = None,
    labels: str | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Run the next canary steps, one per batch not processed yet.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `evaluate.canary.steps=[0.5,1.0]`.
        challenger: the version to canary, `models:/<name>/<version>` or
            `models:/<name>@<alias>`; only to start a canary (default: @challenger). A
            running canary continues with its own challenger.
        batches: files or folders of production rows, processed in order, one step each
            (default: `score.input`); batches the canary already processed are skipped.
        labels: labels of those rows (default: `evaluate.labels`; labels named here must
            exist and match the batches' ids).
        output: folder of the canary's scores and served predictions (default:
            `<score.output>-canary`).

    Returns:
        The canary's state and what each batch did.
    """
    logger = get_run_logger()
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings, _ = evaluate_settings(loaded)
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    files = batch_files(loaded, batches)
    labels_path, labels_required = labels_location(loaded, settings, labels)
    label_frame, labels_digest, labels_note = load_labels_step(loaded, labels_path, labels_required)
    logger.info("%s", labels_note)
    if labels_required and label_frame is not None:
        ids = shadow.read_batch_columns(files, [str(spec.data.id)])[str(spec.data.id)]
        shadow.require_label_overlap(ids, label_frame, str(spec.data.id), str(labels_path))
    output_root = (
        loaded.resolve(output)
        if output
        else canary.default_output_root(loaded.resolve(spec.score.output))
    )

    state, started = resolve_state_step(loaded, settings, challenger)
    name = state.model
    control = load_model_step(f"models:/{name}/{state.control}", loaded)
    challenger_model = load_model_step(f"models:/{name}/{state.challenger}", loaded)
    client = mlflow.MlflowClient()
    steps: list[dict[str, Any]] = []
    skipped: list[str] = []
    left: list[str] = []
    for batch in files:
        if state.ended:
            left.append(str(batch))
            continue
        digest, _ = scoring.input_digest([batch])
        done = state.processed(digest)
        if done is not None:
            skipped.append(f"{batch.name} (step {done.step + 1}, {done.decision})")
            continue
        moved = canary.check_aliases(client, state)
        if moved is not None:
            from dataclasses import replace

            state = canary.write_state(client, replace(state, status=canary.ABORTED, cause=moved))
            logger.warning("canary aborted: %s", moved)
            left.append(str(batch))
            continue
        state, step = run_step(
            loaded,
            settings,
            state,
            batch,
            digest,
            (control, challenger_model),
            output_root,
            (label_frame, labels_digest, labels_path),
            experiment_id,
        )
        logger.info(
            "%s at %.0f%%: %s (%s %s)",
            batch.name,
            step["fraction"] * 100,
            step["decision"],
            step["action"],
            step["outcome"],
        )
        steps.append(step)
    return {
        "tracking_uri": redact_url(tracking_uri),
        "model_name": name,
        "started": started,
        "state": json.loads(state.to_json()),
        "describe": state.describe(),
        "steps": steps,
        "skipped": skipped,
        "left": left,
        "labels": labels_note,
        "output": str(output_root),
        "history": [asdict(entry) for entry in state.history],
    }
