"""Latency and cost of every model version, measured when it is registered.

When the training flow registers a version, :func:`record_version_latency` loads it the
way batch scoring does (:func:`~stemma.components.runtime.loading.load_scoring_model`, so
the same backend: ONNX Runtime when the network exported, else eager) and times it on the
standard probe (:func:`~stemma.components.runtime.probe.probe_runtime`: batches of 1, 64
and 4,096 rows of the test split, a warm-up, then repeats). Then:

- the version's training run gets ``latency/probe.json`` (the profile, the machine it was
  measured on, and the cost per million predictions on the spec's ``cost.serving`` and
  ``cost.scoring`` machines, in ``cost.currency``, with whether the prices are the
  illustrative defaults) and the ``latency/*`` metrics;
- the version's description states the figures (:func:`.text.state_figures`: a block that
  every later rewrite keeps), and the model's description quotes the champion's cost;
- the run gets ``latency/versions.png``: p50 per batch size and cost per million of every
  version measured so far (:func:`plot_versions`), so a user sees how they moved.

Versions carry no latency tag: a trained version is at its tag limit
(``platform.tags.VERSION_TAGS``). A probe that fails never fails the registration: the run
gets ``latency/probe_error.json`` and the description says why the figures are missing.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stemma.components.platform import metric_names
from stemma.components.platform.refs import format_model_ref
from stemma.components.registry import text
from stemma.components.runtime.loading import first_line
from stemma.components.spec.compress import (
    PROBE_BATCH_SIZES,
    CostSpec,
    MachineSpec,
    format_amount,
)
from stemma.components.training.metrics import save_figure

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from stemma.components.runtime.backends import Runtime
    from stemma.components.runtime.probe import LatencyProfile

_LOG = logging.getLogger(__name__)

#: Where a training run keeps its version's figures.
LATENCY_DIR = "latency"
PROBE_ARTIFACT = f"{LATENCY_DIR}/probe.json"
ERROR_ARTIFACT = f"{LATENCY_DIR}/probe_error.json"
PLOT_ARTIFACT = f"{LATENCY_DIR}/versions.png"
#: Timed calls of the largest batch at registration; the smaller batches get more (the
#: probe times at least 4,096 rows per batch size).
REGISTRATION_REPEATS = 30
#: About how long the largest batch's timed calls may take: a slow network gets fewer
#: repeats, never fewer than :data:`MIN_REPEATS`, so registration stays quick.
PROBE_BUDGET_SECONDS = 0.5
MIN_REPEATS = 5
#: Newest versions read back for the plot: it stays readable, and reading stays quick.
MAX_PLOTTED_VERSIONS = 50


@dataclass(frozen=True)
class VersionLatency:
    """What the registration probe of one version found.

    Attributes:
        document: the ``latency/probe.json`` logged, or None when the probe failed.
        error: why the probe failed, or None.
        figures: the block stated in the version's description.
    """

    document: dict[str, Any] | None
    error: str | None
    figures: str


def probe_version(runtime: Runtime, x: np.ndarray) -> LatencyProfile:
    """Time ``runtime`` on the standard probe, with repeats fitted to its speed.

    Raises:
        ValueError: ``x`` has no rows; any error the runtime raises.
    """
    from stemma.components.runtime.probe import probe_batch, probe_runtime

    largest = probe_batch(x, max(PROBE_BATCH_SIZES))
    runtime.run(largest)  # the first call pays for lazy set-up, never timed
    began = time.perf_counter()
    runtime.run(largest)
    per_call = time.perf_counter() - began
    affordable = int(PROBE_BUDGET_SECONDS / per_call) if per_call > 0 else REGISTRATION_REPEATS
    repeats = min(REGISTRATION_REPEATS, max(MIN_REPEATS, affordable))
    return probe_runtime(runtime, x, repeats=repeats)


def _priced(
    profile: LatencyProfile, cost: CostSpec, role: Literal["scoring", "serving"]
) -> dict[str, Any]:
    machine: MachineSpec = cost.machine(role)
    return {
        "machine": getattr(cost, role),
        **machine.model_dump(mode="json"),
        "cost_per_million": profile.cost_per_million(machine),
    }


def probe_document(
    profile: LatencyProfile, cost: CostSpec, *, model_name: str, version: str
) -> dict[str, Any]:
    """``latency/probe.json``: the profile, the version, and its cost on the spec's machines."""
    document = {
        **profile.to_dict(),
        "model": {"name": model_name, "version": str(version)},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cost": {
            "currency": cost.currency,
            "illustrative": cost.illustrative,
            "serving": _priced(profile, cost, "serving"),
            "scoring": _priced(profile, cost, "scoring"),
        },
    }
    return json.loads(json.dumps(document))  # as it reads back: lists, not tuples


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def figures_text(document: dict[str, Any], cost: CostSpec) -> str:
    """The version description's block: latency per batch size, throughput, cost."""
    from stemma.components.runtime.probe import LatencyProfile

    profile = LatencyProfile.from_dict(document)
    lines = [
        f"{text.FIGURES_HEADING}, measured at registration ({profile.backend}, "
        f"{profile.threads} thread(s), on {profile.machine}):"
    ]
    for batch in profile.batches:
        rows = f"{batch.rows:,} row" + ("s" if batch.rows != 1 else "")
        lines.append(
            f"- {rows} a call: p50 {_ms(batch.p50_ms)} · p95 {_ms(batch.p95_ms)} · "
            f"p99 {_ms(batch.p99_ms)}"
        )
    lines.append(
        f"- {profile.rows_per_s:,.0f} rows/s; "
        f"{profile.cpu_seconds_per_million:.3g} CPU-seconds per million predictions"
    )
    serving = document["cost"]["serving"]["cost_per_million"]
    lines.append(text.COST_LINE + cost.describe("serving", serving))
    return "\n".join(lines)


