"""The quantize flow: variants of a registered fp32 model, measured against it and gated.

The flow resolves the fp32 model (``--model``, the spec's ``quantize.model``, or the
newest version that passed its gate), recomputes the held-out rows it was gated on,
builds and measures every variant the spec's ``quantize`` section lists
(:func:`~stemma.components.quantization.measure.compare_variants`), registers the ones
that clear both the metric-drop and the speed-up bars, and records everything in one
tracked MLflow run: metrics per variant, the comparison table, the trade-off plot and a
lineage record linking the parent to each variant.
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

from stemma.components.data.tables import dataset_source
from stemma.components.errors import RegistryError
from stemma.components.model.artifact import ONNX_SHA256_TAG
from stemma.components.model.quantized import METHODS, QuantizedNetwork
from stemma.components.platform import metric_names, tags, tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.quantization import heldout as parents
from stemma.components.quantization import registering, report
from stemma.components.quantization.measure import (
    compare_variants,
    heldout_labels,
    variant_runtime,
)
from stemma.components.quantization.results import Comparison, VariantResult
from stemma.components.registry.latency import state_variant_figures
from stemma.components.runtime.backends import set_threads
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.scoring.pipeline import FORWARD_BATCH_ROWS
from stemma.components.spec import COMPRESS_METHODS, LoadedSpec, QuantizeSpec
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

_run_name = config_run_name("quantize")


@dataclass
class _Context:
    """What every step of one quantize run shares."""

    loaded: LoadedSpec
    settings: QuantizeSpec
    model: ScoringModel
    parent: Any
    heldout: parents.HeldOut
    metric: str
    x: np.ndarray
    batch_rows: int
    git_rev: str | None
    reference: str


@step(name="load fp32 model")
def load_parent_step(reference: str, loaded: LoadedSpec) -> tuple[ScoringModel, Any]:
    """The fp32 model (files verified) and its registry entry; never a variant."""
    client = mlflow.MlflowClient()
    model = load_scoring_model(reference, client=client, architectures=spec_architectures(loaded))
    version = client.get_model_version(model.name, model.version)
    found = version.tags or {}
    # A pruned or distilled variant is a dense fp32 network: it may be quantized in turn.
    if (
        registering.is_variant(version)
        and found.get(registering.METHOD_TAG) not in COMPRESS_METHODS
    ):
        parent = found.get(registering.PARENT_VERSION_TAG, "?")
        raise RegistryError(
            f"{model.label} is itself a quantized variant "
            f"({found.get(registering.METHOD_TAG)} of v{parent})",
            [f"quantize its fp32 parent: --model models:/{model.name}/{parent}"],
        )
    return model, version


@step(name="recompute held-out rows")
def heldout_step(version: Any, loaded: LoadedSpec) -> parents.HeldOut:
    return parents.heldout_rows(mlflow.MlflowClient(), version, loaded.root)


@step(name="build and measure variants")
def measure_step(
    context: _Context, y: np.ndarray, workdir: Path
) -> tuple[Comparison, dict[str, QuantizedNetwork]]:
    model = context.model
    return compare_variants(
        model.network,
        model.preprocessor,
        context.x,
        y,
        task=model.task,
        metric=context.metric,
        threshold=model.threshold,
        settings=context.settings,
        batch_rows=context.batch_rows,
        workdir=workdir,
    )


def _variant_tags(context: _Context, result: VariantResult) -> dict[str, str]:
    """The variant's tags (``tags.VERSION_TAGS["variant"]``). Its numbers, reasons and the
    commit are in this run's lineage record; the run is the version's ``run_id``."""
    model = context.model
    return {
        registering.METHOD_TAG: result.method,
        registering.PARENT_VERSION_TAG: model.version,
        registering.PARENT_WEIGHTS_TAG: model.weights_sha256,
        tags.DATA_MD5: context.heldout.md5,
    }


@step(name="register variant", task_run_name="register {result.method}")
def register_step(
    context: _Context,
    result: VariantResult,
    variant: QuantizedNetwork,
    parent_files: dict[str, Any],
    run_id: str,
    workdir: Path,
) -> tuple[VariantResult, str, str | None]:
    """Log the variant as a model, register it, load it back and compare its outputs.

    Returns:
        The result with its version, the sha256 of its weights and of its ONNX graph (None
        for a torchao variant).
    """
    client, model = mlflow.MlflowClient(), context.model
    info, weights_sha256 = registering.log_variant_model(
        variant=variant,
        parent_files=parent_files,
        parent={"version": model.version, "weights_sha256": model.weights_sha256},
        input_example=context.heldout.frame[model.feature_columns],
        workdir=workdir,
    )
    measured = variant_runtime(variant, context.x.shape[1])
    expected = measured.run(context.x)

    verify = loaded_back_check(model, result.method, measured, context.x, expected)
    registered = registering.register_variant(
        client=client,
        model_name=model.name,
        parent_version=model.version,
        method=result.method,
        model_uri=info.model_uri,
        run_id=run_id,
        tags={
            **_variant_tags(context, result),
            tags.WEIGHTS_SHA256: weights_sha256,
        },
        description=f"{result.method} variant of {model.label} ({METHODS[result.method]}): "
        + "; ".join(result.reasons),
        verify=verify,
    )
    graph = (registered.tags or {}).get(ONNX_SHA256_TAG)
    state_variant_figures(
        client,
        model.name,
        str(registered.version),
        cost=context.loaded.spec.cost,
        runtime=measured,
        x=context.x,
    )
    return replace(result, version=str(registered.version)), weights_sha256, graph


def _register_passing(
    context: _Context,
    comparison: Comparison,
    built: dict[str, QuantizedNetwork],
    run: TrackedRun,
    workdir: Path,
) -> tuple[Comparison, dict[str, str], dict[str, str]]:
    """Register every passing variant.

    Returns:
        The comparison with their version numbers, and the sha256 of each one's weights
        and ONNX graph, by method.
    """
    weights: dict[str, str] = {}
    graphs: dict[str, str] = {}
    passing = [result for result in comparison.variants if result.passed]
    if not passing:
        return comparison, weights, graphs
    model = context.model
    parent_files = parents.download_model_files(
        mlflow.MlflowClient(), model.name, model.version, workdir / "parent"
    )
    for result in passing:
        registered, weights[result.method], graph = register_step(
            context,
            result,
            built[result.method],
            parent_files,
            run.run_id,
            workdir / "variants" / result.method,
        )
        comparison = comparison.with_variant(registered)
        if graph:
            graphs[result.method] = graph
    return comparison, weights, graphs


def _log_comparison(run: TrackedRun, comparison: Comparison, title: str, workdir: Path) -> None:
    """Metrics per variant, the table (JSON via log_table, and CSV) and the trade-off plot."""
    run.log_metrics(metric_names.in_section(metric_names.QUANTIZE, comparison.metrics()))
    frame = pd.DataFrame(comparison.table())
    mlflow.log_text(frame.to_csv(index=False), "quantize/comparison.csv")
    try:
        mlflow.log_table(data=frame, artifact_file="quantize/comparison.json")
    except Exception as error:  # the CSV holds the same rows
        get_run_logger().warning("could not log the comparison with log_table: %s", error)
    plot = report.plot_tradeoff(comparison, workdir / "tradeoff.png", title=title)
    mlflow.log_artifact(str(plot), "quantize")


def _record(
    context: _Context,
    run: TrackedRun,
    comparison: Comparison,
    weights: dict[str, str],
    graphs: dict[str, str],
) -> str | None:
    """Alias the fastest passing variant, tag the parent, log the comparison and lineage."""
    client, model = mlflow.MlflowClient(), context.model
    served = registering.update_served_alias(client, model.name, model.version, comparison)
    summary = registering.summary_tag(comparison, run.run_id, served)
    client.set_model_version_tag(model.name, model.version, registering.SUMMARY_TAG, summary)
    title = f"{model.label}: variants vs fp32 ({context.batch_rows} rows a run)"
    with tempfile.TemporaryDirectory(prefix="stemma-quantize-plot-") as folder:
        _log_comparison(run, comparison, title, Path(folder))
    record = report.build_quantize_record(
        pipeline=context.loaded.spec.pipeline.name,
        model_name=model.name,
        parent_version=model.version,
        parent_weights_sha256=model.weights_sha256,
        heldout=context.heldout,
        root=context.loaded.root,
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        flow_run_id=flow_run_id(),
        comparison=comparison,
        variant_weights=weights,
        variant_graphs=graphs,
        git_rev=context.git_rev,
    )
    run.record_lineage(record)
    registered = ",".join(f"{v.method}=v{v.version}" for v in comparison.variants if v.version)
    run.set_tags({tags.QUANTIZE_REGISTERED: registered})
    return served


def _prepare(loaded: LoadedSpec, model: str | None) -> _Context:
    """The fp32 parent, its held-out rows and the settings of the run."""
    spec = loaded.spec
    settings = spec.quantize or QuantizeSpec()
    if spec.quantize is None:
        get_run_logger().info("the spec has no quantize section: using its defaults")
    set_threads(settings.threads)  # the threads every run is timed with, set once
    reference = parent_reference(loaded, model, settings.model)
    parent_model, parent = load_parent_step(reference, loaded)
    metric = check_gate_metric(loaded, parent_model)
    heldout = heldout_step(parent, loaded)
    return _Context(
        loaded=loaded,
        settings=settings,
        model=parent_model,
        parent=parent,
        heldout=heldout,
        metric=metric,
        x=parent_model.preprocessor.transform(heldout.frame),
        batch_rows=settings.batch_rows or min(spec.score.chunk_rows, FORWARD_BATCH_ROWS),
        git_rev=tracking.git_revision(loaded.root)[0],
        reference=reference,
    )


def _run_tags(context: _Context) -> dict[str, str]:
    # The model's URI, reference and weights hash and the commit are in the lineage record.
    return {tags.MODEL_VERSION: context.model.version, tags.DATA_MD5: context.heldout.md5}


def _log_inputs(context: _Context, run: TrackedRun) -> None:
    """The settings as params, and the held-out rows as the run's evaluation dataset."""
    settings, heldout, spec = context.settings, context.heldout, context.loaded.spec
    run.log_params(
        {
            **{f"quantize.{k}": str(v) for k, v in settings.model_dump(mode="json").items()},
            "quantize.batch_rows.resolved": str(context.batch_rows),
            "quantize.metric": context.metric,
        }
    )
    tracking.log_dataset(
        heldout.frame,
        name=f"{spec.pipeline.name}-test",
        source=dataset_source(heldout.version, context.loaded.root, context.git_rev),
        context="evaluation",
        digest=heldout.md5,
        target=heldout.data.target,
    )


