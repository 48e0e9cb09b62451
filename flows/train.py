"""The training flow: data version → checks → split → train → evaluate → register → gate.

The flow wires components into Prefect tasks, names the run, and records lineage. Each
step that can fail on bad input raises a :class:`~stemma.components.errors.StemmaError`;
the MLflow run is then marked FAILED with the reason in its tags, and nothing is
registered. An interrupted run leaves its per-epoch checkpoint and MLflow run id under
``.stemma/checkpoints/``; running the same spec on the same data again resumes both.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stemma.components.data import checks
from stemma.components.data import tables as data
from stemma.components.errors import DataCheckError, DataError, SpecError, StemmaError
from stemma.components.lineage import records as lineage
from stemma.components.model import networks
from stemma.components.model import preprocessing as features
from stemma.components.monitoring import profile as reference_profile
from stemma.components.platform import tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.registry import gate as registry
from stemma.components.scoring import engine as scoring
from stemma.components.spec import LoadedSpec, MonitorSpec, flatten, load_spec
from stemma.components.training import loop as training
from stemma.components.training import metrics as evaluation
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import config_run_name

#: Rows of the test split logged with the model as its input example.
INPUT_EXAMPLE_ROWS = 5


_run_name = config_run_name("train")


@task(name="load spec")
def load_spec_step(config: str, overrides: list[str]) -> LoadedSpec:
    """The full spec check, including building each expectation with GX itself."""
    loaded = load_spec(config, overrides)
    problems = checks.deep_expectation_problems(loaded.spec.checks)
    if problems:
        raise SpecError(
            f"{config}: {len(problems)} expectation problem(s)",
            [f"checks[{index}]: {message}" for index, message in problems],
        )
    return loaded


@task(name="resolve data version")
def resolve_data_step(loaded: LoadedSpec) -> data.DataVersion:
    return data.resolve_data_version(loaded.root, loaded.resolve(loaded.spec.data.path))


@task(name="load table")
def load_table_step(loaded: LoadedSpec, version: data.DataVersion) -> pd.DataFrame:
    return data.load_table(version.file_path, loaded.spec.data)


@task(name="check data")
def check_data_step(
    loaded: LoadedSpec, frame: pd.DataFrame, workdir: Path
) -> checks.ValidationReport:
    """Run the spec's expectations; log the result and Data Docs; stop on failure."""
    spec = loaded.spec
    report = checks.validate_table(frame, spec.checks, suite_name=f"{spec.pipeline.name}-train")
    mlflow.log_dict(report.result_json, "checks/validation_result.json")
    try:
        index = checks.build_data_docs(report, workdir / "data_docs")
        mlflow.log_artifacts(str(index.parent), "checks/data_docs")
    except Exception as error:  # docs are a view of the result, which is logged already
        get_run_logger().warning("could not build Data Docs: %s", error)
    evaluated = len(report.outcomes)
    failed = len(report.failures)
    mlflow.log_metrics({"checks_evaluated": evaluated, "checks_failed": failed})
    mlflow.set_tags(
        {
            "stemma.checks.digest": report.digest,
            "stemma.checks.success": str(report.success).lower(),
        }
    )
    if not report.success:
        raise DataCheckError(
            f"{spec.data.path}: {failed} of {evaluated} expectations failed; nothing was trained",
            [
                *report.render_failure(),
                f"full result and Data Docs: artifacts under checks/ of MLflow run {mlflow.active_run().info.run_id}",
            ],
        )
    return report


