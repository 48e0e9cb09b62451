"""`stemma run compress`: its options and the table it prints."""

from __future__ import annotations

from typing import Any

from stemma.components.platform.redaction import redact_url
from stemma.flows.cli.parser import add_spec_arguments

MODEL_REFERENCE = "models:/<name>@<alias> or models:/<name>/<version>"


def add_compress(flows: Any) -> None:
    compress = flows.add_parser(
        "compress",
        help="prune and distill a registered model and register the variants that pay",
        description=(
            "Build what the spec's compress section lists: a structurally pruned copy "
            "(whole hidden units removed, then a short fine-tune) and a distilled student "
            "(trained on the model's soft targets). Each is measured against its parent on "
            "the held-out rows it was gated on (metric, latency at batches of 1, 64 and "
            "4,096 rows, CPU-seconds and cost per million predictions) and registered as a "
            "variant (alias v<parent>-prune, v<parent>-distill) when it keeps the metric "
            "within compress.max_metric_drop and clears compress.min_speedup and "
            "compress.min_cost_reduction. compress.then_quantize quantizes them in turn."
        ),
    )
    add_spec_arguments(compress)
    compress.add_argument(
        "--model",
        help=f"{MODEL_REFERENCE} (default: compress.model, "
        "else the newest version that passed its gate)",
    )


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_compress_summary(summary: dict[str, Any]) -> str:
    """The comparison table printed at the end of `stemma run compress`."""
    metric, currency = summary["metric"], summary["currency"]
    prices = (
        " (illustrative prices: set cost.machines)" if summary.get("illustrative_prices") else ""
    )
    lines = [
        f"compressed {summary['model_name']} v{summary['parent_version']}: {metric} "
        f"{summary['parent_value']:.4f}, {summary['parent_parameters']:,} parameters, "
        f"{summary['parent_cost_per_million']:.4g} {currency} per million predictions "
        f"({summary['baseline_runtime']}){prices}",
        f"  measured on {summary['machine']}",
        f"  gate: {metric} drop <= {summary['metric_drop_limit']}, speed-up >= "
        f"{summary['min_speedup']:g}x, cost reduction >= {summary['min_cost_reduction']:.0%}",
        "",
        f"  {'method':<9}{'status':<10}{metric:>9}{'drop':>9}{'params':>10}"
        f"{'p50 b1':>9}{'b64':>8}{'b4096':>9}{'speed-up':>10}{'cost/M':>10}{'ratio':>7}  version",
    ]
    rows = {row["model"]: row for row in summary["table"]}
    for variant in summary["variants"]:
        row = rows.get(variant["method"], {})
        lines.append(
            f"  {variant['method']:<9}{variant['status'].upper():<10}"
            f"{_number(variant['value'], '.4f'):>9}{_number(variant['metric_drop'], '.4f'):>9}"
            f"{variant['parameters']:>10,}"
            f"{_number(row.get('p50_ms_b1'), '.3f'):>9}{_number(row.get('p50_ms_b64'), '.3f'):>8}"
            f"{_number(row.get('p50_ms_b4096'), '.2f'):>9}"
            f"{_number(variant['speedup'], '.2f', 'x'):>10}"
            f"{_number(variant['cost_per_million'], '.4g'):>10}"
            f"{_number(variant['cost_ratio'], '.2f', 'x'):>7}"
            f"  {('v' + variant['version']) if variant['version'] else '-'}"
        )
        if variant["status"] != "passed":
            lines += [f"      {reason}" for reason in variant["reasons"]]
        lines += [f"      note: {note}" for note in variant.get("notes") or ()]
    lines += [f"  note: {note}" for note in summary["notes"]]
    for done in summary.get("quantized") or ():
        passed = [f"{v['method']} v{v['version']}" for v in done["variants"] if v.get("version")]
        lines.append(
            f"  quantized {done['method']} v{done['version']}: "
            + (", ".join(passed) if passed else "no variant passed")
        )
    compared = summary.get("compared")
    if compared:
        rows = {row["model"]: row for row in compared["table"]}
        cheapest = rows.get(compared["cheapest"].split()[0], {})
        ratio = cheapest.get("cost_ratio")
        lines.append(
            f"  every variant of v{summary['parent_version']} compared: cheapest passing is "
            f"{compared['cheapest']}"
            + (f" at {ratio:.2f}x the parent's cost" if ratio is not None else "")
            + (f" (alias {compared['alias_name']})" if compared.get("cheapest_alias") else "")
            + f"; MLflow run {compared['run_id']}"
        )
    lines.append(f"  MLflow run {summary['run_id']} (compress/comparison.csv)")
    return redact_url("\n".join(lines))
