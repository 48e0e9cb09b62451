"""The compress flow: pruned and distilled variants of a registered model, gated and
registered with lineage.

The flow resolves the parent (``--model``, the spec's ``compress.model``, or the newest
version that passed its gate), refuses one that failed its gate or is itself a variant,
recomputes the splits it was trained on, and builds what ``compress.methods`` lists: a
structurally pruned copy (:mod:`~stemma.components.compression.pruning`) and a student
trained on its soft targets (:mod:`~stemma.components.compression.distillation`). Each is
measured against the parent through the model runtime and the standard latency probe,
gated on metric drop, speed-up and cost (:mod:`~stemma.components.compression.variants`),
and, when it passes, logged as a model of this run and registered as a variant of the
parent (alias ``v<parent>-prune`` / ``v<parent>-distill``) after it was loaded back and
gave the outputs that were measured. Variants named in ``compress.then_quantize`` are then
quantized in turn, so a distilled student can become an int8 student.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger

from stemma.components.compression import distillation, pruning
from stemma.components.compression.variants import (
    Candidate,
    CandidateResult,
    CompressComparison,
    Measured,
    measure_candidates,
    parameter_count,
)
from stemma.components.data.tables import dataset_source
from stemma.components.errors import CompressionError
from stemma.components.platform import lineage, metric_names, tags, tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.quantization import heldout as parents
from stemma.components.quantization import registering
from stemma.components.quantization.measure import heldout_labels
from stemma.components.registry.latency import state_variant_figures
from stemma.components.runtime.backends import set_threads
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.runtime.probe import LatencyProfile
from stemma.components.spec import CompressSpec, LoadedSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import (
    check_gate_metric,
    config_run_name,
    flow_run_id,
    load_spec_step,
    loaded_back_check,
    parent_reference,
    spec_architectures,
    step,
    tracked,
)

_run_name = config_run_name("compress")
#: The section the compress run's metrics and tables are logged under.
SECTION = metric_names.COMPRESS


@dataclass
class _Context:
    """What every step of one compress run shares."""

    loaded: LoadedSpec
    settings: CompressSpec
    model: ScoringModel
    parent: Any
    splits: parents.TrainingSplits
    metric: str
    arrays: dict[str, np.ndarray]
    git_rev: str | None
    reference: str

    @property
    def heldout(self) -> parents.HeldOut:
        return self.splits.heldout


@step(name="load parent model")
def load_parent_step(reference: str, loaded: LoadedSpec) -> tuple[ScoringModel, Any]:
    """The fp32 parent (files verified) and its registry entry; never a variant, never a
    version that failed its gate."""
    client = mlflow.MlflowClient()
    model = load_scoring_model(reference, client=client, architectures=spec_architectures(loaded))
    version = client.get_model_version(model.name, model.version)
    found = version.tags or {}
    if registering.is_variant(version):
        parent = found.get(registering.PARENT_VERSION_TAG, "?")
        raise CompressionError(
            f"{model.label} is itself a variant ({found.get(registering.METHOD_TAG)} of "
            f"v{parent}): nothing was compressed or registered",
            [f"compress its parent: --model models:/{model.name}/{parent}"],
        )
    decision = found.get(tags.GATE_DECISION)
    if decision != "passed":
        raise CompressionError(
            f"{model.label} did not pass its gate (gate decision: {decision or 'none recorded'}): "
            "a variant of it would be no better; nothing was compressed or registered",
            ["compress a version that passed its gate (stemma models list shows them)"],
        )
    return model, version


@step(name="recompute the splits")
def splits_step(version: Any, loaded: LoadedSpec) -> parents.TrainingSplits:
    return parents.training_splits(mlflow.MlflowClient(), version, loaded.root)


def _arrays(model: ScoringModel, splits: parents.TrainingSplits) -> dict[str, np.ndarray]:
    """The splits as the parent's preprocessor makes them (never refitted)."""
    preprocessor, target = model.preprocessor, splits.heldout.data.target
    heldout = splits.heldout.frame
    return {
        "x_train": preprocessor.transform(splits.train),
        "y_train": preprocessor.encode_target(splits.train, target),
        "x_val": preprocessor.transform(splits.validation),
        "y_val": preprocessor.encode_target(splits.validation, target),
        "x_test": preprocessor.transform(heldout),
        "y_test": heldout_labels(preprocessor, heldout[target], target),
    }


