"""The closing summaries `stemma run FLOW` prints, one formatter per flow."""

from __future__ import annotations

from pathlib import Path

from stemma.components.platform.redaction import redact_url


def format_train_summary(summary: dict) -> str:
    """The one-screen summary printed at the end of `stemma run train`."""
    gate = summary["gate"]
    lines = [
        f"trained {summary['model_name']} version {summary['model_version']} "
        f"(run {summary['run_id']}, data {summary['data_md5']})",
        f"  {gate['metric']} on the test split: {gate['value']:.4f}",
        f"  gate: {'PASSED' if gate['passed'] else 'FAILED'}"
        + (f", alias '{gate['alias']}'" if gate.get("alias") else ", no alias"),
    ]
    lines += [f"    - {reason}" for reason in gate["reasons"]]
    if summary.get("resumed"):
        lines.append("  resumed an interrupted run from its last checkpoint")
    quantized = summary.get("quantize")
    if quantized and "error" in quantized:
        lines.append(f"  quantize: FAILED: {quantized['error'].splitlines()[0]}")
    elif quantized:
        lines.append(
            "  quantize: "
            + ", ".join(
                f"{v['method']} {v['status']}" + (f" (v{v['version']})" if v["version"] else "")
                for v in quantized["variants"]
            )
        )
    lines.append(f"  MLflow: {summary['tracking_uri']}  (experiment '{summary['experiment']}')")
    if summary.get("ui_hint"):
        lines.append(f"  {summary['ui_hint']}")
    return redact_url("\n".join(lines))


def format_monitor_summary(summary: dict) -> str:
    """The summary printed at the end of `stemma run monitor`: the verdict, then the findings."""
    if summary.get("outcome") == "nothing_logged":
        return str(summary["summary"])
    verdict = "DRIFT" if summary["drift_detected"] else "no drift"
    lines = [
        f"{verdict}: {summary['batch']} vs {summary['model_uri']} "
        f"(v{summary['model_version']}): {summary['summary']}"
    ]
    lines += [f"  - {reason}" for reason in summary["reasons"]]
    if summary.get("labels") and not summary["labelled_rows"]:
        lines.append(f"  no label in {summary['labels']} matched a row of the batch")
    if summary.get("scores"):
        scores = summary["scores"]
        lines.append(
            f"  scores: {scores['logged']} as the endpoint logged them, "
            f"{scores['rescored']} scored again (logged by another version)"
        )
    if summary.get("event_id"):
        lines.append(f"  event stemma.drift.detected emitted (id {summary['event_id']})")
    lines.append(
        f"  report: MLflow run {summary['run_id']} (experiment '{summary['experiment']}'), "
        "drift/summary.png"
    )
    return redact_url("\n".join(lines))


