"""The compare flow: one comparison of a registered fp32 version with every variant of it.

The flow resolves the version (``--model``, the spec's ``compress.model``, or the newest
version that passed its gate), measures it and its quantized, pruned and distilled
variants (variants of variants too) on its held-out rows through the model runtime
(:func:`~stemma.components.compression.comparison.compare_versions`), and records it in
one tracked MLflow run: the table, the trade-off plot, metrics per model under
``compare/``, a description with the table's key rows, and the alias ``v<parent>-cheapest``
on the cheapest passing variant, which ``compress.serve: cheapest`` serves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, get_run_logger

from stemma.components.compression import comparison as compare
from stemma.components.compression import comparison_report as report
from stemma.components.compression.gpu import GpuFigures, gpu_comparison
from stemma.components.compression.plots import plot_comparison
from stemma.components.platform import tags, tracking
from stemma.components.platform.describe import NOTE_TAG
from stemma.components.platform.metric_names import in_section
from stemma.components.platform.redaction import redact_url
from stemma.components.platform.tracked_run import TrackedRun
from stemma.components.quantization import heldout
from stemma.components.quantization.measure import heldout_labels
from stemma.components.runtime.backends import set_threads
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import LoadedSpec, QuantizeSpec
from stemma.flows.lineage import record_lineage
from stemma.flows.steps import (
    config_run_name,
    flow_run_id,
    load_spec_step,
    parent_reference,
    spec_architectures,
    step,
    tracked,
)

_run_name = config_run_name("compare")


@step(name="resolve the parent version")
def resolve_parent_step(loaded: LoadedSpec, model: str | None) -> tuple[str, str]:
    compress = loaded.spec.compress
    reference = parent_reference(loaded, model, compress.model if compress else None)
    return compare.resolve_parent(mlflow.MlflowClient(), reference)


@step(name="measure every variant")
def measure_step(
    loaded: LoadedSpec, model_name: str, parent_version: str
) -> compare.VersionComparison:
    spec = loaded.spec
    return compare.compare_versions(
        model_name,
        parent_version,
        root=loaded.root,
        metric=spec.gate.metric,
        compress=spec.compress,
        cost=spec.cost,
        architectures=spec_architectures(loaded),
    )


@step(name="measure on the GPU")
def gpu_step(
    loaded: LoadedSpec, model_name: str, parent_version: str
) -> tuple[list[GpuFigures], list[str]]:
    """With a CUDA GPU: the parent as fp32 (eager and ONNX Runtime's CUDA provider), fp16
    and bf16 on it, on its held-out rows (see ``compression.gpu``); else nothing, and why."""
    import torch

    if not torch.cuda.is_available():
        return [], ["no GPU here: the comparison has CPU rows only"]
    client, spec = mlflow.MlflowClient(), loaded.spec
    reference = f"models:/{model_name}/{parent_version}"
    model = load_scoring_model(reference, client=client, architectures=spec_architectures(loaded))
    held = heldout.heldout_rows(
        client, client.get_model_version(model_name, parent_version), loaded.root
    )
    target = held.data.target
    with tempfile.TemporaryDirectory(prefix="stemma-compare-gpu-") as folder:
        return gpu_comparison(
            model.network,
            model.preprocessor,
            x=model.preprocessor.transform(held.frame),
            y=heldout_labels(model.preprocessor, held.frame[target], target),
            metric=spec.gate.metric,
            threshold=model.threshold,
            cost=spec.cost,
            folder=Path(folder),
        )


def record_gpu(run: TrackedRun, figures: list[GpuFigures], metric: str) -> list[dict[str, Any]]:
    """The GPU rows as ``compare/gpu.csv`` and metrics ``compare/gpu.<label>.<measure>``."""
    rows = [figure.row(metric) for figure in figures]
    if not rows:
        return rows
    run.log_text(pd.DataFrame(rows).to_csv(index=False), f"{report.COMPARE_SECTION}/gpu.csv")
    values: dict[str, float] = {}
    for figure in figures:
        key = "gpu." + figure.label.replace(" (cuda)", "").replace(" ", "_")
        values.update(figure.profile.metrics(f"{key}."))
        values[f"{key}.{metric}"] = figure.value
        if figure.cost_per_million is not None:
            values[f"{key}.cost_per_million"] = figure.cost_per_million
    run.log_metrics(in_section(report.COMPARE_SECTION, values))
    return rows


def compare_and_record(
    loaded: LoadedSpec, model_name: str, parent_version: str, run: TrackedRun
) -> dict[str, Any]:
    """Compare a version with every variant of it and record the comparison in ``run``
    (see :func:`record_comparison`). Any flow may call it inside its own tracked run.

    Returns:
        The comparison's summary (:func:`.comparison_report.comparison_summary`), with
        ``description``: the table's key rows as markdown.
    """
    return record_comparison(run, measure_step(loaded, model_name, parent_version))


def record_comparison(run: TrackedRun, comparison: compare.VersionComparison) -> dict[str, Any]:
    """Metrics under ``compare/``, ``compare/variants.csv`` and ``.json``,
    ``compare/tradeoff.png``, and ``v<parent>-cheapest`` on the cheapest passing variant
    (removed when the parent is cheapest)."""
    run.log_metrics(in_section(report.COMPARE_SECTION, comparison.metrics()))
    frame = pd.DataFrame(comparison.table())
    run.log_text(frame.to_csv(index=False), report.TABLE_CSV)
    try:
        mlflow.log_table(data=frame, artifact_file=report.TABLE_JSON, run_id=run.run_id)
    except Exception as error:  # the CSV holds the same rows
        get_run_logger().warning("could not log the comparison with log_table: %s", error)
    title = (
        f"{comparison.model_name} v{comparison.parent_version}: every variant, cost on "
        f"{comparison.machine} ({comparison.rows} held-out rows)"
    )
    with tempfile.TemporaryDirectory(prefix="stemma-compare-plot-") as folder:
        plot = plot_comparison(comparison, Path(folder) / report.PLOT_FILE, title=title)
        run.client.log_artifact(run.run_id, str(plot), report.PLOT_FOLDER)
    alias = compare.update_cheapest_alias(mlflow.MlflowClient(), comparison)
    summary = report.comparison_summary(comparison, alias)
    summary["description"] = report.comparison_markdown(comparison)
    for note in comparison.notes:
        get_run_logger().info(note)
    return summary


@flow(name="compare", flow_run_name=_run_name, validate_parameters=True)
def compare_flow(
    config: str = "configs/credit.yaml",
    overrides: list[str] | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Compare a registered fp32 version with every variant of it: metric, latency,
    size and cost per million predictions, and alias the cheapest.

    Args:
        config: path of the pipeline spec (YAML).
        overrides: `section.key=value` overrides, e.g. `cost.scoring=cpu-large`.
        model: `models:/<name>@<alias>` or `models:/<name>/<version>` of the fp32 parent
            (default: the spec's `compress.model`, else the newest version that passed its
            gate).

    Returns:
        A summary: the run, the table, and the cheapest passing variant.
    """
    loaded = load_spec_step(config, list(overrides or []))
    tracking_uri = tracking.configure_tracking(loaded.root)
    experiment_id = tracking.ensure_experiment(loaded.spec.pipeline.experiment_name, loaded.root)
    # The probe runs with the threads quantization measures with, set once per process.
    set_threads((loaded.spec.quantize or QuantizeSpec()).threads)
    model_name, parent_version = resolve_parent_step(loaded, model)
    run_tags = {tags.MODEL_VERSION: parent_version}
    with tracked(loaded, "compare", experiment_id, record_lineage, None, run_tags) as run:
        comparison = measure_step(loaded, model_name, parent_version)
        summary = record_comparison(run, comparison)
        gpu, gpu_notes = gpu_step(loaded, model_name, parent_version)
        summary["gpu"] = record_gpu(run, gpu, comparison.metric)
        summary["notes"] = [*summary["notes"], *gpu_notes]
        run.set_tags({tags.DATA_MD5: comparison.data_md5})
        record = report.comparison_record(
            comparison,
            pipeline=loaded.spec.pipeline.name,
            run_id=run.run_id,
            experiment_id=run.experiment_id,
            flow_run_id=flow_run_id(),
        )
        run.record_lineage(record)
        described = run.description(run.document or {})
        run.set_tags({NOTE_TAG: f"{summary['description']}\n{described}"})
    return {**summary, "run_id": run.run_id, "tracking_uri": redact_url(tracking_uri)}