@step(name="prune")
def prune_step(context: _Context) -> Candidate:
    model, settings = context.model, context.settings
    result = pruning.prune_network(
        model.network,
        model.network_config,
        settings=settings.prune,
        train=context.loaded.spec.train,
        task=model.task,
        x_train=context.arrays["x_train"],
        y_train=context.arrays["y_train"],
        x_val=context.arrays["x_val"],
        y_val=context.arrays["y_val"],
        progress=False,
    )
    return Candidate(
        method="prune",
        network=result.network,
        config=dict(result.config),
        details={
            "criterion": settings.prune.criterion,
            "amount": settings.prune.amount,
            "steps": settings.prune.steps,
            "finetune_epochs": settings.prune.finetune_epochs,
            "layers": [asdict(layer) for layer in result.layers],
            "parameters_before": result.parameters_before,
            "parameters_after": result.parameters_after,
        },
        notes=tuple(result.notes),
    )


@step(name="distill")
def distill_step(
    context: _Context, production: np.ndarray | None, inputs: list[dict[str, str]]
) -> Candidate:
    model, settings = context.model, context.settings.distill
    config = distillation.student_config(settings.student, model.network_config)
    result = distillation.distill_network(
        model.runtime,
        config,
        n_inputs=model.preprocessor.n_inputs,
        n_outputs=model.preprocessor.n_outputs,
        settings=settings,
        train=context.loaded.spec.train,
        task=model.task,
        x_train=context.arrays["x_train"],
        y_train=context.arrays["y_train"],
        x_val=context.arrays["x_val"],
        y_val=context.arrays["y_val"],
        x_production=production,
        progress=False,
        parameters_teacher=parameter_count(model.network),
    )
    return Candidate(
        method="distill",
        network=result.network,
        config=dict(result.config),
        details={
            "student": config,
            "temperature": settings.temperature,
            "alpha": settings.alpha,
            "epochs": len(result.history),
            "rows": dict(result.rows),
            "production_inputs": inputs,
            "parameters_teacher": result.parameters_teacher,
            "parameters_student": result.parameters_student,
        },
        notes=tuple(result.notes),
    )


def _production_rows(context: _Context) -> tuple[np.ndarray | None, list[dict[str, str]]]:
    """The unlabelled production rows distillation adds, and a record of each file read."""
    batches = context.settings.distill.production_batches
    if "distill" not in context.settings.methods or not batches:
        return None, []
    paths = [context.loaded.resolve(batch) for batch in batches]
    matrix, inputs = distillation.read_production_rows(paths, context.model.preprocessor)
    return matrix, inputs


def _variant_tags(context: _Context, method: str, weights_sha256: str) -> dict[str, str]:
    model = context.model
    return {
        registering.METHOD_TAG: method,
        registering.PARENT_VERSION_TAG: model.version,
        registering.PARENT_WEIGHTS_TAG: model.weights_sha256,
        tags.DATA_MD5: context.heldout.md5,
        tags.WEIGHTS_SHA256: weights_sha256,
    }


@step(name="register variant", task_run_name="register {result.method}")
def register_step(
    context: _Context, result: CandidateResult, measured: Measured, run_id: str, workdir: Path
) -> tuple[CandidateResult, str]:
    """Log the candidate as a model of this run, register it, load it back and compare.

    Returns:
        The result with its version, and the sha256 of its weights.
    """
    from stemma.components.model.artifact import log_pyfunc_model

    client, model = mlflow.MlflowClient(), context.model
    candidate = measured.candidate
    info, weights_sha256 = log_pyfunc_model(
        preprocessor=model.preprocessor,
        network=candidate.network,
        network_config=candidate.config,
        input_example=context.heldout.frame[model.feature_columns],
        task=model.task,
        workdir=workdir,
        name=result.method,
        project_root=context.loaded.root,
    )
    verify = loaded_back_check(
        model, result.method, measured.runtime, context.arrays["x_test"], measured.outputs
    )
    registered = registering.register_variant(
        client=client,
        model_name=model.name,
        parent_version=model.version,
        method=result.method,
        model_uri=info.model_uri,
        run_id=run_id,
        tags=_variant_tags(context, result.method, weights_sha256),
        description=f"{result.method} variant of {model.label}: " + "; ".join(result.reasons),
        verify=verify,
    )
    number = str(registered.version)
    profile = LatencyProfile.from_dict(result.profile) if result.profile else None
    state_variant_figures(
        client, model.name, number, cost=context.loaded.spec.cost, profile=profile
    )
    return replace(result, version=number), weights_sha256


