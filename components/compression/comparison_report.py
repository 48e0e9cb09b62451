"""What a comparison run leaves behind besides its plot: a summary, a markdown table for
the run's description, and the lineage record."""

from __future__ import annotations

from typing import Any

from stemma.components.compression.comparison import VersionComparison
from stemma.components.platform import metric_names
from stemma.components.platform.lineage import (
    Edge,
    LineageRecord,
    Node,
    created_stamp,
    data_node_id,
    model_node_id,
    run_node,
)
from stemma.components.quantization import registering
from stemma.components.spec.compress import format_amount

#: The section of a run's metrics a comparison logs (``compare/v3.cost_per_million``).
COMPARE_SECTION = metric_names.COMPARE
#: Artifacts of a comparison, under the run's artifacts.
TABLE_CSV = "compare/variants.csv"
TABLE_JSON = "compare/variants.json"
PLOT_FOLDER = "compare"
PLOT_FILE = "tradeoff.png"


def comparison_summary(comparison: VersionComparison, cheapest_alias: str | None) -> dict[str, Any]:
    """The comparison as a plain dict: the flows return it and the CLI prints it."""
    cheapest = comparison.cheapest
    return {
        "model_name": comparison.model_name,
        "parent_version": comparison.parent_version,
        "metric": comparison.metric,
        "higher_is_better": comparison.higher_is_better,
        "parent_value": comparison.parent_value,
        "metric_drop_limit": comparison.metric_drop_text,
        "rows": comparison.rows,
        "machine": comparison.machine,
        "currency": comparison.currency,
        "illustrative_prices": comparison.illustrative_prices,
        "measured_on": comparison.measured_on,
        "cheapest_version": cheapest.version,
        "cheapest": cheapest.label,
        "cheapest_is_parent": cheapest.is_parent,
        "cheapest_alias": cheapest_alias,
        "alias_name": registering.cheapest_alias(comparison.parent_version),
        "table": comparison.table(),
        "notes": list(comparison.notes),
    }


def comparison_markdown(comparison: VersionComparison) -> str:
    """The key rows of the comparison as a markdown table, for the run's description."""
    metric = comparison.metric
    lines = [
        f"**Variants of {comparison.model_name} v{comparison.parent_version}** on "
        f"{comparison.rows} held-out rows; cost per million predictions on "
        f"{comparison.machine}"
        + (" (illustrative prices)" if comparison.illustrative_prices else "")
        + f"; {metric} drop limit {comparison.metric_drop_text}.",
        "",
        f"| model | chain | {metric} | drop | p50 ms b64 | rows/s | "
        f"cost/M ({comparison.currency}) | x parent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cheapest = comparison.cheapest.version
    for variant in comparison.variants:
        mark = " **cheapest**" if variant.version == cheapest else ""
        lines.append(
            f"| v{variant.version}{mark} | {variant.chain_text} | {variant.value:.4f} | "
            f"{variant.metric_drop:+.4f} | {variant.profile.at(64).p50_ms:.3g} | "
            f"{variant.profile.rows_per_s:,.0f} | {format_amount(variant.cost_per_million)} | "
            f"{variant.cost_ratio:.2f} |"
        )
    lines += [f"\n{note}" for note in comparison.notes]
    return "\n".join(lines) + "\n"


def comparison_record(
    comparison: VersionComparison,
    *,
    pipeline: str,
    run_id: str,
    experiment_id: str,
    flow_run_id: str | None,
) -> LineageRecord:
    """The lineage record of a comparison: every model compared and the held-out rows in,
    the run's figures in ``variants``."""
    data = data_node_id(comparison.data_pointer, comparison.data_md5)
    run = run_node(run_id, experiment_id, flow_run_id)
    nodes = [
        Node(
            "data_version",
            data,
            f"md5:{comparison.data_md5}",
            {"pointer": comparison.data_pointer, "split": "test", "rows": comparison.rows},
        ),
        run,
    ]
    edges = [Edge(data, run.id, "evaluated_on")]
    for variant in comparison.variants:
        node = model_node_id(comparison.model_name, variant.version)
        digest = f"sha256:{variant.weights_sha256}" if variant.weights_sha256 else None
        nodes.append(Node("model_version", node, digest, {"chain": variant.chain_text}))
        edges.append(Edge(node, run.id, "input_of"))
    return LineageRecord(
        flow="compare",
        pipeline=pipeline,
        nodes=nodes,
        edges=edges,
        created=created_stamp(),
        variants=comparison.table(),
    )
