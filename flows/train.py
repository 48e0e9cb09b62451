"""The training flow: data version → checks → split → train → evaluate → register → gate.

The flow wires components into Prefect tasks, names the run, and records lineage. Each
step that can fail on bad input raises a :class:`~stemma.components.errors.StemmaError`;
the MLflow run is then marked FAILED with the reason in its tags, and nothing is
registered. An interrupted run leaves its per-epoch checkpoint and MLflow run id under
``.stemma/checkpoints/``; running the same spec on the same data again resumes both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from prefect import flow, get_run_logger

from stemma.components.data import checks
from stemma.components.data import tables as data
from stemma.components.data.tables import dataset_source
from stemma.components.errors import DataCheckError, SpecError, StemmaError
from stemma.components.model import artifact, networks
from stemma.components.monitoring import profile as reference_profile
from stemma.components.platform import lineage, metric_names, tags, tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.refs import format_model_ref
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.registry import gate as judging
from stemma.components.registry import gate as registry
from stemma.components.registry import latency
from stemma.components.spec import LoadedSpec, MonitorSpec, flatten, load_spec
from stemma.components.training import steps as training
from stemma.components.training.loop import TrainResult
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import config_location, config_run_name, flow_run_id, step, tracked

#: Rows of the test split logged with the model as its input example.
INPUT_EXAMPLE_ROWS = 5
#: The reference profile's artifact path in the training run.
PROFILE_ARTIFACT = f"{reference_profile.PROFILE_RUN_DIR}/{reference_profile.PROFILE_FILE}"
#: Params of a training run naming its spec file and the command line's overrides (runs
#: of older Stemma versions carry them as the tags ``stemma.config.path``, ``stemma.overrides``).
CONFIG_PATH_PARAM = "config.path"
OVERRIDES_PARAM = "config.overrides"

_run_name = config_run_name("train")


@dataclass(frozen=True)
class Setup:
    """What the flow knows before its MLflow run starts."""

    loaded: LoadedSpec
    version: data.DataVersion
    folder: Path  # the checkpoint folder of this spec on this data
    resumed_run: str | None
    registered: Any  # the version a resumed run had registered already, or None
    git_rev: str | None
    git_dirty: bool


@step(name="load spec")
def load_spec_step(config: str, overrides: list[str]) -> LoadedSpec:
    """The full spec check, including building each expectation with GX itself."""
    loaded = load_spec(config_location(config), overrides)
    problems = checks.deep_expectation_problems(loaded.spec.checks)
    if problems:
        raise SpecError(
            f"{config}: {len(problems)} expectation problem(s)",
            [f"checks[{index}]: {message}" for index, message in problems],
        )
    return loaded


@step(name="resolve data version")
def resolve_data_step(loaded: LoadedSpec) -> data.DataVersion:
    return data.resolve_data_version(loaded.root, loaded.resolve(loaded.spec.data.path))


@step(name="load table")
def load_table_step(loaded: LoadedSpec, version: data.DataVersion) -> pd.DataFrame:
    return data.load_table(version.file_path, loaded.spec.data)


@step(name="check data")
def check_data_step(
    loaded: LoadedSpec, frame: pd.DataFrame, docs: Path, run: str
) -> checks.ValidationReport:
    """Run the spec's expectations and build their Data Docs in ``docs`` (when GX can),
    naming the data file and the run that checked it."""
    spec = loaded.spec
    report = checks.validate_table(frame, spec.checks, suite_name=f"{spec.pipeline.name}-train")
    try:
        checks.build_data_docs(report, docs, asset=spec.data.path, run=run)
    except Exception as error:  # docs are a view of the result, which is logged anyway
        get_run_logger().warning("could not build Data Docs: %s", error)
    return report


@step(name="split and preprocess")
def prepare_step(loaded: LoadedSpec, frame: pd.DataFrame) -> training.PreparedData:
    return training.prepare_data(loaded.spec, frame)


@step(name="train network")
def train_step(
    loaded: LoadedSpec, prepared: training.PreparedData, checkpoint_dir: Path, run_id: str
) -> TrainResult:
    def log_epoch(row: dict) -> None:
        tracking.log_epoch(training.epoch_metrics(row), step=int(row["epoch"]))

    result = training.fit_network(loaded.spec, prepared, checkpoint_dir, log_epoch)
    if result.resumed_from_epoch is not None:
        # A run killed after an epoch's checkpoint but before its metrics reached MLflow
        # resumes past that epoch: log what the run is missing from the restored history.
        history = mlflow.MlflowClient().get_metric_history(run_id, metric_names.TRAIN_LOSS)
        for row in training.missing_epochs(result, (m.step for m in history)):
            log_epoch(row)
    return result


@step(name="evaluate")
def evaluate_step(
    loaded: LoadedSpec, prepared: training.PreparedData, result: TrainResult, plots: Path
) -> dict[str, float]:
    return training.evaluate(loaded.spec, prepared, result, plots)


@step(name="log model")
def log_model_step(
    loaded: LoadedSpec, prepared: training.PreparedData, result: TrainResult, workdir: Path
) -> tuple[Any, str]:
    spec = loaded.spec
    return artifact.log_pyfunc_model(
        preprocessor=prepared.preprocessor,
        network=result.network,
        network_config=networks.network_config(spec.model),
        input_example=prepared.test_frame[spec.data.features.all].head(INPUT_EXAMPLE_ROWS),
        task=spec.data.task,
        workdir=workdir / "model",
        project_root=loaded.root,
    )


@step(name="profile reference")
def profile_step(
    loaded: LoadedSpec,
    frame: pd.DataFrame,
    prepared: training.PreparedData,
    result: TrainResult,
    metrics: dict[str, float],
    version: data.DataVersion,
    path: Path,
) -> str:
    """Write the reference profile drift monitoring compares batches with; its sha256.

    Features and labels are profiled on the whole training table; the scores on the test
    split, which the model never trained on.
    """
    settings = loaded.spec.monitor or MonitorSpec()
    source = {"data_md5": version.md5, "file": version.relpath}
    built = reference_profile.build_reference_profile(
        frame,
        loaded.spec.data,
        scores=training.scores_on_test_split(prepared, result),
        performance=metrics,
        bins=settings.bins,
        sample_size=settings.sample_size,
        source={**source, "rows": prepared.rows, "scores": "test split"},
        preprocessor=prepared.preprocessor,
    )
    return reference_profile.write_profile(built, path)


@step(name="register and gate")
def gate_step(
    loaded: LoadedSpec,
    prepared: training.PreparedData,
    metrics: dict[str, float],
    model_uri: str,
    facts: lineage.TrainingLineage,
) -> tuple[Any, registry.GateDecision]:
    spec = loaded.spec
    client = mlflow.MlflowClient()
    decision = judging.judge_candidate(
        client,
        spec,
        metrics[spec.gate.metric],
        prepared.test_frame,
        networks.allowed_architectures(spec.model),
    )
    version = registry.register_and_gate(
        client=client,
        model_name=spec.pipeline.registered_model_name,
        model_uri=model_uri,
        run_id=facts.run_id,
        decision=decision,
        tags=registry.version_tags(facts),
        description=f"Trained by Stemma pipeline '{spec.pipeline.name}' on data {facts.data_md5}.",
    )
    return version, decision


@step(name="complete registration")
def complete_registration_step(
    loaded: LoadedSpec, existing: Any, facts: lineage.TrainingLineage
) -> tuple[Any, registry.GateDecision]:
    """Finish the version this run registered before it was interrupted; register nothing."""
    return registry.complete_registration(
        client=mlflow.MlflowClient(),
        version=existing,
        task=loaded.spec.data.task,
        tags=registry.version_tags(facts),
    )


@step(name="time version")
def latency_step(
    loaded: LoadedSpec, prepared: training.PreparedData, version: Any, run_id: str
) -> latency.VersionLatency:
    """Time the registered version as scoring runs it, and state its latency and cost; a
    failed probe is recorded and logged, never raised."""
    timed = latency.record_version_latency(
        mlflow.MlflowClient(),
        version.name,
        str(version.version),
        run_id=run_id,
        x=prepared.x_test,
        cost=loaded.spec.cost,
        architectures=networks.allowed_architectures(loaded.spec.model),
    )
    if timed.error:
        get_run_logger().warning("no latency figures for this version: %s", timed.error)
    return timed


def _setup(loaded: LoadedSpec) -> Setup:
    """The data version, and the interrupted run (and its version) this run resumes."""
    logger = get_run_logger()
    version = resolve_data_step(loaded)
    folder = training.checkpoint_folder(loaded, version.md5)
    client = mlflow.MlflowClient()
    resumed_run = training.resumable_run_id(folder, client)
    registered = None
    if resumed_run:
        logger.info("resuming MLflow run %s from %s", resumed_run, folder)
        # One training run gives at most one version, wherever the last attempt stopped.
        model_name = loaded.spec.pipeline.registered_model_name
        registered = registry.find_run_version(client, model_name, resumed_run)
        if registered is not None:
            logger.info(
                "run %s already registered %s v%s: completing it",
                resumed_run,
                registered.name,
                registered.version,
            )
    git_rev, git_dirty = tracking.git_revision(loaded.root)
    return Setup(loaded, version, folder, resumed_run, registered, git_rev, git_dirty)


def _log_checks(run: TrackedRun, report: checks.ValidationReport, docs: Path, path: str) -> None:
    """Log the checks' result and Data Docs; stop the flow when an expectation failed."""
    run.log_dict(report.result_json, "checks/validation_result.json")
    if docs.is_dir():
        run.log_artifacts(docs, "checks/data_docs")
    evaluated, failed = len(report.outcomes), len(report.failures)
    run.log_metrics(
        {metric_names.DATA_CHECKS_EVALUATED: evaluated, metric_names.DATA_CHECKS_FAILED: failed}
    )
    if not report.success:
        raise DataCheckError(
            f"{path}: {failed} of {evaluated} expectations failed; nothing was trained",
            [
                *report.render_failure(),
                f"full result and Data Docs: artifacts under checks/ of MLflow run {run.run_id}",
            ],
        )