def _summary(
    context: _Context, comparison: Comparison, run: TrackedRun, served: str | None, **extra: Any
) -> dict[str, Any]:
    model, settings = context.model, context.settings
    return {
        "run_id": run.run_id,
        "model_name": model.name,
        "parent_version": model.version,
        "reference": context.reference,
        "metric": context.metric,
        "rows": comparison.rows,
        "batch_rows": context.batch_rows,
        "threads": settings.threads,
        "repeats": settings.repeats,
        "clock": comparison.clock,
        "parent_value": comparison.parent_value,
        "parent_ms": dict(comparison.parent_ms),
        "parent_size_bytes": comparison.parent_size_bytes,
        "baseline_runtime": comparison.baseline_runtime,
        "baseline_ms": comparison.baseline_ms,
        "max_metric_drop": comparison.max_metric_drop,
        "metric_drop_limit": comparison.metric_drop_limit,
        "min_speedup": comparison.min_speedup,
        "variants": [asdict(result) for result in comparison.variants],
        "table": comparison.table(),
        "notes": list(comparison.notes),
        "served_alias": registering.served_alias(model.version) if served else None,
        "served_version": served,
        "serve": settings.serve,
        **extra,
    }


@flow(name="quantize", flow_run_name=_run_name, validate_parameters=True)
def quantize_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Build, measure and gate quantized variants of a registered fp32 model.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `quantize.repeats=50`.
        model: `models:/<name>@<alias>` or `models:/<name>/<version>` (default: the spec's
            `quantize.model`, else the newest version that passed its gate).

    Returns:
        A summary: the run, the parent, the comparison table, and the registered variants.
    """
    loaded = load_spec_step(config, list(overrides or []))
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(loaded.spec.pipeline.experiment_name, loaded.root)
    context = _prepare(loaded, model)
    name = context.model.name
    removed = registering.remove_abandoned_variants(mlflow.MlflowClient(), name)
    for number in removed:
        get_run_logger().warning(
            "removed %s v%s, left half-registered by a killed run", name, number
        )
    target = context.heldout.data.target
    y = heldout_labels(context.model.preprocessor, context.heldout.frame[target], target)
    with (
        tracked(loaded, "quantize", experiment_id, record_lineage, None, _run_tags(context)) as run,
        tempfile.TemporaryDirectory(prefix="stemma-quantize-") as tmp,
    ):
        _log_inputs(context, run)
        comparison, built = measure_step(context, y, Path(tmp) / "candidates")
        parents.check_parent_value(context.parent, context.metric, comparison.parent_value)
        comparison, weights, graphs = _register_passing(context, comparison, built, run, Path(tmp))
        served = _record(context, run, comparison, weights, graphs)
    return _summary(
        context,
        comparison,
        run,
        served,
        tracking_uri=redact_url(tracking_uri),
        removed_abandoned=removed,
    )