def _log_metrics(client: MlflowClient, run_id: str, document: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    from stemma.components.runtime.probe import LatencyProfile

    values = metric_names.in_section(
        metric_names.LATENCY, LatencyProfile.from_dict(document).metrics()
    )
    values[metric_names.LATENCY_COST_PER_MILLION] = document["cost"]["serving"]["cost_per_million"]
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(key, float(value), now, 0) for key, value in values.items()]
    )


def record_version_latency(
    client: MlflowClient,
    model_name: str,
    version: str,
    *,
    run_id: str,
    x: np.ndarray,
    cost: CostSpec,
    architectures: Collection[str] = (),
    runtime: Runtime | None = None,
) -> VersionLatency:
    """Probe a registered version and record its figures; never raises for a failed probe.

    Args:
        client: the registry's client.
        model_name: the registered model.
        version: the version just registered.
        run_id: its training run, which gets the artifacts and metrics.
        x: preprocessed rows to time it on (the test split), ``(rows, width)``.
        cost: the spec's ``cost`` section.
        architectures: the architectures the spec allows besides the built-ins.
        runtime: the runtime to time (default: the version loaded as scoring loads it).

    Returns:
        The document logged, or why there is none, and the block the description states.
    """
    try:
        if runtime is None:
            from stemma.components.runtime.loading import load_scoring_model

            reference = format_model_ref(model_name, version=version)
            runtime = load_scoring_model(
                reference, client=client, architectures=architectures
            ).runtime
        profile = probe_version(runtime, x)
        document = probe_document(profile, cost, model_name=model_name, version=str(version))
        client.log_dict(run_id, document, PROBE_ARTIFACT)
        _log_metrics(client, run_id, document)
        figures = figures_text(document, cost)
        outcome = VersionLatency(document=document, error=None, figures=figures)
    except Exception as error:  # the version is registered either way; say why it has no figures
        reason = f"{type(error).__name__}: {first_line(error)}"
        _LOG.warning("%s v%s: the latency probe failed: %s", model_name, version, reason)
        figures = (
            f"{text.FIGURES_HEADING}: not measured at registration, the probe failed "
            f"({reason}); see {ERROR_ARTIFACT} of run {run_id}"
        )
        outcome = VersionLatency(document=None, error=reason, figures=figures)
        _quietly(
            client.log_dict, run_id, {"error": reason, "version": str(version)}, ERROR_ARTIFACT
        )
    _quietly(text.state_figures, client, model_name, str(version), outcome.figures)
    if outcome.document is not None:
        _quietly(_log_plot, client, model_name, run_id)
    return outcome