def _log_model(
    setup: Setup, run: TrackedRun, frame: pd.DataFrame, trained: tuple, workdir: Path
) -> tuple[Any, str, str, dict[str, str]]:
    """Log the model and its reference profile; model info, weights and profile hashes,
    and the digests of what was logged."""
    loaded, prepared, result, metrics = setup.loaded, *trained
    model_info, weights_sha256 = log_model_step(loaded, prepared, result, workdir)
    profile = workdir / PROFILE_ARTIFACT
    profile_sha256 = profile_step(loaded, frame, prepared, result, metrics, setup.version, profile)
    run.log_artifacts(profile.parent, reference_profile.PROFILE_RUN_DIR)
    client = mlflow.MlflowClient()
    reference_profile.save_with_model(client, model_info.model_id, profile, profile_sha256)
    digests = {
        **lineage.artifact_digests(workdir / "model", "model"),
        **lineage.artifact_digests(profile.parent, reference_profile.PROFILE_RUN_DIR),
    }
    return model_info, weights_sha256, profile_sha256, digests


def _facts(setup: Setup, run: TrackedRun, report: Any, weights: str, logged: dict) -> Any:
    loaded, version = setup.loaded, setup.version
    return lineage.TrainingLineage(
        pipeline=loaded.spec.pipeline.name,
        data_pointer=str(version.dvc_file.relative_to(loaded.root)),
        data_md5=version.md5,
        data_path=str(version.out_path.relative_to(loaded.root)),
        file_path=version.relpath,
        file_md5=version.file_md5,
        git_rev=setup.git_rev,
        git_dirty=setup.git_dirty,
        validation_digest=report.digest,
        validation_success=report.success,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        config_path=str(loaded.path),
        config_sha256=training.file_sha256(loaded.path),
        model_name=loaded.spec.pipeline.registered_model_name,
        weights_sha256=weights,
        artifacts=logged,
        code_sha256=artifact.code_sha256(artifact.carried_code(logged, "model/code")),
    )