def _register_passing(
    context: _Context,
    comparison: CompressComparison,
    measured: dict[str, Measured],
    run: TrackedRun,
    workdir: Path,
) -> tuple[CompressComparison, dict[str, str]]:
    from stemma.components.model.artifact import weights_sha256

    weights: dict[str, str] = {}
    twins = _registered_variants(context)
    for result in comparison.candidates:
        if not result.passed:
            continue
        digest = weights_sha256(measured[result.method].candidate.network)
        twin = twins.get((result.method, digest))
        if twin is not None:  # a rerun of the same spec on the same data: the same weights
            comparison = comparison.with_result(_reuse(context, result, twin))
            weights[result.method] = digest
            continue
        registered, weights[result.method] = register_step(
            context, result, measured[result.method], run.run_id, workdir / result.method
        )
        comparison = comparison.with_result(registered)
    return comparison, weights


def _registered_variants(context: _Context) -> dict[tuple[str, str], str]:
    """The parent's registered variants by (method, weights sha256): their version."""
    found: dict[tuple[str, str], str] = {}
    client, model = mlflow.MlflowClient(), context.model
    for version in registering.model_versions(client, model.name):
        values = version.tags or {}
        if (
            values.get(registering.PARENT_VERSION_TAG) == model.version
            and values.get(registering.STATUS_TAG) == registering.STATUS_REGISTERED
            and values.get(tags.WEIGHTS_SHA256)
        ):
            key = (values.get(registering.METHOD_TAG, ""), values[tags.WEIGHTS_SHA256])
            found.setdefault(key, str(version.version))
    return found


def _reuse(context: _Context, result: CandidateResult, number: str) -> CandidateResult:
    """A passing candidate whose weights an earlier run registered: that version keeps its
    place (and gets the method's alias back); nothing new is registered."""
    model = context.model
    alias = registering.method_alias(model.version, result.method)
    mlflow.MlflowClient().set_registered_model_alias(model.name, alias, number)
    get_run_logger().info(
        "%s v%s already holds these %s weights: nothing new registered",
        model.name,
        number,
        result.method,
    )
    note = f"v{number} already holds these weights (registered by an earlier run): reused"
    return replace(result, version=number, existing=True, notes=(*result.notes, note))


def _record(
    context: _Context,
    run: TrackedRun,
    comparison: CompressComparison,
    candidates: list[Candidate],
    weights: dict[str, str],
) -> None:
    """The comparison table and plot, the metrics, and the lineage record of the run."""
    run.log_metrics(metric_names.in_section(SECTION, comparison.metrics()))
    frame = pd.DataFrame(comparison.table())
    mlflow.log_text(frame.to_csv(index=False), f"{SECTION}/comparison.csv")
    for candidate in candidates:
        mlflow.log_dict(candidate.details, f"{SECTION}/{candidate.method}.json")
    run.record_lineage(_lineage_record(context, run, comparison, candidates, weights))


