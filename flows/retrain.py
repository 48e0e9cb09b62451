"""The continuous-training flow: new labelled production data in, maybe a new champion out.

One run: gather the production rows whose labels arrived since the current data version
(the newest labelled batch is held out for the shadow comparison), append them to the
training table and record a new DVC version (``data.dvc`` changes and is committed; the
old version stays restorable), then train → gate (→ quantize, when the spec enables it)
→ shadow against the champion on the held-out batch → promote only when the shadow
decision says so. The drift report that caused the run, if any, is recorded as its cause
on the retraining run, the training run and the model version, so lineage shows "retrained
because of drift report X on batch Y". The batches may be the online endpoint's prediction
log (a day folder per batch, the log's labels joined by id); every batch the new rows came
from is recorded as an input of the run, with its digest.

Nothing happens twice: a second run for the same pipeline while one runs exits at once
(a lock under ``.stemma/locks``, besides the deployment's concurrency limit), and a run
with too few new rows exits early and says so, leaving the data and the registry alone.

The retraining run is detached (see :func:`.tracked_run.tracked_run`): the training and
shadow flows it calls record runs of their own beside it.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.states import Completed

from stemma.components.platform import lineage, metric_names, tags, tracking
from stemma.components.platform.refs import format_model_ref
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.registry import promotion
from stemma.components.spec import LoadedSpec, RetrainSpec, load_spec
from stemma.components.training import retraining
from stemma.components.training.retraining import (
    ALREADY_RUNNING,
    GATE_FAILED,
    NO_NEW_DATA,
    NOT_PROMOTED,
    PROMOTED,
    RetrainError,
    cause_of,
    pipeline_lock,
)
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import (
    config_location,
    config_run_name,
    flow_run_id,
    relative,
    step,
    tracked,
)

__all__ = [
    "ALREADY_RUNNING",
    "GATE_FAILED",
    "NOT_PROMOTED",
    "NO_NEW_DATA",
    "PROMOTED",
    "RetrainError",
    "cause_of",
    "pipeline_lock",
    "retrain_flow",
]

_run_name = config_run_name("retrain")


@step(name="gather new labelled rows")
def gather_step(
    loaded: LoadedSpec, settings: RetrainSpec, batches: str | None, labels: str | None
) -> retraining.Gathered:
    return retraining.gather(loaded, settings, batches, labels)


@step(name="record new data version")
def record_step(loaded: LoadedSpec, gathered: retraining.Gathered) -> tuple[Any, str | None]:
    return retraining.record_version(loaded, gathered)


def _train(loaded: LoadedSpec, run: TrackedRun) -> dict[str, Any]:
    """The training flow on the new data version. Its run is this run's child, so the
    version's run (``run_id``) leads to the cause, on this run and in its record."""
    from stemma.flows.train import train_flow

    trained = train_flow(config=str(loaded.path), overrides=list(loaded.overrides))
    run.set_tags({tags.MODEL_VERSION: str(trained["model_version"])})
    return trained