@task(name="split and preprocess")
def prepare_step(loaded: LoadedSpec, frame: pd.DataFrame) -> dict[str, Any]:
    spec = loaded.spec
    train_frame, valid_frame, test_frame = data.split_table(frame, spec.data.split)
    if spec.data.task == "binary":
        for name, part in (
            ("training", train_frame),
            ("validation", valid_frame),
            ("test", test_frame),
        ):
            classes = part[spec.data.target].nunique()
            if classes < 2:
                raise DataError(
                    f"{spec.data.path}: the {name} split holds only one class of {spec.data.target!r}",
                    ["add rows of the other class or change data.split (fractions, seed)"],
                )
    preprocessor = features.fit_preprocessor(
        train_frame, spec.data.features, task=spec.data.task, target=spec.data.target
    )
    arrays = {
        "x_train": preprocessor.transform(train_frame),
        "y_train": preprocessor.encode_target(train_frame, spec.data.target),
        "x_valid": preprocessor.transform(valid_frame),
        "y_valid": preprocessor.encode_target(valid_frame, spec.data.target),
        "x_test": preprocessor.transform(test_frame),
    }
    return {
        "preprocessor": preprocessor,
        "test_frame": test_frame,
        "rows": {
            "train": len(train_frame),
            "validation": len(valid_frame),
            "test": len(test_frame),
        },
        **arrays,
    }


@task(name="train network")
def train_step(
    loaded: LoadedSpec, prepared: dict[str, Any], checkpoint_dir: Path
) -> training.TrainResult:
    spec = loaded.spec
    config = networks.network_config(spec.model)
    network = networks.build_network(
        config, prepared["preprocessor"].n_inputs, 1, seed=spec.train.seed
    )

    def log_epoch(row: dict) -> None:
        tracking.log_epoch(row, step=int(row["epoch"]))

    if spec.train.distributed is not None:
        from stemma.components.training.distributed import train_distributed

        # torchrun runs only the loop; MLflow stays here, fed the epochs rank 0 reports.
        result = train_distributed(
            network,
            prepared["x_train"],
            prepared["y_train"],
            prepared["x_valid"],
            prepared["y_valid"],
            train=spec.train,
            task=spec.data.task,
            network_config=config,
            checkpoint_dir=checkpoint_dir,
            on_epoch=log_epoch,
        )
    else:
        result = training.train_network(
            network,
            prepared["x_train"],
            prepared["y_train"],
            prepared["x_valid"],
            prepared["y_valid"],
            train=spec.train,
            task=spec.data.task,
            checkpoint_dir=checkpoint_dir,
            on_epoch=log_epoch,
        )
    if result.resumed_from_epoch is not None:
        # A run killed after an epoch's checkpoint but before its metrics reached MLflow
        # resumes past that epoch: log what the run is missing from the restored history.
        run_id = mlflow.active_run().info.run_id
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
        for row in result.history:
            if int(row["epoch"]) not in logged:
                log_epoch(row)
    return result


@task(name="evaluate")
def evaluate_step(
    loaded: LoadedSpec, prepared: dict[str, Any], result: training.TrainResult, workdir: Path
) -> dict[str, float]:
    spec = loaded.spec
    preprocessor = prepared["preprocessor"]
    scores = preprocessor.decode_output(training.predict_raw(result.network, prepared["x_test"]))
    y_true = prepared["test_frame"][spec.data.target].to_numpy(dtype=np.float64)
    metrics = evaluation.evaluate_scores(spec.data.task, y_true, scores)
    mlflow.log_metrics({f"test_{name}": value for name, value in metrics.items()})
    plots = workdir / "plots"
    evaluation.plot_evaluation(spec.data.task, y_true, scores, plots)
    evaluation.plot_history(result.history, plots / "training_history.png")
    mlflow.log_artifacts(str(plots), "plots")
    return metrics


@task(name="log model")
def log_model_step(
    loaded: LoadedSpec, prepared: dict[str, Any], result: training.TrainResult, workdir: Path
) -> tuple[Any, str]:
    spec = loaded.spec
    example = prepared["test_frame"][spec.data.features.all].head(INPUT_EXAMPLE_ROWS)
    return tracking.log_pyfunc_model(
        preprocessor=prepared["preprocessor"],
        network=result.network,
        network_config=networks.network_config(spec.model),
        input_example=example,
        task=spec.data.task,
        workdir=workdir / "model",
    )


