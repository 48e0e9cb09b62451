"""The continuous-training flow: new labelled production data in, maybe a new champion out.

One run: gather the production rows whose labels arrived since the current data version
(the newest labelled batch is held out for the shadow comparison), append them to the
training table and record a new DVC version (``data.dvc`` changes and is committed; the
old version stays restorable), then train → gate (→ quantize, when the spec enables it)
→ shadow against the champion on the held-out batch → promote only when the shadow
decision says so. The drift report that caused the run, if any, is recorded as its cause
on the retraining run, the training run and the model version, so lineage shows "retrained
because of drift report X on batch Y".

Nothing happens twice: a second run for the same pipeline while one runs exits at once
(a lock under ``.stemma/locks``, besides the deployment's concurrency limit), and a run
with too few new rows exits early and says so, leaving the data and the registry alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stemma.components.data import ingest
from stemma.components.data.tables import load_table, resolve_data_version
from stemma.components.errors import StemmaError
from stemma.components.lineage import records as lineage
from stemma.components.platform import tracking
from stemma.components.registry import promotion
from stemma.components.spec import LoadedSpec, RetrainSpec, load_spec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import config_run_name

#: Outcomes of a retraining run (the `stemma.retrain.outcome` tag).
NO_NEW_DATA = "no_new_data"
ALREADY_RUNNING = "already_running"
GATE_FAILED = "gate_failed"
PROMOTED = "promoted"
NOT_PROMOTED = "not_promoted"


class RetrainError(StemmaError):
    """The retraining run cannot go on (its cause or its inputs are broken)."""

    exit_code = 3


_run_name = config_run_name("retrain")


@contextlib.contextmanager
def pipeline_lock(root: Path, pipeline: str) -> Iterator[bool]:
    """Hold the pipeline's retraining lock; yields False when another run holds it."""
    folder = root / tracking.STATE_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"retrain-{pipeline}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "since": time.time()}))
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cause_of(client: Any, cause: str | None) -> dict[str, str]:
    """What caused the run: the drift report's run id, its batch and drifted features.

    Raises:
        RetrainError: ``cause`` names a run that does not exist.
    """
    if not cause:
        return {"kind": "schedule"}
    try:
        report = client.get_run(cause)
    except Exception as error:
        raise RetrainError(
            f"the cause {cause!r} is not an MLflow run in this store",
            ["pass the run id of a drift report (the drift event's payload carries it)"],
        ) from error
    tags = report.data.tags
    flow_name = tags.get("stemma.flow", "run")
    return {
        "kind": "drift_report" if flow_name == "monitor" else flow_name,
        "run_id": cause,
        "batch": tags.get("stemma.batch.path", tags.get("stemma.input.path", "")),
        "batch_digest": tags.get("stemma.batch.digest", tags.get("stemma.input.digest", "")),
        "features": tags.get("stemma.drift.features", ""),
    }


@task(name="gather new labelled rows")
def gather_step(
    loaded: LoadedSpec, settings: RetrainSpec, batches: str | None, labels: str | None
) -> tuple[Any, pd.DataFrame, ingest.NewRows, Path | None]:
    spec = loaded.spec
    if spec.data.id is None:
        raise RetrainError(
            f"{loaded.path}: retraining joins batches and labels by id, and data.id is not set"
        )
    version = resolve_data_version(loaded.root, loaded.resolve(spec.data.path))
    table = load_table(version.file_path, spec.data)
    batch_path = loaded.resolve(batches or settings.batches or spec.score.input)
    label_path = loaded.resolve(labels or settings.labels)
    all_labels = ingest.read_labels(label_path, id_column=spec.data.id, target=spec.data.target)
    labelled_ids = set(all_labels[spec.data.id].tolist())
    labelled = [
        path
        for path in ingest.batch_files(batch_path)
        if ingest.read_ids(path, spec.data.id).isin(labelled_ids).any()
    ]
    # The newest labelled batch is held out: the shadow compares the models on rows
    # neither was trained on.
    holdout = labelled[-1] if len(labelled) > 1 else None
    new = ingest.gather_new_rows(
        table,
        [path for path in labelled if path != holdout],
        all_labels,
        id_column=spec.data.id,
        target=spec.data.target,
    )
    return version, table, new, holdout


