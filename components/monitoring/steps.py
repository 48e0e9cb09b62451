"""The monitoring flow's steps without the flow: find the batch (a file, a folder, or days of
the endpoint's prediction log) and its labels, name it, describe its source, write the
report's files, and summarise it per column."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stemma.components.data import prediction_log
from stemma.components.data.tables import dataset_source, resolve_data_version
from stemma.components.errors import DataError, DataVersionError
from stemma.components.monitoring.report import FEATURE, DriftReport, json_safe, plot_drift_report
from stemma.components.platform.tracking import DVCDatasetSource
from stemma.components.scoring.inputs import input_files

#: The report's files, in the run's ``drift/`` artifacts.
REPORT_FILE = "report.json"
STATISTICS_FILE = "statistics.csv"
PLOT_FILE = "summary.png"


@dataclass(frozen=True)
class BatchInput:
    """The files of a batch and the path its report names.

    Attributes:
        path: the file or folder given, or, from a prediction log, the one day folder read
            (else the log folder itself).
        files: the Parquet or CSV files to read, in order.
        days: the day folders read from a prediction log (empty for any other batch).
    """

    path: Path
    files: list[Path]
    days: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The batch's short name: a file's stem, a folder's name, a log's first..last day."""
        if len(self.days) > 1:
            return f"{self.days[0]}..{self.days[-1]}"
        return batch_name(str(self.path))

    def file_names(self) -> list[str]:
        """Each file's path relative to :attr:`path` (its name for a file or flat folder)."""
        if self.path.is_file():
            return [file.name for file in self.files]
        return [file.relative_to(self.path).as_posix() for file in self.files]

    def digest(self) -> tuple[str, list[str]]:
        """The batch's content digest (as DVC would record :attr:`path`) and each file's md5."""
        return prediction_log.folder_digest(self.path, self.files)


def find_batch(path: Path, days: int | None = None) -> BatchInput:
    """The batch at ``path``: a file, a folder of files, a day folder of the prediction log,
    or the log's ``predictions`` folder (every day, or the last ``days`` complete days).

    Raises:
        DataError: as :func:`~.scoring.inputs.input_files`; ``days`` given for a path that
            is not a prediction log folder.
        NothingLoggedError: the log holds no part in the window (or, with ``days``, does
            not exist yet).
    """
    path = Path(path)
    if days is not None and not path.exists():
        # A scheduled monitor of a log the endpoint has not written yet.
        raise prediction_log.NothingLoggedError(
            f"{path}: nothing was logged yet (no such folder)",
            ["the endpoint makes it once it starts with endpoint.log set"],
        )
    if prediction_log.is_log_folder(path):
        folders = prediction_log.select_days(path, days)
        files = [part for folder in folders for part in prediction_log.day_parts(folder)]
        shown = folders[0] if len(folders) == 1 else path
        return BatchInput(shown, files, tuple(folder.name for folder in folders))
    if days is not None:
        raise DataError(
            f"{path}: days apply to the prediction log's folder, and this is not one",
            [f"a log folder holds day folders: {prediction_log.PREDICTIONS}/YYYY-MM-DD/"],
        )
    return BatchInput(path, input_files(path))


def find_labels(path: Path) -> BatchInput:
    """The label files at ``path``: a file, a folder of files, or the prediction log's
    ``labels`` folder (every day: a label may arrive days after its row was scored).

    Raises:
        DataError: as :func:`~.scoring.inputs.input_files`, headed ``labels:``.
    """
    if prediction_log.is_log_folder(path):
        return BatchInput(Path(path), prediction_log.log_parts(path))
    try:
        return find_batch(path)
    except DataError as error:
        raise DataError(f"labels: {error.headline}", error.details) from None


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