def _shadow(
    loaded: LoadedSpec,
    run: TrackedRun,
    settings: RetrainSpec,
    trained: dict[str, Any],
    gathered: retraining.Gathered,
    labels: str | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Shadow the new version on the held-out batch; promote when it says so (and the spec
    leaves promotion to the shadow). The shadow's summary and the promotion record."""
    from stemma.flows.shadow import shadow_flow

    spec = loaded.spec
    model_name = spec.pipeline.registered_model_name
    version = str(trained["model_version"])
    holdout = gathered.holdout
    result = shadow_flow(
        config=str(loaded.path),
        overrides=list(loaded.overrides),
        challenger=format_model_ref(model_name, version=version),
        batch=str(holdout),
        labels=str(loaded.resolve(labels or settings.labels)),
        output=str(loaded.resolve(spec.score.output).parent / "shadow" / holdout.stem),
    )
    run.set_tags({tags.SHADOW_DECISION: result["decision"]})
    if result.get("promoted"):
        return result, result.get("promotion")
    if result["decision"] != "promote" or settings.promote != "shadow":
        return result, None
    record = promotion.promote(
        mlflow.MlflowClient(),
        model_name,
        version,
        expected_champion=str(result["champion_version"]),
        reason=f"shadow evaluation {result['run_id']} decided promote",
        evidence={"shadow_run_id": result["run_id"], "retrain_run_id": run.run_id},
        flow_run_id=flow_run_id(),
        experiment_id=run.experiment_id,
    )
    return result, json.loads(record.to_json())


def _retrain(
    loaded: LoadedSpec,
    settings: RetrainSpec,
    run: TrackedRun,
    why: dict[str, str],
    sources: tuple[str | None, str | None],
) -> dict[str, Any]:
    spec = loaded.spec
    batches, labels = sources
    gathered = gather_step(loaded, settings, batches, labels)
    run.log_metrics(
        metric_names.in_section(metric_names.RETRAIN, retraining.gathered_metrics(gathered))
    )
    run.log_params({"min_new_rows": str(settings.min_new_rows)})
    too_few = retraining.too_few_rows(gathered, settings)
    if too_few is not None:
        return {"outcome": NO_NEW_DATA, "summary": too_few, "data_md5": gathered.version.md5}
    recorded, git_rev = record_step(loaded, gathered)
    holdout = gathered.holdout
    # The previous version, the commit, the files merged and the held-out batch are in
    # the run's lineage record.
    run.set_tags({tags.DATA_MD5: recorded.md5})
    trained = _train(loaded, run)
    version = str(trained["model_version"])
    shadow_result, promoted = None, None
    decided = retraining.before_shadow(
        trained["gate"], version, recorded.md5, holdout, promotion.CHAMPION_ALIAS
    )
    if decided is None:
        shadow_result, promoted = _shadow(loaded, run, settings, trained, gathered, labels)
        decided = retraining.after_shadow(bool(promoted), shadow_result, version, recorded.md5)
    outcome, summary = decided
    run.record_lineage(
        lineage.build_retrain_record(
            pipeline=spec.pipeline.name,
            run_id=run.run_id,
            cause=why,
            previous_data_md5=gathered.version.md5,
            data_md5=recorded.md5,
            data_pointer=str(recorded.dvc_file.relative_to(loaded.root)),
            train_run_id=trained["run_id"],
            model_name=spec.pipeline.registered_model_name,
            model_version=version,
            shadow_run_id=shadow_result["run_id"] if shadow_result else None,
            decision=outcome,
            data_git_rev=git_rev,
            sources=dict(gathered.new.sources),
            holdout=relative(holdout, loaded.root) if holdout else None,
            inputs={
                relative(path, loaded.root): digest for path, digest in gathered.inputs.items()
            },
        )
    )
    return {
        "data_md5": recorded.md5,
        "previous_data_md5": gathered.version.md5,
        "data_git_rev": git_rev,
        "new_rows": gathered.new.rows,
        "unknown_labels": gathered.unknown_labels,
        "inputs": {str(path): digest for path, digest in gathered.inputs.items()},
        "model_version": version,
        "train_run_id": trained["run_id"],
        "outcome": outcome,
        "summary": summary,
        "shadow": shadow_result,
        "promotion": promoted,
    }


@flow(name="retrain", flow_run_name=_run_name, validate_parameters=True)
def retrain_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    cause: str | None = None,
    batches: str | None = None,
    labels: str | None = None,
) -> dict[str, Any]:
    """Retrain on newly labelled production data; promote only on the shadow's word.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `train.epochs=5`.
        cause: MLflow run id of the drift report that triggered the run (None: scheduled
            or by hand).
        batches: folder of production batches (default: `retrain.batches`, else
            `score.input`), or the endpoint's prediction log,
            `<endpoint.log.path>/predictions` (a day folder is a batch).
        labels: folder of their labels (default: `retrain.labels`); the log's `labels`
            folder works (an id's latest label wins).

    Returns:
        The outcome (`no_new_data`, `already_running`, `gate_failed`, `promoted`,
        `not_promoted`), the new data version, the model version, the shadow decision and
        the MLflow run of the retraining.
    """
    logger = get_run_logger()
    loaded = load_spec(config_location(config), list(overrides or []))
    spec = loaded.spec
    settings = spec.retrain or RetrainSpec()
    with pipeline_lock(loaded.root, spec.pipeline.name) as acquired:
        if not acquired:
            message = f"a retraining of {spec.pipeline.name} is already running: nothing to do"
            logger.info(message)
            return _finished({"outcome": ALREADY_RUNNING, "summary": message})
        tracking.configure_tracking(loaded.root)
        experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
        why = cause_of(mlflow.MlflowClient(), cause)
        extra = retraining.cause_tags(why)
        with tracked(
            loaded, "retrain", experiment_id, record_lineage, None, extra, detached=True
        ) as run:
            try:
                result = _retrain(loaded, settings, run, why, (batches, labels))
            except BaseException:
                run.set_tags({tags.RETRAIN_OUTCOME: retraining.FAILED})
                raise
            run.set_tags({tags.RETRAIN_OUTCOME: result["outcome"]})
        logger.info(result["summary"])
        return _finished({**result, "run_id": run.run_id, "cause": why})


def _finished(result: dict[str, Any]) -> Any:
    """The flow's result; a run that had nothing to do ends in a Completed state that says
    so in its message, which the Prefect UI shows beside the run."""
    if result["outcome"] not in (NO_NEW_DATA, ALREADY_RUNNING):
        return result
    summary = str(result["summary"])
    message = summary if "nothing to do" in summary else f"nothing to do: {summary}"
    return Completed(message=message, data=result)
