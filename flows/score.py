"""The batch-scoring flow: a registered model scores a file or folder of rows, in chunks.

The flow resolves the model (the champion by default), checks the input's columns against
the model's signature before reading a row, streams the input through the scoring engine
(parts written atomically, a `_SUCCESS` manifest last, resumable), and records the run in
MLflow: the input as a dataset with its digest, the manifest and its hash, row counts,
throughput, latency percentiles and the score distribution, which drift monitoring reuses
(for a multiclass model, the predicted class's probability, and the rows per predicted class).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.events import emit_event

from stemma.components.data.tables import dataset_source, resolve_data_version
from stemma.components.errors import DataVersionError
from stemma.components.platform import lineage, locks, metric_names, tags, tracking
from stemma.components.platform.deployments import BATCH_SCORED_EVENT, pipeline_resource_id
from stemma.components.platform.describe import NOTE_TAG
from stemma.components.platform.redaction import redact_url
from stemma.components.quantization import registering as quantization
from stemma.components.scoring import engine as scoring
from stemma.components.scoring import fanout
from stemma.components.scoring.cost import ScoringCost, scoring_cost
from stemma.components.scoring.output import default_output_dir, refuse_another_input
from stemma.components.spec import LoadedSpec
from stemma.components.training import metrics as evaluation
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

#: The alias scored when neither the command line nor the spec names a model.
DEFAULT_ALIAS = "champion"


#: Tags of a scoring run: what it scores (model, input, output, settings) and the process
#: scoring it, so that a run left RUNNING by a process that died is found on the next start.
SCORING_KEY_TAG = tags.SCORE_KEY
OWNER_TAG = tags.SCORE_OWNER

_run_name = config_run_name("score")


@step(name="check input schema")
def check_schema_step(
    files: list[Path], model: scoring.ScoringModel, loaded: LoadedSpec
) -> list[str]:
    return scoring.check_input_schema(
        files,
        model,
        id_column=loaded.spec.data.id,
        extra_columns=loaded.spec.score.extra_columns,
    )


@step(name="score")
def score_step(
    model: scoring.ScoringModel, files: list[Path], output: Path, loaded: LoadedSpec
) -> scoring.ScoringResult:
    return scoring.score_files(model, files, output, **scoring_options(loaded))


@step(name="plan scoring")
def plan_step(
    model: scoring.ScoringModel, files: list[Path], output: Path, loaded: LoadedSpec
) -> scoring.ScoringPlan:
    options = scoring_options(loaded)
    del options["threads"]  # each range's task sets its own
    return scoring.plan_scoring(model, files, output, **options)


@step(
    name="score chunk range",
    task_run_name="score file {chunk_range.file_index} from chunk {chunk_range.first_chunk}",
)
def score_range_step(
    job: fanout.ScoringJob, chunk_range: scoring.ChunkRange
) -> scoring.RangeResult:
    return fanout.score_job_range(job, chunk_range)


@flow(name="score fan-out", validate_parameters=False)
def fan_out_flow(
    job: fanout.ScoringJob, ranges: list[scoring.ChunkRange]
) -> list[scoring.RangeResult]:
    """Score each range of chunks as a task of its own, on the flow's task runner (Dask)."""
    from prefect.futures import wait

    futures = [score_range_step.submit(job, chunk_range) for chunk_range in ranges]
    # Every range runs to its end even when one fails: its parts are kept for the next
    # run, and no task is left writing into the folder once the flow has stopped.
    wait(futures)
    return [future.result() for future in futures]


@step(name="write manifest")
def finish_step(
    model: scoring.ScoringModel, plan: scoring.ScoringPlan, results: list[scoring.RangeResult]
) -> scoring.ScoringResult:
    return scoring.finish_scoring(model, plan, results)


def score_on_dask(
    model: scoring.ScoringModel, files: list[Path], output: Path, loaded: LoadedSpec
) -> scoring.ScoringResult:
    """Plan here, score the ranges on a Dask cluster, write the manifest here."""
    from prefect_dask import DaskTaskRunner

    settings = loaded.spec.score.dask
    plan = plan_step(model, files, output, loaded)  # holds the folder's lock for the job
    if plan.complete:
        return scoring.finish_scoring(model, plan, [])
    try:
        job = fanout.make_job(
            model,
            plan,
            tracking_uri=mlflow.get_tracking_uri(),
            registry_uri=mlflow.get_registry_uri(),
        )
        ranges = scoring.plan_ranges(plan, settings.chunks_per_task)
        runner = DaskTaskRunner(**fanout.task_runner_options(settings))
        results = fan_out_flow.with_options(task_runner=runner)(job, ranges)
    except BaseException:
        scoring.abandon_scoring(plan)  # the parts stay for the next run
        raise
    return finish_step(model, plan, results)