def _lineage_record(
    context: _Context,
    run: TrackedRun,
    comparison: CompressComparison,
    candidates: list[Candidate],
    weights: dict[str, str],
) -> lineage.LineageRecord:
    """Parent, training data and production batches in; each registered variant out."""
    model, heldout = context.model, context.heldout
    parent = lineage.model_node_id(model.name, model.version)
    data = lineage.data_node_id(heldout.pointer(context.loaded.root), heldout.md5)
    node = lineage.run_node(run.run_id, run.experiment_id, flow_run_id())
    if context.git_rev:
        node = replace(node, attributes={**node.attributes, "git_rev": context.git_rev})
    nodes = [
        lineage.Node(
            "model_version", parent, f"sha256:{model.weights_sha256}", {"precision": "fp32"}
        ),
        lineage.Node("data_version", data, f"md5:{heldout.md5}", {"path": heldout.file_path}),
        node,
    ]
    edges = [lineage.Edge(parent, node.id, "input_of"), lineage.Edge(data, node.id, "trained_on")]
    details = {candidate.method: candidate.details for candidate in candidates}
    for item in details.get("distill", {}).get("production_inputs", []):
        batch = lineage.input_node_id(item["path"], f"md5:{item['md5']}")
        nodes.append(lineage.Node("input", batch, f"md5:{item['md5']}", dict(item)))
        edges.append(lineage.Edge(batch, node.id, "distilled_on"))
    for result in comparison.candidates:
        if result.version is None:
            continue
        variant = lineage.model_node_id(model.name, result.version)
        attributes = {"compression": result.method, "runtime": result.runtime}
        attributes["parameters"] = result.parameters
        nodes.append(
            lineage.Node("model_version", variant, f"sha256:{weights[result.method]}", attributes)
        )
        made = [] if result.existing else [lineage.Edge(node.id, variant, "produced")]
        edges += [
            *made,
            lineage.Edge(
                parent, variant, f"{'pruned' if result.method == 'prune' else 'distilled'}_to"
            ),
        ]
    registered = [r for r in comparison.candidates if r.version]
    decision = {
        "decision": "registered "
        + ", ".join(
            f"{r.method} v{r.version}" + (" (already, same weights)" if r.existing else "")
            for r in registered
        )
        if registered
        else "nothing registered",
        "metric": comparison.metric,
        "parent_value": comparison.parent_value,
        "parent_cost_per_million": comparison.parent_cost_per_million,
        "reasons": [
            f"{r.method}: {r.status}: " + "; ".join(r.reasons) for r in comparison.candidates
        ],
    }
    return lineage.LineageRecord(
        flow="compress",
        pipeline=context.loaded.spec.pipeline.name,
        nodes=nodes,
        edges=edges,
        created=lineage.created_stamp(),
        decision=decision,
        variants=[
            {key: value for key, value in asdict(r).items() if key != "profile"}
            for r in comparison.candidates
        ],
    )


def _prepare(loaded: LoadedSpec, model: str | None) -> _Context:
    """The parent, its splits, and the settings of the run; a pruning amount that would
    empty a layer is refused here, before anything is trained."""
    spec = loaded.spec
    settings = spec.compress or CompressSpec()
    if spec.compress is None:
        get_run_logger().info("the spec has no compress section: using its defaults")
    reference = parent_reference(loaded, model, settings.model)
    parent_model, parent = load_parent_step(reference, loaded)
    metric = check_gate_metric(loaded, parent_model)
    if "prune" in settings.methods:
        pruning.check_amount(parent_model.network, settings.prune.amount)
    splits = splits_step(parent, loaded)
    return _Context(
        loaded=loaded,
        settings=settings,
        model=parent_model,
        parent=parent,
        splits=splits,
        metric=metric,
        arrays=_arrays(parent_model, splits),
        git_rev=tracking.git_revision(loaded.root)[0],
        reference=reference,
    )


def _log_inputs(context: _Context, run: TrackedRun) -> None:
    """The settings as params, the training rows as the run's dataset, and the parent's
    resolved spec (so a variant's held-out rows can be recomputed like its parent's)."""
    settings, heldout, spec = context.settings, context.heldout, context.loaded.spec
    flat = pd.json_normalize(settings.model_dump(mode="json"), sep=".").iloc[0].to_dict()
    run.log_params({f"compress.{key}": str(value) for key, value in flat.items()})
    run.log_params({"compress.metric": context.metric, "compress.parent": context.reference})
    tracking.log_dataset(
        context.splits.train,
        name=f"{spec.pipeline.name}-train",
        source=dataset_source(heldout.version, context.loaded.root, context.git_rev),
        context="training",
        digest=heldout.md5,
        target=heldout.data.target,
    )
    with tempfile.TemporaryDirectory(prefix="stemma-compress-spec-") as scratch:
        path = mlflow.MlflowClient().download_artifacts(
            context.parent.run_id, parents.RESOLVED_SPEC_ARTIFACT, scratch
        )
        mlflow.log_artifact(path, str(Path(parents.RESOLVED_SPEC_ARTIFACT).parent))


def _build(context: _Context) -> list[Candidate]:
    production, inputs = _production_rows(context)
    candidates = []
    for method in context.settings.methods:
        if method == "prune":
            candidates.append(prune_step(context))
        else:
            candidates.append(distill_step(context, production, inputs))
    return candidates