def format_quantize_summary(summary: dict) -> str:
    """The comparison table printed at the end of `stemma run quantize`."""

    def number(value: float | None, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    metric = summary["metric"]
    lines = [
        f"quantized {summary['model_name']} v{summary['parent_version']}: {metric} "
        f"{summary['parent_value']:.4f} on {summary['rows']} held-out rows; "
        f"{summary.get('clock', 'wall')}-time ms per forward pass of {summary['batch_rows']} "
        f"rows, {summary['threads']} thread(s), median of {summary['repeats']}",
        "  fp32: "
        + ", ".join(f"{runtime} {ms:.3f} ms" for runtime, ms in summary["parent_ms"].items())
        + f"  (baseline: {summary['baseline_runtime']}); "
        + f"{summary.get('parent_size_bytes', 0) / 1024:.1f} KiB on disk",
        f"  gate: {metric} drop <= {summary.get('metric_drop_limit') or summary['max_metric_drop']}"
        f" and speed-up >= {summary['min_speedup']:g}x",
        "",
        f"  {'method':<17}{'status':<10}{metric:>9}{'drop':>9}{'agree':>8}{'|dscore|':>10}"
        f"{'runtime':>12}{'ms':>9}{'speed-up':>10}{'size':>10}  version",
    ]
    for variant in summary["variants"]:
        agreement = variant["agreement"]
        size = variant["size_bytes"]
        lines.append(
            f"  {variant['method']:<17}{variant['status'].upper():<10}"
            f"{number(variant['value'], '.4f'):>9}{number(variant['metric_drop'], '.4f'):>9}"
            f"{number(None if agreement is None else agreement * 100, '.2f', '%'):>8}"
            f"{number(variant['mean_abs_diff'], '.2e'):>10}{variant['runtime'] or '-':>12}"
            f"{number(variant['latency_ms'], '.3f'):>9}{number(variant['speedup'], '.2f', 'x'):>10}"
            f"{number(None if size is None else size / 1024, '.1f', ' KiB'):>10}"
            f"  {('v' + variant['version']) if variant['version'] else '-'}"
        )
        if variant["status"] != "passed":
            lines += [f"      {reason}" for reason in variant["reasons"]]
    lines += [f"  note: {note}" for note in summary["notes"]]
    lines.append("")
    if summary["served_version"]:
        lines.append(
            f"  models:/{summary['model_name']}@{summary['served_alias']} -> "
            f"v{summary['served_version']} (fastest passing variant"
            + (", served by `stemma run score`: quantize.serve is on)" if summary["serve"] else ")")
        )
    else:
        lines.append("  no variant passed: batch scoring keeps the fp32 model")
    if summary["removed_abandoned"]:
        lines.append(
            "  removed half-registered versions left by a killed run: "
            + ", ".join(f"v{v}" for v in summary["removed_abandoned"])
        )
    lines.append(
        f"  MLflow run {summary['run_id']} (quantize/comparison.csv, quantize/tradeoff.png)"
    )
    return redact_url("\n".join(lines))


def format_shadow_summary(summary: dict) -> str:
    """The summary printed at the end of `stemma run shadow`: decision, reasons, numbers."""
    name = summary["model_name"]
    lines = [
        f"shadow: {name} v{summary['challenger_version']} vs champion "
        f"v{summary['champion_version']}: {summary['decision'].upper()}"
    ]
    lines += [f"  - {reason}" for reason in summary["reasons"]]
    distances = summary["distances"]
    lines.append(
        f"  {summary['compared_rows']:,} rows compared, {summary['labelled_rows']:,} labelled; "
        f"decisions agree on {summary['agreement']:.1%}; score PSI {distances['psi']:.4f}, "
        f"KS {distances['ks']:.4f}; challenger error rate {summary['challenger_error_rate']:.2%}"
    )
    if summary.get("promotion"):
        record = summary["promotion"]
        lines.append(
            f"  promotion: {record['outcome']} (champion v{record['from_version']} -> "
            f"v{record['to_version']}, MLflow run {record.get('record_run_id')})"
        )
    lines.append(f"  served: {summary['served_output']}  shadow: {summary['shadow_output']}")
    lines.append(f"  labels: {summary['labels']}")
    lines.append(f"  MLflow run {summary['run_id']} (plots and report under shadow/)")
    return redact_url("\n".join(lines))


def format_canary_summary(summary: dict) -> str:
    """The summary printed at the end of `stemma run canary`: each step, then the state."""
    lines = [f"canary: {summary['describe']}" + (" (started)" if summary["started"] else "")]
    for step in summary["steps"]:
        moved = "" if step["action"] == "none" else f"; {step['action']} {step['outcome']}"
        lines.append(
            f"  {Path(step['batch']).name}: {step['fraction']:.0%} ({step['arm_rows']:,} of "
            f"{step['rows']:,} rows to the challenger) -> {step['decision']}{moved}"
        )
        lines += [f"      {reason}" for reason in step["reasons"]]
        if left_out := step.get("log", {}).get("skipped"):
            counts = ", ".join(f"{rows:,} of {served}" for served, rows in left_out.items())
            lines.append(f"      rows not counted (served by another version): {counts}")
    if summary["skipped"]:
        lines.append(f"  already processed: {', '.join(summary['skipped'])}")
    if summary.get("waiting"):
        lines.append(
            f"  days still being written (judged once over): {', '.join(summary['waiting'])}"
        )
    if summary.get("before_start"):
        lines.append(
            f"  {len(summary['before_start'])} day(s) of the log before the canary started"
        )
    if summary["left"]:
        lines.append(f"  not processed (the canary has ended): {len(summary['left'])} batch(es)")
    lines.append(f"  predictions: {summary['output']}  labels: {summary['labels']}")
    return redact_url("\n".join(lines))


def format_score_summary(summary: dict) -> str:
    """The one-line summary (and where to look) printed at the end of `stemma run score`."""
    lines = [summary["summary"]]
    if summary.get("serving"):
        lines.append(f"  {summary['serving']}")
    own = " (a folder of its own for this input; score.output is untouched)"
    lines.append(f"  output: {summary['output']}" + (own if summary.get("own_output") else ""))
    if summary["rows"]["rejected"]:
        lines.append(f"  rejected rows and their reasons: {summary['output']}/rejects/")
    if summary["extra_columns"]:
        lines.append(f"  ignored input columns: {', '.join(summary['extra_columns'])}")
    if summary.get("prediction_counts"):
        counts = ", ".join(
            f"{item['class']} {item['rows']:,}" for item in summary["prediction_counts"]
        )
        lines.append(f"  rows per predicted class: {counts}")
    if summary.get("cost"):
        lines.append(f"  {summary['cost']['line']}")
    lines.append(f"  manifest: {summary['manifest']}  (MLflow run {summary['run_id']})")
    return redact_url("\n".join(lines))


def format_retrain_summary(summary: dict) -> str:
    """The closing lines of `stemma run retrain`: the outcome and where to look."""
    lines = [summary["summary"]]
    if summary.get("data_md5") and summary.get("previous_data_md5"):
        lines.append(
            f"  data: {summary['previous_data_md5']} -> {summary['data_md5']} "
            f"(+{summary['new_rows']:,} rows"
            + (
                f", committed {summary['data_git_rev'][:10]})"
                if summary.get("data_git_rev")
                else ")"
            )
        )
    cause = summary.get("cause") or {}
    if cause.get("run_id"):
        lines.append(f"  cause: {cause['kind']} {cause['run_id']} on {cause.get('batch') or '?'}")
    if summary.get("run_id"):
        lines.append(f"  MLflow run {summary['run_id']}")
    return redact_url("\n".join(lines))


def _gpu_lines(summary: dict) -> list[str]:
    """The comparison's GPU rows (fp32, fp16, bf16, ONNX Runtime's CUDA provider), if any."""
    metric, lines = summary["metric"], []
    for row in summary.get("gpu") or ():
        cost = row.get("cost_per_million")
        priced = f", {cost:.3g} {summary['currency']}/M on {row['machine']}" if cost else ""
        lines.append(
            f"  GPU {row['model']}: {metric} {row[metric]:.4f} (drop {row['metric_drop']:+.4f}), "
            f"p50 {row['p50_ms_b1']:.3f} / {row['p50_ms_b64']:.3f} / {row['p50_ms_b4096']:.2f} ms "
            f"at 1 / 64 / 4096 rows, {row['rows_per_s']:,.0f} rows/s{priced}"
        )
    return lines


def format_compare_summary(summary: dict) -> str:
    """The table printed at the end of `stemma run compare`: every model of the version."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else f"{value:{spec}}"

    def size(value: float | None) -> str:
        if value is None:
            return "-"
        for unit in ("B", "KB", "MB", "GB"):
            if value < 1024 or unit == "GB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
        return "-"

    metric = summary["metric"]
    prices = " (illustrative prices)" if summary.get("illustrative_prices") else ""
    header = (
        "model",
        "method",
        metric,
        "drop",
        "p50 b1 ms",
        "p50 b64 ms",
        "p50 b4096 ms",
        "rows/s",
        "weights",
        "CPU-s/M",
        f"cost/M {summary['currency']}",
    )
    rows = [header]
    for row in summary["table"]:
        mark = " *" if row.get("cheapest") else ""
        rows.append(
            (
                f"v{row['version']}{mark}",
                row["chain"],
                number(row[metric], ".4f"),
                number(row["metric_drop"], "+.4f"),
                number(row.get("p50_ms_b1"), ".3f"),
                number(row.get("p50_ms_b64"), ".3f"),
                number(row.get("p50_ms_b4096"), ".2f"),
                number(row["rows_per_s"], ",.0f"),
                size(row["weights_bytes"]),
                number(row["cpu_s_per_million"], ".3g"),
                number(row["cost_per_million"], ".3g"),
            )
        )
    widths = [max(len(str(line[i])) for line in rows) for i in range(len(header))]
    lines = [
        f"compared {summary['model_name']} v{summary['parent_version']} with "
        f"{len(summary['table']) - 1} variant(s): {metric} on {summary['rows']} held-out rows "
        f"(drop limit {summary['metric_drop_limit']}); cost on {summary['machine']}{prices}"
    ]
    lines += [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
        for line in rows
    ]
    lines += _gpu_lines(summary)
    if summary.get("cheapest_alias"):
        lines.append(
            f"  * cheapest passing: {summary['cheapest']} -> alias {summary['alias_name']} "
            "(served with compress.serve: cheapest)"
        )
    else:
        lines.append(
            f"  * cheapest: the parent itself; no variant undercuts it "
            f"({summary['alias_name']} removed or never set)"
        )
    lines += [f"  {note}" for note in summary.get("notes", [])]
    lines.append(f"  MLflow run {summary['run_id']} (compare/variants.csv, compare/tradeoff.png)")
    return redact_url("\n".join(lines))
