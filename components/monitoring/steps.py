"""The monitoring flow's steps without the flow: name the batch, describe its source, write
the report's files, and summarise it per column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stemma.components.data.tables import dataset_source, resolve_data_version
from stemma.components.errors import DataVersionError
from stemma.components.monitoring.report import FEATURE, DriftReport, json_safe, plot_drift_report
from stemma.components.platform.tracking import DVCDatasetSource

#: The report's files, in the run's ``drift/`` artifacts.
REPORT_FILE = "report.json"
STATISTICS_FILE = "statistics.csv"
PLOT_FILE = "summary.png"


def batch_name(batch: str | None) -> str:
    """A batch's short name: a file's stem or a folder's name (``batch`` when unnamed)."""
    if not batch:
        return "batch"
    path = Path(batch)
    return path.stem if path.suffix else path.name


def batch_source(root: Path, path: Path, git_rev: str | None) -> DVCDatasetSource | str:
    """A DVC source when DVC versions the batch (and the bytes match), else the local path."""
    try:
        version = resolve_data_version(root, path)
    except DataVersionError:
        return str(path)
    return dataset_source(version, root, git_rev)


def flat_params(prefix: str, value: Any) -> dict[str, str]:
    """A nested document as ``prefix.key.subkey -> value`` params (non-strings as JSON)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flat_params(f"{prefix}.{key}", item))
        return out
    return {prefix: json.dumps(value) if not isinstance(value, str) else value}


def write_report_files(report: DriftReport, folder: Path, *, title: str) -> bytes:
    """Write the report's JSON, statistics table and plot into ``folder``; the JSON's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    document = json.dumps(report.to_dict(), indent=2, sort_keys=True).encode("utf-8")
    (folder / REPORT_FILE).write_bytes(document)
    report.table().to_csv(folder / STATISTICS_FILE, index=False)
    plot_drift_report(report, folder / PLOT_FILE, title=title)
    return document


def column_summary(report: DriftReport) -> dict[str, dict[str, Any]]:
    """Per column (a feature by name, else its role): drifted, breaches and statistics."""
    return {
        column.name if column.role == FEATURE else column.role: {
            "role": column.role,
            "drifted": column.drifted,
            "breaches": list(column.breaches),
            **json_safe(dict(column.statistics)),
        }
        for column in report.columns
    }