@task(name="record new data version")
def record_step(
    loaded: LoadedSpec, version: Any, table: pd.DataFrame, new: ingest.NewRows
) -> tuple[Any, str | None]:
    ingest.append_rows(version.file_path, table, new.frame)
    ingest.record_new_version(loaded.root, version)
    recorded = resolve_data_version(loaded.root, loaded.resolve(loaded.spec.data.path))
    rev = ingest.commit_pointer(
        loaded.root,
        recorded.dvc_file,
        f"Record data version {recorded.md5}: {new.rows} labelled production rows "
        f"from {', '.join(sorted(new.sources))}",
    )
    return recorded, rev


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
            `score.input`).
        labels: folder of their labels (default: `retrain.labels`).

    Returns:
        The outcome (`no_new_data`, `already_running`, `gate_failed`, `promoted`,
        `not_promoted`), the new data version, the model version, the shadow decision and
        the MLflow run of the retraining.
    """
    from stemma.flows.shadow import shadow_flow
    from stemma.flows.train import train_flow

    logger = get_run_logger()
    loaded = load_spec(config, list(overrides or []))
    spec = loaded.spec
    settings = spec.retrain or RetrainSpec()
    with pipeline_lock(loaded.root, spec.pipeline.name) as acquired:
        if not acquired:
            message = f"a retraining of {spec.pipeline.name} is already running: nothing to do"
            logger.info(message)
            return {"outcome": ALREADY_RUNNING, "summary": message}
        tracking.configure_tracking(loaded.root)
        experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
        client = mlflow.MlflowClient()
        why = cause_of(client, cause)
        run = client.create_run(
            experiment_id,
            run_name=flow_run.get_name(),
            tags={
                "stemma.pipeline": spec.pipeline.name,
                "stemma.flow": "retrain",
                "stemma.prefect.flow_run_id": str(flow_run.get_id() or ""),
                "stemma.cause.kind": why["kind"],
                **{f"stemma.cause.{k}": v for k, v in why.items() if k != "kind" and v},
            },
        )
        run_id = run.info.run_id
        try:
            result = _retrain(
                loaded, settings, client, run_id, why, batches, labels, train_flow, shadow_flow
            )
        except BaseException:
            client.set_tag(run_id, "stemma.retrain.outcome", "failed")
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_tag(run_id, "stemma.retrain.outcome", result["outcome"])
        client.set_terminated(run_id, "FINISHED")
        logger.info(result["summary"])
        return {**result, "run_id": run_id, "cause": why}


def _retrain(
    loaded: LoadedSpec,
    settings: RetrainSpec,
    client: Any,
    run_id: str,
    why: dict[str, str],
    batches: str | None,
    labels: str | None,
    train_flow: Any,
    shadow_flow: Any,
) -> dict[str, Any]:
    spec = loaded.spec
    model_name = spec.pipeline.registered_model_name
    version, table, new, holdout = gather_step(loaded, settings, batches, labels)
    client.log_batch(
        run_id,
        metrics=[
            mlflow.entities.Metric(key, float(value), int(time.time() * 1000), 0)
            for key, value in {
                "new_rows": new.rows,
                "unlabelled_rows": new.unlabelled,
                "rows_already_in_table": new.already_in_table,
                "table_rows_before": len(table),
            }.items()
        ],
        params=[mlflow.entities.Param("min_new_rows", str(settings.min_new_rows))],
    )
    if new.rows < settings.min_new_rows:
        summary = (
            f"no retraining: {new.rows:,} new labelled rows since data version {version.md5}, "
            f"fewer than retrain.min_new_rows = {settings.min_new_rows:,}"
        )
        return {"outcome": NO_NEW_DATA, "summary": summary, "data_md5": version.md5}

    recorded, git_rev = record_step(loaded, version, table, new)
    for key, value in {
        "stemma.data.previous_md5": version.md5,
        "stemma.data.md5": recorded.md5,
        "stemma.data.git_rev": git_rev or "",
        "stemma.data.sources": json.dumps(new.sources),
        "stemma.shadow.batch": str(holdout.relative_to(loaded.root)) if holdout else "",
    }.items():
        client.set_tag(run_id, key, value)

    trained = train_flow(config=str(loaded.path), overrides=list(loaded.overrides))
    version_number = str(trained["model_version"])
    cause_tags = {"stemma.retrain.run_id": run_id, "stemma.cause.kind": why["kind"]}
    cause_tags.update({f"stemma.cause.{k}": v for k, v in why.items() if k != "kind" and v})
    for key, value in cause_tags.items():
        client.set_tag(trained["run_id"], key, value)
        client.set_model_version_tag(model_name, version_number, key, value)
    client.set_tag(run_id, "stemma.model.version", version_number)
    client.set_tag(run_id, "stemma.train.run_id", trained["run_id"])

    outcome: dict[str, Any] = {
        "data_md5": recorded.md5,
        "previous_data_md5": version.md5,
        "data_git_rev": git_rev,
        "new_rows": new.rows,
        "model_version": version_number,
        "train_run_id": trained["run_id"],
    }
    gate = trained["gate"]
    shadow_result: dict[str, Any] | None = None
    promoted = None
    if not gate["passed"]:
        outcome.update(
            outcome=GATE_FAILED,
            summary=f"retrained v{version_number} on {recorded.md5}: gate failed, nothing promoted",
        )
    elif gate.get("alias") == promotion.CHAMPION_ALIAS:
        outcome.update(
            outcome=PROMOTED,
            summary=f"retrained v{version_number}: no champion existed, the gate made it champion",
        )
    elif holdout is None:
        outcome.update(
            outcome=NOT_PROMOTED,
            summary=(
                f"retrained v{version_number} (challenger): no held-out labelled batch "
                "to shadow it on yet"
            ),
        )
    else:
        shadow_result = shadow_flow(
            config=str(loaded.path),
            overrides=list(loaded.overrides),
            challenger=f"models:/{model_name}/{version_number}",
            batch=str(holdout),
            labels=str(loaded.resolve(labels or settings.labels)),
            output=str(loaded.resolve(spec.score.output).parent / "shadow" / holdout.stem),
        )
        decision = shadow_result["decision"]
        client.set_tag(run_id, "stemma.shadow.run_id", shadow_result["run_id"])
        client.set_tag(run_id, "stemma.shadow.decision", decision)
        if shadow_result.get("promoted"):
            promoted = shadow_result.get("promotion")
        elif decision == "promote" and settings.promote == "shadow":
            record = promotion.promote(
                client,
                model_name,
                version_number,
                expected_champion=str(shadow_result["champion_version"]),
                reason=f"shadow evaluation {shadow_result['run_id']} decided promote",
                evidence={"shadow_run_id": shadow_result["run_id"], "retrain_run_id": run_id},
                flow_run_id=str(flow_run.get_id() or "") or None,
                experiment_id=client.get_run(run_id).info.experiment_id,
            )
            promoted = json.loads(record.to_json())
        if promoted:
            outcome.update(
                outcome=PROMOTED,
                summary=(
                    f"retrained v{version_number} on {recorded.md5}; shadow decided promote: "
                    f"v{version_number} is the champion"
                ),
            )
        else:
            reasons = "; ".join(shadow_result.get("reasons", [])[:2])
            outcome.update(
                outcome=NOT_PROMOTED,
                summary=f"retrained v{version_number}; shadow decided {decision}: {reasons}",
            )
    outcome["shadow"] = shadow_result
    outcome["promotion"] = promoted
    record = lineage.build_retrain_record(
        pipeline=spec.pipeline.name,
        run_id=run_id,
        cause=why,
        previous_data_md5=version.md5,
        data_md5=recorded.md5,
        data_pointer=str(recorded.dvc_file.relative_to(loaded.root)),
        train_run_id=trained["run_id"],
        model_name=model_name,
        model_version=version_number,
        shadow_run_id=shadow_result["run_id"] if shadow_result else None,
        decision=outcome["outcome"],
    )
    with mlflow.start_run(run_id=run_id):
        record_lineage(record)
    return outcome
