"""The continuous-training flow's steps without the flow: one run per pipeline at a time, the
run's cause, the new labelled rows and their data version, and the outcome's words."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stemma.components.data import ingest, prediction_log
from stemma.components.data.labels import label_text, labels_are_classes, read_labels
from stemma.components.data.tables import DataVersion, load_table, resolve_data_version
from stemma.components.errors import StemmaError
from stemma.components.platform import tags
from stemma.components.platform.lineage import read_run_record, record_node
from stemma.components.platform.tracking import STATE_DIR
from stemma.components.spec import DataSpec, LoadedSpec, RetrainSpec

#: Outcomes of a retraining run (the `stemma.retrain.outcome` tag).
NO_NEW_DATA = "no_new_data"
ALREADY_RUNNING = "already_running"
GATE_FAILED = "gate_failed"
PROMOTED = "promoted"
NOT_PROMOTED = "not_promoted"
FAILED = "failed"


class RetrainError(StemmaError):
    """The retraining run cannot go on (its cause or its inputs are broken)."""

    exit_code = 3


@dataclass(frozen=True)
class Gathered:
    """The data version now, its table, the new labelled rows, the held-out batch, and the
    batches the new rows came from with their digests (a file's md5, a day folder's
    ``.dir`` digest)."""

    version: DataVersion
    table: pd.DataFrame
    new: ingest.NewRows
    holdout: Path | None
    inputs: dict[Path, str] = field(default_factory=dict)
    #: Labels left out because the spec's classes or label map do not know them.
    unknown_labels: int = 0


@contextlib.contextmanager
def pipeline_lock(root: Path, pipeline: str) -> Iterator[bool]:
    """Hold the pipeline's retraining lock; yields False when another run holds it."""
    folder = root / STATE_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"retrain-{pipeline}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "since": time.time()}))
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cause_of(client: Any, cause: str | None) -> dict[str, str]:
    """What caused the run: the drift report's run id, its batch and drifted features.

    Raises:
        RetrainError: ``cause`` names a run that does not exist.
    """
    if not cause:
        return {"kind": "schedule"}
    try:
        report = client.get_run(cause)
    except Exception as error:
        raise RetrainError(
            f"the cause {cause!r} is not an MLflow run in this store",
            ["pass the run id of a drift report (the drift event's payload carries it)"],
        ) from error
    found = report.data.tags
    flow_name = found.get(tags.FLOW, "run")
    # The batch's path and the drifted features are in the report run's lineage record;
    # monitor runs of older Stemma versions carry them as tags.
    record = read_run_record(client, cause)
    batch: dict[str, Any] = next(
        (
            node["attributes"]
            for node in (asdict(node) for node in (record.nodes if record else []))
            if node["kind"] == "input" and node["attributes"].get("role") == "batch"
        ),
        {},
    )
    report_node = record_node(record, "drift_report") or {}
    drifted = (report_node.get("attributes") or {}).get("drifted_features")
    return {
        "kind": "drift_report" if flow_name == "monitor" else flow_name,
        "run_id": cause,
        "batch": batch.get("path") or found.get(tags.BATCH_PATH, found.get(tags.INPUT_PATH, "")),
        "batch_digest": found.get(tags.BATCH_DIGEST, found.get(tags.INPUT_DIGEST, "")),
        "features": ",".join(drifted) if drifted else found.get(tags.DRIFT_FEATURES, ""),
    }


def cause_tags(why: dict[str, str]) -> dict[str, str]:
    """The cause as tags to filter on: its kind and the run that caused it (when one did).
    The batch it judged and the drifted features are in the retraining run's record."""
    found = {tags.CAUSE_KIND: why["kind"]}
    if why.get("run_id"):
        found[tags.CAUSE_RUN_ID] = why["run_id"]
    return found


def gather(
    loaded: LoadedSpec, settings: RetrainSpec, batches: str | None, labels: str | None
) -> Gathered:
    """The production rows labelled since the current data version; the newest labelled
    batch is held out, so the shadow compares the models on rows neither was trained on.

    The batches are the files of a folder, or the day folders of the endpoint's prediction
    log (``<endpoint.log.path>/predictions``, a day being one batch), and the labels may be
    the log's ``labels`` folder (every day; an id labelled twice keeps its latest label).

    Raises:
        RetrainError: the spec names no ``data.id`` to join batches and labels by.
    """
    spec = loaded.spec
    if spec.data.id is None:
        raise RetrainError(
            f"{loaded.path}: retraining joins batches and labels by id, and data.id is not set"
        )
    version = resolve_data_version(loaded.root, loaded.resolve(spec.data.path))
    table = load_table(version.file_path, spec.data)
    batch_path = loaded.resolve(batches or settings.batches or spec.score.input)
    id_column, id_type = spec.data.id, table[spec.data.id].dtype
    all_labels = read_labels(
        loaded.resolve(labels or settings.labels),
        spec.data.id,
        spec.data.target,
        classes=labels_are_classes(spec.data),
    )
    all_labels, unknown = known_class_labels(all_labels, spec.data)
    labelled_ids = set(ingest.align_ids(all_labels[id_column], id_type, where="labels").tolist())
    labelled = [
        path
        for path in ingest.batch_files(batch_path)
        if ingest.align_ids(ingest.read_ids(path, id_column), id_type, where=str(path))
        .isin(labelled_ids)
        .any()
    ]
    holdout = labelled[-1] if len(labelled) > 1 else None
    # The log holds the model's inputs and the id: the table's other columns stay empty.
    from_log = prediction_log.is_log_folder(batch_path)
    known = {id_column, spec.data.target, *spec.data.features.all}
    new = ingest.gather_new_rows(
        table,
        [path for path in labelled if path != holdout],
        all_labels,
        id_column=id_column,
        target=spec.data.target,
        fillable=[column for column in table.columns if column not in known] if from_log else (),
    )
    used = [path for path in labelled if path.name in new.sources]
    digests = {path: batch_digest(path) for path in used}
    return Gathered(version, table, new, holdout, digests, unknown_labels=unknown)