def _summary(
    context: _Context, comparison: CompressComparison, run: TrackedRun, **extra: Any
) -> dict[str, Any]:
    model = context.model
    return {
        "run_id": run.run_id,
        "model_name": model.name,
        "parent_version": model.version,
        "reference": context.reference,
        "metric": comparison.metric,
        "parent_value": comparison.parent_value,
        "parent_parameters": comparison.parent_parameters,
        "parent_cost_per_million": comparison.parent_cost_per_million,
        "baseline_runtime": comparison.baseline_runtime,
        "currency": comparison.currency,
        "machine": comparison.machine,
        "metric_drop_limit": comparison.metric_drop_limit,
        "min_speedup": comparison.min_speedup,
        "min_cost_reduction": comparison.min_cost_reduction,
        "variants": [
            {key: value for key, value in asdict(r).items() if key != "profile"}
            for r in comparison.candidates
        ],
        "table": comparison.table(),
        "notes": list(comparison.notes),
        **extra,
    }


def _quantize_variants(
    config: str, overrides: list[str], context: _Context, comparison: CompressComparison
) -> list[dict[str, Any]]:
    """Quantize each registered variant ``compress.then_quantize`` names, in turn."""
    from stemma.flows.quantize import quantize_flow

    done = []
    quantized = {
        (version.tags or {}).get(registering.PARENT_VERSION_TAG)
        for version in registering.model_versions(mlflow.MlflowClient(), context.model.name)
    }
    for result in comparison.candidates:
        if result.existing and result.version in quantized:
            continue  # a reused variant whose quantized variants an earlier run made
        if result.version and result.method in context.settings.then_quantize:
            reference = f"models:/{context.model.name}/{result.version}"
            summary = quantize_flow(config=config, overrides=overrides, model=reference)
            done.append({"method": result.method, "version": result.version, **summary})
    return done


def _compare_family(
    config: str, overrides: list[str], context: _Context, comparison: CompressComparison
) -> dict[str, Any] | None:
    """When a variant was registered: one comparison of the parent with every variant of
    it (earlier ones and quantized students too), which aliases the cheapest."""
    from stemma.flows.compare import compare_flow

    if not any(result.version for result in comparison.candidates):
        return None
    reference = f"models:/{context.model.name}/{context.model.version}"
    summary = compare_flow(config=config, overrides=overrides, model=reference)
    keys = ("run_id", "cheapest", "cheapest_alias", "alias_name", "table")
    return {key: summary[key] for key in keys}


@flow(name="compress", flow_run_name=_run_name, validate_parameters=True)
def compress_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Prune and distill a registered model, gate the variants and register those that pay.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `compress.prune.amount=0.3`.
        model: `models:/<name>@<alias>` or `models:/<name>/<version>` (default: the spec's
            `compress.model`, else the newest version that passed its gate).

    Returns:
        A summary: the run, the parent, the comparison table and the registered variants.
    """
    overrides = list(overrides or [])
    loaded = load_spec_step(config, overrides)
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(loaded.spec.pipeline.experiment_name, loaded.root)
    set_threads(1)  # every network is timed on one thread, as batch scoring runs each batch
    context = _prepare(loaded, model)
    name = context.model.name
    for number in registering.remove_abandoned_variants(mlflow.MlflowClient(), name):
        get_run_logger().warning(
            "removed %s v%s, left half-registered by a killed run", name, number
        )
    run_tags = {tags.MODEL_VERSION: context.model.version, tags.DATA_MD5: context.heldout.md5}
    with (
        tracked(loaded, "compress", experiment_id, record_lineage, None, run_tags) as run,
        tempfile.TemporaryDirectory(prefix="stemma-compress-") as tmp,
    ):
        _log_inputs(context, run)
        candidates = _build(context)
        model_ = context.model
        comparison, measured = measure_candidates(
            model_.network,
            candidates,
            x=context.arrays["x_test"],
            y=context.arrays["y_test"],
            preprocessor=model_.preprocessor,
            task=model_.task,
            metric=context.metric,
            threshold=model_.threshold,
            settings=context.settings,
            machine=loaded.spec.cost.machine("scoring"),
            currency=loaded.spec.cost.currency,
            workdir=Path(tmp) / "measure",
        )
        comparison, weights = _register_passing(
            context, comparison, measured, run, Path(tmp) / "register"
        )
        _record(context, run, comparison, candidates, weights)
    quantized = _quantize_variants(config, overrides, context, comparison)
    compared = _compare_family(config, overrides, context, comparison)
    return _summary(
        context,
        comparison,
        run,
        quantized=quantized,
        compared=compared,
        illustrative_prices=loaded.spec.cost.illustrative,
        tracking_uri=redact_url(tracking_uri),
    )
