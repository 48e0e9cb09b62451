"""The picture of a comparison: cost against metric, and latency per batch size.

The upper panel puts each model at its cost per million predictions (x) and its gate
metric (y), sized by its p50 latency at a batch of 64 rows, with the parent marked and the
metric-drop limit drawn. Every point carries a short number whose full label (chain of
methods, version, p50) is in the key beside the panel, so that six or more close points
stay legible. The lower panels show p50, p95 and p99 latency per batch size as grouped
bars on a log scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stemma.components.compression.comparison import VariantFigures, VersionComparison
from stemma.components.spec.compress import format_amount

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Batch whose p50 latency sizes the points.
SIZED_BY_BATCH = 64
#: Marker areas (points²) of the fastest and the slowest model at that batch.
SMALLEST_POINT, LARGEST_POINT = 40.0, 360.0
#: Percentiles drawn per batch size, with their bar shading.
PERCENTILES = (("p50_ms", 1.0), ("p95_ms", 0.6), ("p99_ms", 0.3))
#: Offsets (points) of the numbers beside the points, in turn, so close points' numbers part.
NUMBER_OFFSETS = ((7, 7), (7, -11), (-13, 7), (-13, -11))


def plot_comparison(comparison: VersionComparison, out_path: Path, *, title: str) -> Path:
    """Draw the comparison's trade-off and latency panels as a PNG at ``out_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(comparison.variants)
    figure = Figure(figsize=(12.0, 7.5 + 0.12 * count), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 3, height_ratios=(1.35, 1.0), hspace=0.45, wspace=0.3)
    tradeoff = figure.add_subplot(grid[0, :])
    _draw_tradeoff(tradeoff, comparison)
    sizes = [batch.rows for batch in comparison.parent.profile.batches]
    for column, rows in enumerate(sizes[:3]):
        _draw_latency(figure.add_subplot(grid[1, column]), comparison, rows)
    figure.suptitle(title, fontsize="large")
    figure.subplots_adjust(left=0.07, right=0.68, top=0.93, bottom=0.08)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


def _colour(variant: VariantFigures, cheapest: str) -> str:
    if variant.is_parent:
        return "black"
    return "tab:green" if variant.version == cheapest else "tab:blue"


def _draw_tradeoff(axes: Axes, comparison: VersionComparison) -> None:
    cheapest = comparison.cheapest.version
    latencies = [v.profile.at(SIZED_BY_BATCH).p50_ms for v in comparison.variants]
    low, high = min(latencies), max(latencies)
    key = []
    for number, (variant, latency) in enumerate(
        zip(comparison.variants, latencies, strict=True), start=1
    ):
        share = (latency - low) / (high - low) if high > low else 0.5
        area = SMALLEST_POINT + share * (LARGEST_POINT - SMALLEST_POINT)
        axes.scatter(
            [variant.cost_per_million],
            [variant.value],
            s=area,
            marker="s" if variant.is_parent else "o",
            color=_colour(variant, cheapest),
            alpha=0.75,
            edgecolors="black",
            zorder=3,
        )
        axes.annotate(
            str(number),
            (variant.cost_per_million, variant.value),
            textcoords="offset points",
            xytext=NUMBER_OFFSETS[(number - 1) % len(NUMBER_OFFSETS)],
            fontsize="small",
            fontweight="bold",
        )
        marks = " (parent)" if variant.is_parent else ""
        marks += " ← cheapest" if variant.version == cheapest else ""
        key.append(
            f"{number}  v{variant.version} {variant.chain_text if variant.chain else 'fp32'}"
            f"{marks}\n    p50 {latency:.3g} ms at {SIZED_BY_BATCH} rows, "
            f"{format_amount(variant.cost_per_million)} {comparison.currency}/M"
        )
    limit = (
        comparison.parent_value - comparison.metric_drop_limit
        if comparison.higher_is_better
        else comparison.parent_value + comparison.metric_drop_limit
    )
    axes.axhline(
        limit,
        color="tab:red",
        linestyle="--",
        label=f"metric-drop limit {comparison.metric_drop_text}",
    )
    axes.axhline(comparison.parent_value, color="grey", linestyle=":", label="parent's metric")
    prices = "illustrative prices" if comparison.illustrative_prices else "spec's prices"
    axes.set(
        xlabel=f"{comparison.currency} per million predictions on {comparison.machine} ({prices})",
        ylabel=f"{comparison.metric} on {comparison.rows} held-out rows"
        + ("" if comparison.higher_is_better else " (lower is better)"),
    )
    axes.margins(x=0.15, y=0.2)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 0.28), fontsize="small", frameon=False)
    axes.text(
        1.01,
        1.0,
        "point size: p50 at 64 rows\n\n" + "\n".join(key),
        transform=axes.transAxes,
        va="top",
        ha="left",
        fontsize="small",
        family="monospace",
    )


def _draw_latency(axes: Axes, comparison: VersionComparison, rows: int) -> None:
    """p50, p95 and p99 of every model at one batch size, as grouped bars."""
    count = len(comparison.variants)
    width = 0.8 / len(PERCENTILES)
    for offset, (name, shade) in enumerate(PERCENTILES):
        positions = [i + (offset - 1) * width for i in range(count)]
        heights = [getattr(v.profile.at(rows), name) for v in comparison.variants]
        axes.bar(
            positions,
            heights,
            width=width,
            color="tab:purple",
            alpha=shade,
            label=name.removesuffix("_ms"),
        )
    axes.set_xticks(range(count))
    axes.set_xticklabels([str(i) for i in range(1, count + 1)])
    axes.set_yscale("log")
    axes.set(
        title=f"batch of {rows:,} row" + ("s" if rows != 1 else ""),
        xlabel="model (number in the key)",
        ylabel="ms",
    )
    axes.grid(axis="y", alpha=0.3)
    if rows == comparison.parent.profile.batches[0].rows:
        axes.legend(fontsize="small", loc="upper left")