def scoring_key(
    model: scoring.ScoringModel, files: list[Path], output: Path, loaded: LoadedSpec
) -> str:
    """What a scoring run scores, hashed: the model, the input files (path, size, mtime),
    the output folder and the settings. Cheap: the input is not read."""
    document = {
        "model_uri": model.model_uri,
        "weights_sha256": model.weights_sha256,
        "input": [
            [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files
        ],
        "output": str(output.resolve()),
        "options": {k: v for k, v in scoring_options(loaded).items() if k != "threads"},
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def resumable_run(experiment_id: str, key: str) -> tuple[str | None, int]:
    """The run a killed process left RUNNING for this scoring, and how often it was resumed.

    A RUNNING scoring run whose process is gone from this host is resumed when it scored
    the same thing (``key``), so the scoring keeps one run however often it is restarted;
    any other such run is ended as KILLED, with the reason in ``stemma.error``. Runs of
    live processes, or of other hosts, are left alone.
    """
    client = mlflow.MlflowClient()
    left_running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tags.FLOW}` = 'score' and attributes.status = 'RUNNING'",
    )
    resumed, resumes = None, 0
    for orphan in left_running:
        try:
            owner = locks.ProcessIdentity(**json.loads(orphan.data.tags[OWNER_TAG]))
        except (KeyError, TypeError, ValueError):
            continue  # not recorded: nothing tells whether its process runs
        if owner.is_alive() is not False:
            continue
        if resumed is None and orphan.data.tags.get(SCORING_KEY_TAG) == key:
            resumed = orphan.info.run_id
            resumes = int(orphan.data.tags.get(tags.SCORE_RESUMES, "0")) + 1
            continue
        reason = (
            f"its process (pid {owner.pid} on host {owner.host}) stopped before the scoring "
            "finished"
        )
        client.set_tag(orphan.info.run_id, tags.STATUS, "killed")
        client.set_tag(orphan.info.run_id, tags.ERROR, reason)
        client.set_terminated(orphan.info.run_id, status="KILLED")
    return resumed, resumes


def model_reference(loaded: LoadedSpec, override: str | None) -> str:
    """The model to score with: the command line's, the spec's, or the champion."""
    return (
        override
        or loaded.spec.score.model
        or f"models:/{loaded.spec.pipeline.registered_model_name}@{DEFAULT_ALIAS}"
    )


def _input_source(loaded: LoadedSpec, path: Path, git_rev: str | None) -> Any:
    """A DVC source when DVC versions the input (and the bytes match), else the local path."""
    try:
        version = resolve_data_version(loaded.root, path)
    except DataVersionError:
        return str(path), None
    return dataset_source(version, loaded.root, git_rev), version


@dataclass(frozen=True)
class Scoring:
    """What a scoring flow run scores: the model, the input and where the output goes."""

    loaded: LoadedSpec
    model: scoring.ScoringModel
    files: list[Path]
    extras: list[str]
    input_path: Path
    output_path: Path
    serving: str | None
    own_output: bool = False


def prepare_scoring(
    loaded: LoadedSpec, input: str | None, output: str | None, model: str | None
) -> Scoring:
    """Resolve the model (a served variant with ``quantize.serve``), list the input files
    and check their columns against the model's signature."""
    logger = get_run_logger()
    spec = loaded.spec
    reference, serving = quantization.served_reference(
        spec.quantize,
        model_reference(loaded, model),
        explicit=model is not None,
        compress=spec.compress,
    )
    if serving:
        logger.info(serving)
    scoring_model = load_model_step(reference, loaded)
    input_path = loaded.resolve(input or spec.score.input)
    files = scoring.input_files(input_path)
    extras = check_schema_step(files, scoring_model, loaded)
    if extras:
        logger.info("ignoring input columns the model does not use: %s", ", ".join(extras))
    full = loaded.resolve(spec.score.output)
    # Another input than score.input, no folder named: a folder of its own beside it.
    derived = loaded.resolve(default_output_dir(full, loaded.resolve(spec.score.input), input_path))
    own_output = output is None and derived != full
    if own_output:
        refuse_another_input(derived, files)
        logger.info("scoring %s into a folder of its own: %s", input_path.name, derived)
    return Scoring(
        loaded=loaded,
        model=scoring_model,
        files=files,
        extras=extras,
        input_path=input_path,
        output_path=loaded.resolve(output) if output else derived,
        serving=serving,
        own_output=own_output,
    )


def run_tags(job: Scoring, key: str, resumes: int) -> dict[str, str]:
    """The scoring run's tags: the model version, and what finds it again if killed (the
    model's URI, weights hash and backend, and the runner, are in its lineage record)."""
    return {
        tags.MODEL_VERSION: job.model.version,
        SCORING_KEY_TAG: key,
        OWNER_TAG: json.dumps(asdict(locks.ProcessIdentity.current())),
        **({tags.SCORE_RESUMES: str(resumes)} if resumes else {}),
    }


def log_scoring(run: Any, job: Scoring, result: scoring.ScoringResult, cost: ScoringCost) -> None:
    """Log the input dataset, the numbers (its CPU time and cost among them), the manifest
    and the score distribution (and, for a multiclass model, the rows predicted per class)."""
    manifest = result.manifest
    git_rev, _ = tracking.git_revision(job.loaded.root)
    source, _ = _input_source(job.loaded, job.input_path, git_rev)
    tracking.log_dataset_reference(
        name=f"{job.loaded.spec.pipeline.name}-batch",
        source=source,
        context="scoring",
        digest=manifest["input"]["digest"],
        columns=dict(job.model.signature_columns),
    )
    latency = {f"chunk_latency_ms_{key}": value for key, value in result.chunk_latency_ms.items()}
    predicted = {
        f"rows_predicted.{evaluation.metric_safe(str(item['class']))}": item["rows"]
        for item in result.prediction_counts
    }
    run.log_metrics(
        metric_names.in_section(
            metric_names.SCORE,
            {
                "rows_input": result.rows_input,
                "rows_scored": result.rows_scored,
                "rows_rejected": result.rows_rejected,
                "rows_per_second": result.rows_per_second,
                "seconds": result.seconds,
                "parts_written": result.parts_written,
                "parts_skipped": result.parts_skipped,
                **latency,
                **predicted,
                **cost.metrics(),
            },
        )
    )
    recorded = run.client.get_run(run.run_id).data.params
    # a resumed run keeps the params it has: MLflow refuses to change one
    run.log_params({k: v for k, v in cost.params().items() if k not in recorded})
    histogram = result.score_histogram
    run.log_dict(manifest, "output/_SUCCESS.json")
    run.log_dict(histogram, "scores/distribution.json")
    if result.prediction_counts:
        run.log_dict({"predictions": result.prediction_counts}, "scores/predictions.json")
    # A multiclass model's score is the probability of the class it predicts.
    scores = "Predicted-class probabilities" if job.model.task == "multiclass" else "Scores"
    with tempfile.TemporaryDirectory(prefix="stemma-score-") as tmp:
        plot = evaluation.plot_score_histogram(
            histogram["edges"],
            histogram["counts"],
            Path(tmp) / "histogram.png",
            title=f"{scores} of {job.model.label} on {job.input_path.name}",
        )
        mlflow.log_artifact(str(plot), "scores")


def record_scoring(run: Any, job: Scoring, result: scoring.ScoringResult) -> lineage.ScoringLineage:
    """Record the scoring's lineage and its input and output tags."""
    manifest, root, model = result.manifest, job.loaded.root, job.model
    git_rev, _ = tracking.git_revision(root)
    _, version = _input_source(job.loaded, job.input_path, git_rev)
    facts = lineage.ScoringLineage(
        pipeline=job.loaded.spec.pipeline.name,
        input_path=relative(job.input_path, root),
        input_digest=manifest["input"]["digest"],
        input_files={item["path"]: item["md5"] for item in manifest["input"]["files"]},
        data_pointer=str(version.dvc_file.relative_to(root)) if version else None,
        data_md5=version.md5 if version else None,
        model_name=model.name,
        model_version=model.version,
        weights_sha256=model.weights_sha256,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        output_path=relative(job.output_path, root),
        manifest_sha256=result.output_digest,
        parts={part["name"]: part["sha256"] for part in manifest["parts"]},
        rows_scored=result.rows_scored,
        rows_rejected=result.rows_rejected,
        model_reference=model.reference,
        backend=model.runtime.backend,
        runner=job.loaded.spec.score.runner,
    )
    run.record_lineage(lineage.build_scoring_record(facts))
    # The paths and the project's data version are in the record; the digests are what
    # `stemma lineage` searches for.
    run.set_tags({tags.INPUT_DIGEST: facts.input_digest, tags.OUTPUT_SHA256: facts.manifest_sha256})
    return facts


def emit_scored(job: Scoring, facts: lineage.ScoringLineage, run_id: str) -> None:
    """Tell Prefect a batch was scored: the monitor deployment's trigger listens for it."""
    name, model = job.loaded.spec.pipeline.name, job.model
    emit_event(
        event=BATCH_SCORED_EVENT,
        resource={"prefect.resource.id": pipeline_resource_id(name), "prefect.resource.name": name},
        related=[
            {
                "prefect.resource.id": f"mlflow.model-version.{model.name}.{model.version}",
                "prefect.resource.role": "model",
            }
        ],
        payload={
            "input": facts.input_path,
            "input_digest": facts.input_digest,
            "output": facts.output_path,
            "model": model.model_uri,
            "run_id": run_id,
            "rows_scored": facts.rows_scored,
        },
    )


def describe_cost(run: Any, cost: ScoringCost) -> None:
    """Add the cost line to the run's description (rendered from its lineage record)."""
    if run.document is not None:
        run.set_tags({NOTE_TAG: run.description(run.document) + f"\n{cost.line}\n"})


def flow_summary(
    job: Scoring,
    result: scoring.ScoringResult,
    run_id: str,
    tracking_uri: str,
    cost: ScoringCost,
) -> dict[str, Any]:
    """What the flow returns: run id, model version, row counts, throughput, the digest,
    and the CPU time and cost."""
    return {
        "run_id": run_id,
        "tracking_uri": redact_url(tracking_uri),
        "model_uri": job.model.model_uri,
        "model_version": job.model.version,
        "output": str(job.output_path),
        "own_output": job.own_output,
        "manifest": str(result.manifest_path),
        "output_digest": result.output_digest,
        "rows": {
            "input": result.rows_input,
            "scored": result.rows_scored,
            "rejected": result.rows_rejected,
        },
        "rows_per_second": result.rows_per_second,
        "backend": result.backend,
        "prediction_counts": result.prediction_counts,
        "already_complete": result.already_complete,
        "resumed_parts": result.parts_skipped,
        "extra_columns": list(job.extras),
        "serving": job.serving,
        "summary": result.summary(),
        "cost": asdict(cost),
    }


@flow(name="score", flow_run_name=_run_name, validate_parameters=True)
def score_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    input: str | None = None,
    output: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Score a batch with a registered model and record what was read and written.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `score.chunk_rows=100000`.
        input: file or folder to score (default: the spec's `score.input`).
        output: folder for the parts and manifest (default: the spec's `score.output` for
            its `score.input`; for another input, `<score.output>-<input name>` beside it,
            so that scoring one file never replaces the full scoring's parts).
        model: `models:/<name>@<alias>` or `models:/<name>/<version>` (default: the spec's
            `score.model`, else the pipeline's champion).

    Returns:
        A summary: run id, model version, row counts, throughput and the output digest.
    """
    loaded = load_spec_step(config, list(overrides or []))
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(loaded.spec.pipeline.experiment_name, loaded.root)
    job = prepare_scoring(loaded, input, output, model)
    key = scoring_key(job.model, job.files, job.output_path, loaded)
    resumed, resumes = resumable_run(experiment_id, key)
    extra = run_tags(job, key, resumes)
    with tracked(loaded, "score", experiment_id, record_lineage, resumed, extra) as run:
        if loaded.spec.score.runner == "dask":
            result = score_on_dask(job.model, job.files, job.output_path, loaded)
        else:
            result = score_step(job.model, job.files, job.output_path, loaded)
        cost = scoring_cost(result, loaded.spec.cost)
        log_scoring(run, job, result, cost)
        facts = record_scoring(run, job, result)
        describe_cost(run, cost)
    emit_scored(job, facts, run.run_id)
    return flow_summary(job, result, run.run_id, tracking_uri, cost)
