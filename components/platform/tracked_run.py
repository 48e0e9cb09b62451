"""One tracked MLflow run: start → tags → params, metrics, artifacts → lineage → end.

Every flow records its work through :func:`tracked_run`. The run ends FINISHED (tag
``stemma.status=completed``) when the block completes, KILLED on an interruption and FAILED
on any other error (see :func:`.tracking.end_run_after`), with the reason in its tags.

A run is *active* (on MLflow's fluent stack, nested under a run already active) or
*detached* (created by the client and left off the stack, for a run that spans other flows'
runs, as retraining's does). Every method writes through the client with the run's id, so
both work alike. A run started inside another's block is its child (``mlflow.parentRunId``),
so MLflow's runs table nests a retraining's training, quantization, shadow and promotion
runs under it, and a canary's promotions and rollbacks under the canary run.
:meth:`TrackedRun.record_lineage` logs the record and its index tags (see :mod:`.lineage`),
or hands it to the ``lineage`` writer the flow passes (the flows add Prefect assets),
inside the run either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from stemma.components.platform import lineage as records
from stemma.components.platform import tags as tag_names
from stemma.components.platform import tracking
from stemma.components.platform.describe import NOTE_TAG, describe_record
from stemma.components.platform.redaction import redact
from stemma.components.platform.refs import logged_model_id

#: What records a lineage record in the active run: the record as a JSON document.
LineageWriter = Callable[[dict[str, Any]], None]
#: MLflow's tag naming the run a nested run belongs to.
PARENT_RUN_TAG = "mlflow.parentRunId"
#: The detached run whose block is running: runs started inside it are its children.
_DETACHED_PARENT: ContextVar[str | None] = ContextVar("stemma_detached_parent", default=None)


class TrackedRun:
    """The run a flow writes to; see :func:`tracked_run`.

    Attributes:
        run_id: MLflow's id of the run.
        experiment_id: its experiment.
        resumed: whether an earlier run was continued (``run_id`` was given).
        resumable: after a failure, whether the run may be resumed (an interruption, or
            the tracking server was down); False otherwise.
        end_status: the MLflow status the run ends with when the block completes
            (``FINISHED``; a run that records a refusal may set ``FAILED``).
    """

    def __init__(
        self, client: Any, run: Any, *, active: bool, resumed: bool, lineage: LineageWriter | None
    ) -> None:
        self.client = client
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.active = active
        self.resumed = resumed
        self.resumable = False
        self.end_status = "FINISHED"
        self._lineage = lineage
        #: Links the run's description shows besides its lineage (label: markdown target).
        self.links: dict[str, str] = {}
        #: The lineage record the run logged, once it has.
        self.document: dict[str, Any] | None = None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as strings), in as few requests as MLflow allows."""
        tracking.log_batches(self.client, self.run_id, tags=tags)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; long values are cut and credentials in URLs masked (as
        :func:`.tracking.log_params_flat` does)."""
        tracking.log_batches(self.client, self.run_id, params=params)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics with one timestamp, in as few requests as MLflow allows."""
        tracking.log_batches(self.client, self.run_id, metrics=metrics, step=step)

    def log_dict(self, document: Any, artifact_file: str) -> None:
        """Log a JSON (or YAML, by the file's suffix) document as an artifact."""
        self.client.log_dict(self.run_id, document, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file``."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, folder: Path, artifact_path: str) -> dict[str, str]:
        """Log every file under ``folder`` at ``artifact_path``.

        Returns:
            sha256 of each file logged, keyed by its artifact path (for lineage).
        """
        folder = Path(folder)
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        return records.artifact_digests(folder, artifact_path)

    def record_lineage(self, record: records.LineageRecord | Mapping[str, Any]) -> None:
        """Record the run's lineage: ``lineage/record.json`` and the index tags, or what
        the run's ``lineage`` writer does with the record."""
        document = redact(records.as_document(record))
        with self._activated():
            if self._lineage is not None:
                self._lineage(document)
            else:
                self.log_dict(document, records.RECORD_ARTIFACT)
                self.set_tags(records.index_tags(document, self.run_id))
            self.link_inputs(document)
        self.describe(document)

    def link_inputs(self, document: Mapping[str, Any]) -> None:
        """What the record says the run worked with, as the run's MLflow inputs: the model
        versions another run logged and, unless the flow logged a dataset itself, the batches
        it read with their digests; the run page lists them under "Logged models" and
        "Datasets"."""
        from mlflow.entities import LoggedModelInput
        from mlflow.exceptions import MlflowException

        models = []
        for node in document.get("nodes", []):
            name, _, version = str(node["id"]).removeprefix("models:/").partition("/")
            if node.get("kind") != "model_version" or not version.isdigit():
                continue
            try:
                found = self.client.get_model_version(name, version)
            except MlflowException:  # deleted since: the record still names it
                continue
            model_id = found.model_id or logged_model_id(found.source or "")
            models += (
                [LoggedModelInput(model_id)] if model_id and found.run_id != self.run_id else []
            )
        if models:
            self.client.log_inputs(self.run_id, models=models)
        if self.client.get_run(self.run_id).inputs.dataset_inputs:
            return
        _, used = records.record_roles(document, self.run_id)
        for node in (node for node in document.get("nodes", []) if node.get("id") in used):
            path, digest = (node.get("attributes") or {}).get("path"), node.get("digest")
            if node.get("kind") == "input" and path and digest:
                tracking.log_dataset_reference(
                    name=f"{document.get('pipeline') or 'stemma'}-batch",
                    source=str(path),
                    context="evaluation",
                    digest=str(digest).partition(":")[2] or str(digest),
                )

    def describe(self, document: Mapping[str, Any]) -> None:
        """Set the run's description (MLflow's note) from its lineage record."""
        self.set_tags({NOTE_TAG: self.description(document)})
        self.document = dict(document)

    def description(self, document: Mapping[str, Any], base: str = "") -> str:
        """The run's description from its lineage record (MLflow links start with ``base``)."""
        run = self.client.get_run(self.run_id)
        parent = run.data.tags.get(PARENT_RUN_TAG)
        return describe_record(
            document,
            self.run_id,
            links=self.links,
            parent_run=(self.experiment_id, parent) if parent else None,
            base=base,
        )

    @contextmanager
    def _activated(self) -> Iterator[None]:
        """The run on MLflow's fluent stack for the block (a detached run only then)."""
        import mlflow

        if self.active:
            yield
            return
        nested = mlflow.active_run() is not None
        with mlflow.start_run(run_id=self.run_id, nested=nested):
            yield


def _end_detached(handle: TrackedRun, error: BaseException) -> bool:
    """End a detached run after ``error`` as :func:`.tracking.end_run_after` ends an active
    one; a store that does not answer leaves it RUNNING and resumable."""
    try:
        with handle._activated():
            return tracking.end_run_after(error)
    except Exception:  # the store is unreachable: the original error is what matters
        return True


@contextmanager
def tracked_run(
    name: str | None,
    *,
    experiment_id: str | None,
    tags: Mapping[str, Any],
    run_id: str | None = None,
    lineage: LineageWriter | None = None,
    detached: bool = False,
    client: Any = None,
    links: Mapping[str, str] | None = None,
) -> Iterator[TrackedRun]:
    """Start (or resume) an MLflow run for the block and end it as the block ends.

    Args:
        name: the run's name (ignored when resuming).
        experiment_id: where a new run goes (ignored when resuming).
        tags: set at the start, with ``stemma.status=running``.
        run_id: an earlier run of the same work to continue.
        lineage: writes a lineage record inside the active run (see
            :meth:`TrackedRun.record_lineage`).
        detached: create the run through the client and keep it off MLflow's fluent stack,
            so flows called inside the block start runs of their own.
        client: the MLflow client of a detached run (default: one on the current store).
        links: links the run's description shows (label: markdown target), such as the
            Prefect flow run's page.

    Yields:
        The run. On success it ends FINISHED with ``stemma.status=completed``; on an error
        it ends KILLED (interruption) or FAILED with the reason in its tags and the error is
        raised again (:attr:`TrackedRun.resumable` says whether a rerun may resume it).
    """
    import mlflow

    if not detached or client is None:
        client = mlflow.MlflowClient()
    active = mlflow.active_run()
    parent = _DETACHED_PARENT.get() or (active.info.run_id if active else None)
    family = {PARENT_RUN_TAG: parent} if parent and not run_id else {}
    if detached and run_id:
        client.update_run(run_id, status="RUNNING")
        run = client.get_run(run_id)
    elif detached:
        run = client.create_run(str(experiment_id), run_name=name, tags=family)
    elif run_id:
        run = mlflow.start_run(run_id=run_id, nested=active is not None)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=name, nested=active is not None, tags=family
        )
    handle = TrackedRun(client, run, active=not detached, resumed=bool(run_id), lineage=lineage)
    handle.links.update(links or {})
    children = _DETACHED_PARENT.set(handle.run_id) if detached else None
    try:
        handle.set_tags({**tags, tag_names.STATUS: "running"})
        yield handle
        handle.set_tags({tag_names.STATUS: "completed"})
    except BaseException as error:
        if detached:
            handle.resumable = _end_detached(handle, error)
        else:
            handle.resumable = tracking.end_run_after(error)
        raise
    finally:
        if children is not None:
            _DETACHED_PARENT.reset(children)
    if detached:
        client.set_terminated(handle.run_id, handle.end_status)
    else:
        mlflow.end_run(status=handle.end_status)