def state_variant_figures(
    client: MlflowClient,
    model_name: str,
    version: str,
    *,
    cost: CostSpec,
    profile: LatencyProfile | None = None,
    runtime: Runtime | None = None,
    x: np.ndarray | None = None,
) -> str | None:
    """State a registered variant's latency and cost in its description: from ``profile``
    when the run measured one, else from a probe of ``runtime`` on ``x``. A variant shares
    its run with its siblings, so no ``latency/probe.json`` is logged. Never raises.

    Returns:
        The block stated, or None when there was nothing to state or it failed.
    """
    try:
        if profile is None:
            if runtime is None or x is None:
                return None
            profile = probe_version(runtime, x)
        document = probe_document(profile, cost, model_name=model_name, version=str(version))
        figures = figures_text(document, cost)
        text.state_figures(client, model_name, str(version), figures)
        return figures
    except Exception as error:  # the variant is registered either way
        _LOG.warning("%s v%s: its latency figures were not stated: %s", model_name, version, error)
        return None


def _quietly(action: Any, *args: Any) -> None:
    """Do one of the recording steps; a store that refuses it costs only that record."""
    try:
        action(*args)
    except Exception as error:
        _LOG.warning("could not record the latency figures: %s", first_line(error))


def _log_plot(client: MlflowClient, model_name: str, run_id: str) -> None:
    with tempfile.TemporaryDirectory(prefix="stemma-latency-") as folder:
        path = plot_versions(client, model_name, Path(folder) / Path(PLOT_ARTIFACT).name)
        client.log_artifact(run_id, str(path), LATENCY_DIR)


def version_latencies(
    client: MlflowClient, model_name: str, *, limit: int = MAX_PLOTTED_VERSIONS
) -> list[dict[str, Any]]:
    """The ``latency/probe.json`` of every version of ``model_name`` whose run has one,
    oldest version first (the newest ``limit`` versions are read)."""
    versions = client.search_model_versions(f"name = '{model_name}'")
    newest = sorted(versions, key=lambda found: int(found.version))[-limit:]
    from stemma.components.platform.tracking import read_run_artifact

    found: list[dict[str, Any]] = []
    for version in newest:
        # None: no probe in that run (older, failed, or another kind of run)
        text = read_run_artifact(client, version.run_id, PROBE_ARTIFACT) if version.run_id else None
        try:
            document = json.loads(text or "{}")
        except ValueError:
            continue
        # Several versions may share a run (quantized variants): each keeps its own.
        if str((document.get("model") or {}).get("version")) == str(version.version):
            found.append(document)
    return found


def plot_versions(client: MlflowClient, model_name: str, out_path: Path) -> Path:
    """Draw p50 latency per batch size and cost per million predictions of every measured
    version of ``model_name`` (:func:`version_latencies`) into the PNG ``out_path``.

    Returns:
        ``out_path``. A model with no measured version gets a plot that says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    documents = version_latencies(client, model_name)
    figure = Figure(figsize=(9, 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    latency_axes, cost_axes = figure.subplots(1, 2)
    labels = [f"v{document['model']['version']}" for document in documents]
    positions = np.arange(len(documents))
    for rows in PROBE_BATCH_SIZES:
        p50 = [_p50(document, rows) for document in documents]
        latency_axes.plot(positions, p50, marker="o", label=f"{rows:,} row(s) a call")
    latency_axes.set_yscale("log")
    latency_axes.set_ylabel("p50 latency (ms, log scale)")
    latency_axes.set_title("latency per call")
    if documents:
        latency_axes.legend(fontsize=7)
        currency = documents[-1]["cost"]["currency"]
        machine = documents[-1]["cost"]["serving"]["machine"]
        costs = [document["cost"]["serving"]["cost_per_million"] for document in documents]
        bars = cost_axes.bar(positions, costs, color="tab:green")
        cost_axes.bar_label(bars, labels=[format_amount(value) for value in costs], fontsize=7)
        cost_axes.set_ylabel(f"{currency} per million predictions")
        illustrative = any(document["cost"]["illustrative"] for document in documents)
        cost_axes.set_title(
            f"cost on {machine}" + (" (illustrative prices)" if illustrative else ""),
            pad=14,  # room for the axis's scale (1e-6) above it
        )
    else:
        latency_axes.text(0.5, 0.5, "no version measured yet", ha="center", va="center")
    for axes in (latency_axes, cost_axes):
        axes.set_xticks(positions, labels)
        axes.set_xlabel("version")
    figure.suptitle(f"{model_name}: latency and cost by version")
    return save_figure(figure, Path(out_path))


def _p50(document: dict[str, Any], rows: int) -> float:
    for batch in document.get("batches") or ():
        if int(batch["rows"]) == rows:
            return float(batch["p50_ms"])
    return float("nan")
