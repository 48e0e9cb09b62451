"""The quantize flow: variants of a registered fp32 model, measured against it and gated.

The flow resolves the fp32 model (``--model``, the spec's ``quantize.model``, or the
newest version that passed its gate), recomputes the held-out rows it was gated on from
its training run's spec and data version, builds and measures every variant the spec's
``quantize`` section lists (:func:`~stemma.components.quantization.variants.compare_variants`),
registers the ones that clear both the metric-drop and the speed-up bars, and records
everything in one MLflow run: metrics per variant, the comparison table, a plot of latency
against metric drop with the bars drawn, and a lineage record linking the parent to each
variant. A variant is registered all or nothing; an interrupted run leaves none behind
half-registered, and a run killed outright leaves one that the next run removes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from stemma.components.errors import RegistryError, SpecError
from stemma.components.platform import tracking
from stemma.components.platform.redaction import redact_url
from stemma.components.quantization import variants as quantization
from stemma.components.scoring import engine as scoring
from stemma.components.spec import METRIC_DIRECTIONS, LoadedSpec, QuantizeSpec
from stemma.components.training.loop import predict_raw
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import config_run_name, load_spec_step, spec_architectures

#: Where torch.compile keeps its compiled kernels, under the project's `.stemma/`, so
#: a second run compiles from the cache (seconds instead of tens of seconds).
INDUCTOR_CACHE_DIR = "inductor"


_run_name = config_run_name("quantize")


@task(name="load fp32 model")
def load_parent_step(reference: str, loaded: LoadedSpec) -> tuple[scoring.ScoringModel, Any]:
    """The fp32 model (files verified) and its registry entry; never a variant."""
    client = mlflow.MlflowClient()
    model = scoring.load_scoring_model(
        reference, client=client, architectures=spec_architectures(loaded)
    )
    version = client.get_model_version(model.name, model.version)
    if quantization.is_variant(version):
        parent = (version.tags or {}).get(quantization.PARENT_VERSION_TAG, "?")
        raise RegistryError(
            f"{model.label} is itself a quantized variant "
            f"({(version.tags or {}).get(quantization.METHOD_TAG)} of v{parent})",
            [f"quantize its fp32 parent: --model models:/{model.name}/{parent}"],
        )
    return model, version


@task(name="recompute held-out rows")
def heldout_step(version: Any, loaded: LoadedSpec) -> quantization.HeldOut:
    return quantization.heldout_rows(mlflow.MlflowClient(), version, loaded.root)


@task(name="build and measure variants")
def measure_step(
    model: scoring.ScoringModel,
    x: np.ndarray,
    y: np.ndarray,
    metric: str,
    settings: QuantizeSpec,
    batch_rows: int,
    workdir: Path,
) -> tuple[quantization.Comparison, dict[str, quantization.QuantizedNetwork]]:
    return quantization.compare_variants(
        model.network,
        model.preprocessor,
        x,
        y,
        task=model.task,
        metric=metric,
        threshold=model.threshold,
        settings=settings,
        batch_rows=batch_rows,
        workdir=workdir,
        prepack=lambda network, _width: scoring.engine_runner(network, model.preprocessor),
    )


@task(name="register variant", task_run_name="register {result.method}")
def register_step(
    result: quantization.VariantResult,
    variant: quantization.QuantizedNetwork,
    model: scoring.ScoringModel,
    parent_files: dict[str, Any],
    heldout: quantization.HeldOut,
    x: np.ndarray,
    comparison: quantization.Comparison,
    run_id: str,
    git_rev: str | None,
    workdir: Path,
) -> tuple[quantization.VariantResult, str]:
    """Log the variant as a model, register it, load it back and compare its outputs."""
    client = mlflow.MlflowClient()
    info, weights_sha256 = quantization.log_variant_model(
        variant=variant,
        parent_files=parent_files,
        parent={"version": model.version, "weights_sha256": model.weights_sha256},
        input_example=heldout.frame[model.feature_columns],
        workdir=workdir,
    )
    expected = predict_raw(variant, x)

    def verify(number: str) -> None:
        loaded = scoring.load_scoring_model(
            f"models:/{model.name}/{number}", client=client, architectures=model.architectures
        )
        if not np.array_equal(predict_raw(loaded.network, x), expected):
            raise RegistryError(
                f"{model.name} v{number}: the registered {result.method} variant, loaded back, "
                "does not give the outputs that were measured",
                ["nothing was registered"],
            )

    tags = {
        quantization.METHOD_TAG: result.method,
        quantization.PARENT_VERSION_TAG: model.version,
        quantization.PARENT_WEIGHTS_TAG: model.weights_sha256,
        quantization.RUNTIME_TAG: str(result.runtime),
        quantization.TAG_PREFIX + "decision": quantization.PASSED,
        quantization.TAG_PREFIX + "reasons": "; ".join(result.reasons),
        quantization.TAG_PREFIX + "metric": comparison.metric,
        quantization.TAG_PREFIX + "metric_drop": repr(result.metric_drop),
        quantization.TAG_PREFIX + "speedup": repr(result.speedup),
        quantization.TAG_PREFIX + "latency_ms": repr(result.latency_ms),
        quantization.TAG_PREFIX + "baseline": (
            f"fp32 {comparison.baseline_runtime} {comparison.baseline_ms!r} ms"
        ),
        "stemma.run_id": run_id,
        "stemma.weights.sha256": weights_sha256,
        "stemma.data.md5": heldout.md5,
        **({"stemma.git.rev": git_rev} if git_rev else {}),
    }
    registered = quantization.register_variant(
        client=client,
        model_name=model.name,
        parent_version=model.version,
        method=result.method,
        model_uri=info.model_uri,
        run_id=run_id,
        tags=tags,
        description=(
            f"{result.method} variant of {model.label} ({quantization.METHODS[result.method]}): "
            + "; ".join(result.reasons)
        ),
        verify=verify,
    )
    return replace(result, version=str(registered.version)), weights_sha256


def _log_comparison(comparison: quantization.Comparison, title: str, workdir: Path) -> None:
    """Metrics per variant, the table (JSON via log_table, and CSV) and the trade-off plot."""
    tracking.log_metrics_batch(comparison.metrics())
    frame = pd.DataFrame(comparison.table())
    mlflow.log_text(frame.to_csv(index=False), "quantize/comparison.csv")
    try:
        mlflow.log_table(data=frame, artifact_file="quantize/comparison.json")
    except Exception as error:  # the CSV holds the same rows
        get_run_logger().warning("could not log the comparison with log_table: %s", error)
    plot = quantization.plot_tradeoff(comparison, workdir / "tradeoff.png", title=title)
    mlflow.log_artifact(str(plot), "quantize")


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
    logger = get_run_logger()
    loaded = load_spec_step(config, list(overrides or []))
    spec = loaded.spec
    settings = spec.quantize or QuantizeSpec()
    if spec.quantize is None:
        logger.info("the spec has no quantize section: using its defaults")
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", str(loaded.root / tracking.STATE_DIR / INDUCTOR_CACHE_DIR)
    )
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(spec.pipeline.experiment_name, loaded.root)
    client = mlflow.MlflowClient()
    reference = (
        model
        or settings.model
        or quantization.default_parent_reference(client, spec.pipeline.registered_model_name)
    )
    parent_model, parent = load_parent_step(reference, loaded)
    metrics = METRIC_DIRECTIONS.get(parent_model.task, {})
    metric = spec.gate.metric
    if metric not in metrics:
        raise SpecError(
            f"gate.metric {metric!r} is not a metric of {parent_model.label}, a "
            f"{parent_model.task} model; choose one of {', '.join(metrics)}"
        )
    heldout = heldout_step(parent, loaded)
    x = parent_model.preprocessor.transform(heldout.frame)
    y = heldout.frame[heldout.data.target].to_numpy(dtype=np.float64)
    batch_rows = settings.batch_rows or min(spec.score.chunk_rows, scoring.FORWARD_BATCH_ROWS)
    removed = quantization.remove_abandoned_variants(client, parent_model.name)
    for number in removed:
        logger.warning(
            "removed %s v%s, left half-registered by a killed run", parent_model.name, number
        )
    git_rev, _ = tracking.git_revision(loaded.root)

    run = mlflow.start_run(experiment_id=experiment_id, run_name=flow_run.get_name())
    run_id = run.info.run_id
    try:
        mlflow.set_tags(
            {
                "stemma.pipeline": spec.pipeline.name,
                "stemma.flow": "quantize",
                "stemma.prefect.flow_run_id": str(flow_run.get_id() or ""),
                "stemma.model.uri": parent_model.model_uri,
                "stemma.model.reference": reference,
                "stemma.model.version": parent_model.version,
                "stemma.weights.sha256": parent_model.weights_sha256,
                "stemma.data.md5": heldout.md5,
                "stemma.status": "running",
                **({"stemma.git.rev": git_rev} if git_rev else {}),
            }
        )
        tracking.log_params_flat(
            {
                **{f"quantize.{k}": str(v) for k, v in settings.model_dump(mode="json").items()},
                "quantize.batch_rows.resolved": str(batch_rows),
                "quantize.metric": metric,
            }
        )
        tracking.log_dataset(
            heldout.frame,
            name=f"{spec.pipeline.name}-test",
            source=tracking.DVCDatasetSource.from_version(heldout.version, loaded.root, git_rev),
            context="evaluation",
            digest=heldout.md5,
            target=heldout.data.target,
        )
        with tempfile.TemporaryDirectory(prefix="stemma-quantize-") as tmp:
            workdir = Path(tmp)
            comparison, built = measure_step(
                parent_model, x, y, metric, settings, batch_rows, workdir / "candidates"
            )
            quantization.check_parent_value(parent, metric, comparison.parent_value)
            weights: dict[str, str] = {}
            passing = [result for result in comparison.variants if result.passed]
            if passing:
                parent_files = quantization.download_model_files(
                    client, parent_model.name, parent_model.version, workdir / "parent"
                )
                for result in passing:
                    registered, weights[result.method] = register_step(
                        result,
                        built[result.method],
                        parent_model,
                        parent_files,
                        heldout,
                        x,
                        comparison,
                        run_id,
                        git_rev,
                        workdir / "variants" / result.method,
                    )
                    comparison = comparison.with_variant(registered)
            served = quantization.update_served_alias(
                client, parent_model.name, parent_model.version, comparison
            )
            client.set_model_version_tag(
                parent_model.name,
                parent_model.version,
                quantization.SUMMARY_TAG,
                quantization.summary_tag(comparison, run_id, served),
            )
            _log_comparison(
                comparison,
                f"{parent_model.label}: variants vs fp32 ({batch_rows} rows a pass)",
                workdir,
            )
            record = quantization.build_quantize_record(
                pipeline=spec.pipeline.name,
                model_name=parent_model.name,
                parent_version=parent_model.version,
                parent_weights_sha256=parent_model.weights_sha256,
                heldout=heldout,
                root=loaded.root,
                run_id=run_id,
                experiment_id=run.info.experiment_id,
                flow_run_id=str(flow_run.get_id() or "") or None,
                comparison=comparison,
                variant_weights=weights,
            )
            record_lineage(record)
            mlflow.set_tags(
                {
                    "stemma.quantize.registered": ",".join(
                        f"{v.method}=v{v.version}" for v in comparison.variants if v.version
                    ),
                    "stemma.status": "completed",
                }
            )
    except BaseException as error:
        tracking.end_run_after(error)
        raise
    mlflow.end_run(status="FINISHED")
    return {
        "run_id": run_id,
        "tracking_uri": redact_url(tracking_uri),
        "model_name": parent_model.name,
        "parent_version": parent_model.version,
        "reference": reference,
        "metric": metric,
        "rows": comparison.rows,
        "batch_rows": batch_rows,
        "threads": settings.threads,
        "repeats": settings.repeats,
        "clock": comparison.clock,
        "parent_value": comparison.parent_value,
        "parent_ms": dict(comparison.parent_ms),
        "parent_size_bytes": comparison.parent_size_bytes,
        "baseline_runtime": comparison.baseline_runtime,
        "baseline_ms": comparison.baseline_ms,
        "max_metric_drop": comparison.max_metric_drop,
        "min_speedup": comparison.min_speedup,
        "variants": [asdict(result) for result in comparison.variants],
        "table": comparison.table(),
        "notes": list(comparison.notes),
        "served_alias": quantization.served_alias(parent_model.version) if served else None,
        "served_version": served,
        "serve": settings.serve,
        "removed_abandoned": removed,
    }
