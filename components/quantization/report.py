"""What a quantize run leaves behind: the trade-off plot and the lineage record."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stemma.components.platform.lineage import (
    Edge,
    LineageRecord,
    Node,
    created_stamp,
    data_node_id,
    model_node_id,
    run_node,
)
from stemma.components.quantization.heldout import HeldOut
from stemma.components.quantization.results import PASSED, REJECTED, Comparison

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: fp32 backends whose latencies are within this factor share one label on the plot.
SHARED_LABEL_FACTOR = 1.05


def plot_tradeoff(comparison: Comparison, out_path: Path, *, title: str) -> Path:
    """Latency against metric drop, one point per measured model, with the gate drawn.

    The passing region is left of the maximum drop and below the latency the minimum
    speed-up allows (the fastest fp32 latency divided by it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(7.0, 5.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    limit = comparison.baseline_ms / comparison.min_speedup
    measured = [v for v in comparison.variants if v.metric_drop is not None and v.latency_ms]
    drops = [0.0, comparison.max_metric_drop, *(v.metric_drop or 0.0 for v in measured)]
    left = min(drops) - 0.25 * (max(drops) - min(drops) or 1.0)
    # The passing region: small enough a drop, fast enough.
    axes.fill_between(
        [left, comparison.max_metric_drop], 0, limit, color="tab:green", alpha=0.08, zorder=0
    )
    _plot_fp32(axes, comparison)
    colours = {PASSED: "tab:green", REJECTED: "tab:red"}
    for variant in measured:
        point = (float(variant.metric_drop or 0.0), float(variant.latency_ms or 0.0))
        axes.scatter([point[0]], [point[1]], color=colours[variant.status], zorder=3)
        label = f"{variant.method} ({variant.runtime}, {variant.speedup or 0.0:.2f}x)"
        _annotate(axes, label, point)
    _draw_bounds(axes, comparison, limit)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.set_xlim(left=left)
    axes.set(
        xlabel=f"{comparison.metric} drop vs fp32 (right is worse)",
        ylabel=f"{comparison.clock} ms per run of {comparison.batch_rows} rows (log)",
        title=title,
    )
    # Below the axes, where it never hides a point.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    figure.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


def _annotate(axes: Axes, text: str, point: tuple[float, float]) -> None:
    axes.annotate(
        text, point, textcoords="offset points", xytext=(8, 0), va="center", fontsize="small"
    )


def _plot_fp32(axes: Axes, comparison: Comparison) -> None:
    """The fp32 backends at drop 0; close latencies share one label so labels do not overlap."""
    groups: list[list[tuple[str, float]]] = []
    for runtime, latency in sorted(comparison.parent_ms.items(), key=lambda item: item[1]):
        if groups and latency <= groups[-1][0][1] * SHARED_LABEL_FACTOR:
            groups[-1].append((runtime, latency))
        else:
            groups.append([(runtime, latency)])
    for group in groups:
        names = [runtime for runtime, _ in group]
        baseline = comparison.baseline_runtime in names
        axes.scatter(
            [0.0] * len(group),
            [ms for _, ms in group],
            color="black" if baseline else "grey",
            marker="s",
            zorder=3,
        )
        label = "fp32 " + " / ".join(names) + (" (baseline)" if baseline else "")
        _annotate(axes, label, (0.0, group[0][1]))


def _draw_bounds(axes: Axes, comparison: Comparison, limit: float) -> None:
    """The gate's two bounds as dashed lines, on a log latency axis."""
    axes.axvline(
        comparison.max_metric_drop,
        color="tab:blue",
        linestyle="--",
        label=f"max {comparison.metric} drop {comparison.metric_drop_limit or comparison.max_metric_drop}",
    )
    axes.axhline(
        limit,
        color="tab:orange",
        linestyle="--",
        label=f"min speed-up {comparison.min_speedup:g}x over fp32 ({limit:.3g} ms)",
    )
    axes.set_yscale("log")


def build_quantize_record(
    *,
    pipeline: str,
    model_name: str,
    parent_version: str,
    parent_weights_sha256: str,
    heldout: HeldOut,
    root: Path,
    run_id: str,
    experiment_id: str,
    flow_run_id: str | None,
    comparison: Comparison,
    variant_weights: Mapping[str, str],
    variant_graphs: Mapping[str, str] | None = None,
    git_rev: str | None = None,
) -> LineageRecord:
    """The lineage record of a quantize run: parent and held-out rows in, variants out.

    Each registered variant is linked from the run (``produced``) and from its parent
    (``quantized_to``), with the sha256 of its weights (and of its ONNX graph, in
    ``variant_graphs``, for an ONNX Runtime method); the numbers of every variant,
    rejected ones too, are kept, and the commit of the code (``git_rev``) on the run node.
    """
    from dataclasses import asdict, replace

    parent = model_node_id(model_name, parent_version)
    pointer = heldout.pointer(root)
    data = data_node_id(pointer, heldout.md5)
    run = run_node(run_id, experiment_id, flow_run_id)
    if git_rev:
        run = replace(run, attributes={**run.attributes, "git_rev": git_rev})
    attributes = {"pointer": pointer, "path": heldout.file_path, "split": "test"}
    nodes = [
        Node("model_version", parent, f"sha256:{parent_weights_sha256}", {"precision": "fp32"}),
        Node("data_version", data, f"md5:{heldout.md5}", {**attributes, "rows": comparison.rows}),
        run,
    ]
    edges = [Edge(parent, run.id, "input_of"), Edge(data, run.id, "evaluated_on")]
    for variant in comparison.variants:
        if variant.version is None:
            continue
        node = model_node_id(model_name, variant.version)
        described: dict[str, Any] = {"quantization": variant.method, "runtime": variant.runtime}
        if variant.method in (variant_graphs or {}):
            described["onnx_sha256"] = (variant_graphs or {})[variant.method]
        digest = f"sha256:{variant_weights[variant.method]}"
        nodes.append(Node("model_version", node, digest, described))
        edges += [Edge(run.id, node, "produced"), Edge(parent, node, "quantized_to")]
    return LineageRecord(
        flow="quantize",
        pipeline=pipeline,
        nodes=nodes,
        edges=edges,
        created=created_stamp(),
        variants=[asdict(variant) for variant in comparison.variants],
    )