@task(name="profile reference")
def profile_step(
    loaded: LoadedSpec,
    frame: pd.DataFrame,
    prepared: dict[str, Any],
    result: training.TrainResult,
    metrics: dict[str, float],
    source: dict[str, Any],
    workdir: Path,
) -> tuple[Path, str]:
    """The reference profile drift monitoring compares batches with, logged with the run.

    Features and labels are profiled on the whole training table; the scores on the test
    split, which the model never trained on.
    """
    spec = loaded.spec
    settings = spec.monitor or MonitorSpec()
    preprocessor = prepared["preprocessor"]
    scores = preprocessor.decode_output(training.predict_raw(result.network, prepared["x_test"]))
    built = reference_profile.build_reference_profile(
        frame,
        spec.data,
        scores=scores,
        performance=metrics,
        bins=settings.bins,
        sample_size=settings.sample_size,
        source={**source, "rows": prepared["rows"], "scores": "test split"},
    )
    path = workdir / reference_profile.PROFILE_RUN_DIR / reference_profile.PROFILE_FILE
    sha256 = reference_profile.write_profile(built, path)
    mlflow.log_artifact(str(path), reference_profile.PROFILE_RUN_DIR)
    return path, sha256


@task(name="register and gate")
def gate_step(
    loaded: LoadedSpec,
    prepared: dict[str, Any],
    metrics: dict[str, float],
    model_uri: str,
    run_id: str,
    lineage_facts: lineage.TrainingLineage,
) -> tuple[Any, registry.GateDecision]:
    spec = loaded.spec
    client = mlflow.MlflowClient()
    model_name = spec.pipeline.registered_model_name
    champion = registry.find_champion(client, model_name)
    scored = registry.ChampionValue(None, None)
    if champion is not None:
        y_true = prepared["test_frame"][spec.data.target].to_numpy(dtype=np.float64)
        scored = registry.champion_value_on(
            f"models:/{model_name}/{champion.version}",
            prepared["test_frame"],
            y_true,
            task=spec.data.task,
            metric=spec.gate.metric,
            architectures=networks.allowed_architectures(spec.model),
            client=client,
        )
    decision = registry.decide_gate(
        spec.gate,
        spec.data.task,
        metrics[spec.gate.metric],
        str(champion.version) if champion is not None else None,
        scored.value,
        champion_error=scored.error,
        champion_untrusted=scored.untrusted,
    )
    version = registry.register_and_gate(
        client=client,
        model_name=model_name,
        model_uri=model_uri,
        run_id=run_id,
        decision=decision,
        tags=lineage.model_version_tags(lineage_facts),
        description=f"Trained by Stemma pipeline '{spec.pipeline.name}' on data {lineage_facts.data_md5}.",
    )
    mlflow.set_tags({f"{key}": value for key, value in decision.tags().items()})
    mlflow.log_metric("gate_passed", 1.0 if decision.passed else 0.0)
    return version, decision


@task(name="complete registration")
def complete_registration_step(
    loaded: LoadedSpec, existing: Any, lineage_facts: lineage.TrainingLineage
) -> tuple[Any, registry.GateDecision]:
    """Finish the version this run registered before it was interrupted; register nothing."""
    client = mlflow.MlflowClient()
    version, decision = registry.complete_registration(
        client=client,
        version=existing,
        task=loaded.spec.data.task,
        tags=lineage.model_version_tags(lineage_facts),
    )
    mlflow.set_tags(decision.tags())
    mlflow.log_metric("gate_passed", 1.0 if decision.passed else 0.0)
    return version, decision


def _registered_model_facts(existing: Any) -> tuple[str, str, dict[str, str]]:
    """Weights hash, profile hash and model artifact digests of a version already registered."""
    client = mlflow.MlflowClient()
    model_id = scoring.logged_model_id(existing)
    logged = client.get_logged_model(model_id).tags if model_id else {}
    tags = {**logged, **(existing.tags or {})}
    manifest = tracking.decode_manifest(tags.get(tracking.MODEL_FILES_TAG)) or {}
    artifacts = {
        f"model/{Path(path).name}": digest
        for path, digest in manifest.items()
        if path.startswith("artifacts/")
    }
    profile_file = f"{reference_profile.PROFILE_RUN_DIR}/{reference_profile.PROFILE_FILE}"
    profile_sha256 = tags.get(reference_profile.PROFILE_SHA256_TAG, "")
    if profile_sha256:
        artifacts[profile_file] = profile_sha256
    return (
        tags.get("stemma.weights.sha256") or tags.get("stemma.weights_sha256", ""),
        profile_sha256,
        artifacts,
    )