def known_class_labels(labels: pd.DataFrame, data: DataSpec) -> tuple[pd.DataFrame, int]:
    """The labels the spec's label map and classes know, and how many others were left out
    (a class only production shows would stop the next training; with neither set, any
    label is a class the training split may learn)."""
    if data.labels is None and data.classes is None:
        return labels, 0
    text = labels[data.target].map(label_text)
    known = pd.Series(True, index=labels.index)
    if data.labels is not None:
        mapping = {label_text(raw): label_text(value) for raw, value in data.labels.items()}
        known &= text.isin(list(mapping))
        text = text.map(mapping)
    if data.classes is not None:
        known &= text.isin([label_text(value) for value in data.classes])
    return labels[known], int((~known).sum())


def batch_digest(path: Path) -> str:
    """A batch's content digest: a file's md5, or the ``.dir`` digest of a day folder's
    parts (what the drift monitor records for the same day)."""
    files = prediction_log.day_parts(path) if path.is_dir() else [path]
    return prediction_log.folder_digest(path, files)[0]


def record_version(loaded: LoadedSpec, gathered: Gathered) -> tuple[DataVersion, str | None]:
    """Append the new rows, record the new DVC version and commit its pointer."""
    new = gathered.new
    ingest.append_rows(gathered.version.file_path, gathered.table, new.frame)
    ingest.record_new_version(loaded.root, gathered.version)
    recorded = resolve_data_version(loaded.root, loaded.resolve(loaded.spec.data.path))
    rev = ingest.commit_pointer(
        loaded.root,
        recorded.dvc_file,
        f"Record data version {recorded.md5}: {new.rows} labelled production rows "
        f"from {', '.join(sorted(new.sources))}",
    )
    return recorded, rev


def too_few_rows(gathered: Gathered, settings: RetrainSpec) -> str | None:
    """Why there is no retraining (too few new rows), or None."""
    rows = gathered.new.rows
    if rows >= settings.min_new_rows:
        return None
    return (
        f"no retraining: {rows:,} new labelled rows since data version "
        f"{gathered.version.md5}, fewer than retrain.min_new_rows = {settings.min_new_rows:,}"
    )


def gathered_metrics(gathered: Gathered) -> dict[str, float]:
    """What the run logs about the rows it found."""
    new = gathered.new
    return {
        "new_rows": new.rows,
        "unlabelled_rows": new.unlabelled,
        "rows_already_in_table": new.already_in_table,
        "table_rows_before": len(gathered.table),
        "unknown_labels": gathered.unknown_labels,
    }


def before_shadow(
    gate: dict[str, Any], version: str, data_md5: str, holdout: Path | None, champion_alias: str
) -> tuple[str, str] | None:
    """The outcome when no shadow runs (gate failed, first champion, nothing held out) as
    ``(outcome, summary)``; None when the shadow decides."""
    if not gate["passed"]:
        return GATE_FAILED, f"retrained v{version} on {data_md5}: gate failed, nothing promoted"
    if gate.get("alias") == champion_alias:
        return PROMOTED, f"retrained v{version}: no champion existed, the gate made it champion"
    if holdout is None:
        return NOT_PROMOTED, (
            f"retrained v{version} (challenger): no held-out labelled batch to shadow it on yet"
        )
    return None


def after_shadow(
    promoted: bool, shadow: dict[str, Any], version: str, data_md5: str
) -> tuple[str, str]:
    """The outcome once the shadow decided, as ``(outcome, summary)``."""
    if promoted:
        return PROMOTED, (
            f"retrained v{version} on {data_md5}; shadow decided promote: "
            f"v{version} is the champion"
        )
    reasons = "; ".join(shadow.get("reasons", [])[:2])
    return NOT_PROMOTED, f"retrained v{version}; shadow decided {shadow['decision']}: {reasons}"