def _train_and_evaluate(setup: Setup, run: TrackedRun, workdir: Path) -> tuple:
    """Checks, split, train, evaluate: the frame, the check report and ``(prepared,
    result, metrics)``."""
    loaded, version = setup.loaded, setup.version
    spec = loaded.spec
    # The spec file and the command line are the run's inputs: params, not tags (the
    # record's run node holds the file's path and sha256 too).
    run.log_params(
        {
            **flatten(spec),
            CONFIG_PATH_PARAM: str(loaded.path),
            OVERRIDES_PARAM: json.dumps(list(loaded.overrides)),
        }
    )
    run.log_text(
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec/resolved.yaml"
    )
    frame = load_table_step(loaded, version)
    report = check_data_step(loaded, frame, workdir / "data_docs", f"mlflow-run-{run.run_id}")
    _log_checks(run, report, workdir / "data_docs", spec.data.path)
    tracking.log_dataset(
        frame,
        name=f"{spec.pipeline.name}-train",
        source=dataset_source(version, loaded.root, setup.git_rev),
        context="training",
        digest=version.md5,
    )
    prepared = prepare_step(loaded, frame)
    run.log_params({f"rows.{key}": value for key, value in prepared.rows.items()})
    result = train_step(loaded, prepared, setup.folder, run.run_id)
    params, numbers = training.epoch_params(result)
    run.log_params(params)
    run.log_metrics(numbers)
    metrics = evaluate_step(loaded, prepared, result, workdir / "plots")
    run.log_metrics(metric_names.in_section(metric_names.TEST, metrics))
    run.log_artifacts(workdir / "plots", "plots")
    return frame, report, (prepared, result, metrics)