def checkpoint_folder(loaded: LoadedSpec, data_md5: str) -> Path:
    """Where an interrupted run of this exact spec on this exact data keeps its state."""
    fingerprint = hashlib.sha256(
        json.dumps(
            {"spec": loaded.spec.model_dump(mode="json"), "data": data_md5}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    return loaded.root / ".stemma" / "checkpoints" / f"{loaded.spec.pipeline.name}-{fingerprint}"


def _resumable_run_id(folder: Path) -> str | None:
    marker = folder / "mlflow_run.json"
    if not marker.exists():
        return None
    run_id = json.loads(marker.read_text()).get("run_id")
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # the store was reset or the run deleted: start afresh
        return None
    return run_id if run.info.lifecycle_stage == "active" else None


@flow(name="train", flow_run_name=_run_name, validate_parameters=True)
def train_flow(
    config: str = "configs/credit.yaml", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Train, evaluate, register and gate the model a Stemma spec describes.

    Args:
        config: path of the pipeline spec (YAML), relative to the working directory.
        overrides: `section.key=value` overrides, e.g. `train.epochs=3`.

    Returns:
        A summary: run id, model version, gate decision and the numbers behind it.
    """
    logger = get_run_logger()
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)

    version = resolve_data_step(loaded)
    folder = checkpoint_folder(loaded, version.md5)
    resumed_run = _resumable_run_id(folder)
    registered = None
    if resumed_run:
        logger.info("resuming MLflow run %s from %s", resumed_run, folder)
        # One training run gives at most one version, wherever the last attempt stopped.
        registered = registry.find_run_version(
            mlflow.MlflowClient(), spec.pipeline.registered_model_name, resumed_run
        )
        if registered is not None:
            logger.info(
                "run %s already registered %s v%s: completing it",
                resumed_run,
                registered.name,
                registered.version,
            )
    git_rev, git_dirty = tracking.git_revision(loaded.root)
    config_sha256 = hashlib.sha256(loaded.path.read_bytes()).hexdigest()

    run = mlflow.start_run(
        run_id=resumed_run,
        experiment_id=None if resumed_run else experiment_id,
        run_name=None if resumed_run else flow_run.get_name(),
    )
    run_id = run.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mlflow_run.json").write_text(json.dumps({"run_id": run_id}))
    try:
        with tempfile.TemporaryDirectory(prefix="stemma-train-") as tmp:
            workdir = Path(tmp)
            mlflow.set_tags(
                {
                    "stemma.pipeline": spec.pipeline.name,
                    "stemma.flow": "train",
                    "stemma.prefect.flow_run_id": str(flow_run.get_id() or ""),
                    "stemma.config.path": str(loaded.path),
                    "stemma.config.sha256": config_sha256,
                    "stemma.overrides": json.dumps(list(loaded.overrides)),
                    "stemma.status": "running",
                }
            )
            tracking.log_params_flat(flatten(spec))
            mlflow.log_text(
                yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec/resolved.yaml"
            )
            frame = load_table_step(loaded, version)
            report = check_data_step(loaded, frame, workdir)
            tracking.log_dataset(
                frame,
                name=f"{spec.pipeline.name}-train",
                source=tracking.DVCDatasetSource.from_version(version, loaded.root, git_rev),
                context="training",
                digest=version.md5,
            )
            prepared = prepare_step(loaded, frame)
            mlflow.log_params({f"rows.{key}": value for key, value in prepared["rows"].items()})
            result = train_step(loaded, prepared, folder)
            mlflow.log_params(
                {"resolved.device": result.device, "resolved.precision": result.precision}
            )
            mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": len(result.history)})
            metrics = evaluate_step(loaded, prepared, result, workdir)
            logged = {
                **lineage.artifact_digests(workdir / "plots", "plots"),
                **lineage.artifact_digests(workdir / "data_docs", "checks/data_docs"),
            }
            if registered is None:
                model_info, weights_sha256 = log_model_step(loaded, prepared, result, workdir)
                profile_path, profile_sha256 = profile_step(
                    loaded,
                    frame,
                    prepared,
                    result,
                    metrics,
                    {"data_md5": version.md5, "file": version.relpath},
                    workdir,
                )
                reference_profile.save_with_model(
                    mlflow.MlflowClient(), model_info.model_id, profile_path, profile_sha256
                )
                logged.update(lineage.artifact_digests(workdir / "model", "model"))
                logged.update(
                    lineage.artifact_digests(profile_path.parent, reference_profile.PROFILE_RUN_DIR)
                )
            else:  # the model and its profile are in the registry already: reuse them
                weights_sha256, profile_sha256, model_digests = _registered_model_facts(registered)
                logged.update(model_digests)
            facts = lineage.TrainingLineage(
                pipeline=spec.pipeline.name,
                data_pointer=str(version.dvc_file.relative_to(loaded.root)),
                data_md5=version.md5,
                data_path=str(version.out_path.relative_to(loaded.root)),
                file_path=version.relpath,
                file_md5=version.file_md5,
                git_rev=git_rev,
                git_dirty=git_dirty,
                validation_digest=report.digest,
                validation_success=report.success,
                run_id=run_id,
                experiment_id=run.info.experiment_id,
                flow_run_id=str(flow_run.get_id() or "") or None,
                config_path=str(loaded.path),
                config_sha256=config_sha256,
                model_name=spec.pipeline.registered_model_name,
                weights_sha256=weights_sha256,
                artifacts=logged,
            )
            if registered is None:
                model_version, decision = gate_step(
                    loaded, prepared, metrics, model_info.model_uri, run_id, facts
                )
            else:
                model_version, decision = complete_registration_step(loaded, registered, facts)
            reference_profile.tag_model_version(
                mlflow.MlflowClient(), model_version.name, model_version.version, profile_sha256
            )
            facts = lineage.TrainingLineage(
                **{**asdict(facts), "model_version": str(model_version.version)}
            )
            mlflow.set_tags({**lineage.run_tags(facts), "stemma.weights.sha256": weights_sha256})
            record_lineage(lineage.build_training_record(facts))
            mlflow.set_tag("stemma.status", "completed")
    except BaseException as error:
        interrupted = tracking.end_run_after(error)
        if not interrupted:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    mlflow.end_run(status="FINISHED")
    shutil.rmtree(folder, ignore_errors=True)
    # The spec's optional quantize step, for a model that passed its gate: a subflow with
    # its own MLflow run. The model stays registered whatever the step finds.
    quantized: dict[str, Any] | None = None
    if spec.quantize is not None and spec.quantize.enabled and decision.passed:
        from stemma.flows.quantize import quantize_flow

        try:
            quantized = quantize_flow(
                config=config,
                overrides=list(overrides or []),
                model=f"models:/{spec.pipeline.registered_model_name}/{model_version.version}",
            )
        except StemmaError as error:
            logger.warning("quantize step failed: %s", error.headline)
            quantized = {"error": error.render()}
    return {
        "quantize": quantized,
        "run_id": run_id,
        "experiment": spec.pipeline.experiment_name,
        "tracking_uri": redact_url(tracking_uri),
        "model_name": spec.pipeline.registered_model_name,
        "model_version": str(model_version.version),
        "data_md5": version.md5,
        "weights_sha256": weights_sha256,
        "metrics": metrics,
        "resumed": resumed_run is not None,
        "gate": {**asdict(decision), "reasons": list(decision.reasons)},
        "ui_hint": redact_url(
            f"open {tracking_uri} in a browser"
            if tracking_uri.startswith(("http://", "https://"))
            else f"browse it with `mlflow ui --backend-store-uri {tracking_uri}` or `stemma up`"
        ),
    }