def _tracked_training(setup: Setup, run: TrackedRun, workdir: Path) -> dict[str, Any]:
    """Everything inside the MLflow run; the summary's facts."""
    frame, report, trained = _train_and_evaluate(setup, run, workdir)
    logged = {
        **lineage.artifact_digests(workdir / "plots", "plots"),
        **lineage.artifact_digests(workdir / "data_docs", "checks/data_docs"),
    }
    if setup.registered is None:
        model_info, weights, profile_sha256, model_digests = _log_model(
            setup, run, frame, trained, workdir
        )
    else:  # the model and its profile are in the registry already: reuse them
        weights, profile_sha256, model_digests = judging.registered_model_facts(
            mlflow.MlflowClient(), setup.registered, PROFILE_ARTIFACT
        )
    facts = _facts(setup, run, report, weights, {**logged, **model_digests})
    if setup.registered is None:
        prepared, _, metrics = trained
        version, decision = gate_step(setup.loaded, prepared, metrics, model_info.model_uri, facts)
    else:
        version, decision = complete_registration_step(setup.loaded, setup.registered, facts)
    timed = latency_step(setup.loaded, trained[0], version, run.run_id)
    # the run keeps the verdict to filter on; the fields and reasons are in its record
    run.set_tags({tags.GATE_DECISION: decision.tags()[tags.GATE_DECISION]})
    run.log_metrics({metric_names.GATE_PASSED: 1.0 if decision.passed else 0.0})
    client = mlflow.MlflowClient()
    reference_profile.tag_model_version(client, version.name, version.version, profile_sha256)
    facts = replace(facts, model_version=str(version.version))
    run.set_tags({**lineage.run_tags(facts), tags.WEIGHTS_SHA256: weights})
    run.record_lineage(replace(lineage.build_training_record(facts), decision=decision.record()))
    return {
        "version": version,
        "decision": decision,
        "metrics": trained[2],
        "weights": weights,
        "latency": {"figures": timed.figures, "error": timed.error},
    }


def _quantize(config: str, overrides: list[str], model_uri: str) -> dict[str, Any]:
    """The spec's optional quantize step: a subflow with its own MLflow run. The model stays
    registered whatever the step finds."""
    from stemma.flows.quantize import quantize_flow

    try:
        return quantize_flow(config=config, overrides=overrides, model=model_uri)
    except StemmaError as error:
        get_run_logger().warning("quantize step failed: %s", error.headline)
        return {"error": error.render()}


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
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    setup = _setup(loaded)
    run: TrackedRun | None = None
    try:
        with (
            tracked(loaded, "train", experiment_id, record_lineage, setup.resumed_run) as run,
            tempfile.TemporaryDirectory(prefix="stemma-train-") as tmp,
        ):
            training.remember_run(setup.folder, run.run_id)
            done = _tracked_training(setup, run, Path(tmp))
    except BaseException:
        if run is not None and not run.resumable:
            shutil.rmtree(setup.folder, ignore_errors=True)
        raise
    shutil.rmtree(setup.folder, ignore_errors=True)
    version, decision = done["version"], done["decision"]
    quantized = None
    if spec.quantize is not None and spec.quantize.enabled and decision.passed:
        model_uri = format_model_ref(spec.pipeline.registered_model_name, version=version.version)
        quantized = _quantize(config, list(overrides or []), model_uri)
    page = tracking.run_page_url(tracking_uri, run.experiment_id, run.run_id)
    where = (
        f"open the run: {page}"
        if page
        else f"browse it with `mlflow ui --backend-store-uri {tracking_uri}` or `stemma up`"
    )
    return {
        "quantize": quantized,
        "run_id": run.run_id,
        "experiment": spec.pipeline.experiment_name,
        "tracking_uri": redact_url(tracking_uri),
        "model_name": spec.pipeline.registered_model_name,
        "model_version": str(version.version),
        "data_md5": setup.version.md5,
        "weights_sha256": done["weights"],
        "metrics": done["metrics"],
        "resumed": setup.resumed_run is not None,
        "gate": {**asdict(decision), "reasons": list(decision.reasons)},
        "latency": done["latency"],
        "ui_hint": redact_url(where),
    }
