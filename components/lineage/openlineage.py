"""A walked lineage graph as OpenLineage run events, sent through the client's transports.

Each run node of the graph becomes one OpenLineage run (START, then COMPLETE, FAIL or
ABORT as MLflow recorded it) whose id is the MLflow run id read as a UUID. Its inputs are
the graph's nodes that lead into the run without passing another run; its outputs the
nodes it leads to. A model version made by a training run and scored by a scoring run is
thus the output of one job and the input of the next, as OpenLineage consumers expect.

Facets:

* standard: ``version`` (DatasetVersionDatasetFacet: the md5 or sha256 of every node with
  a digest), ``dataQualityAssertions`` (DataQualityAssertionsDatasetFacet, one assertion
  per Great Expectations expectation, on the dataset a validation checked),
  ``outputStatistics`` (rows a scoring run wrote);
* Stemma's own, each with ``_producer`` and ``_schemaURL``: ``stemma_node`` (kind, id,
  digest, created, made by, flow run; on every dataset), ``stemma_dvc`` (pointer, md5,
  path, git revision), ``stemma_mlflow_model_version`` (name, version, weights sha256,
  aliases) and the run facet ``stemma_mlflow_run`` (run, experiment, tracking URI, Prefect
  flow run, flow, status).

No credential leaves in an event: the tracking URI, node ids and attributes go through
:func:`~.redaction.redact` (``http://user:***@host``), as does every target URL shown.

A FILE target gets the events as JSON lines through the client's file transport, written
to a temporary file and renamed into place; an ``http(s)://`` target gets them POSTed
through the client's HTTP transport (to ``/api/v1/lineage`` when the URL has no path).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    RunFacet,
    data_quality_assertions_dataset,
    dataset_version_dataset,
    output_statistics_output_dataset,
)

from stemma.components.errors import LineageError
from stemma.components.lineage.graph import GraphNode, LineageGraph
from stemma.components.lineage.index import RUN_PREFIX
from stemma.components.platform.files import write_file_atomically
from stemma.components.platform.lineage import reach
from stemma.components.platform.redaction import redact, redact_url
from stemma.components.platform.tracking import read_run_artifact

if TYPE_CHECKING:
    from mlflow import MlflowClient

#: Who wrote the events (OpenLineage's ``producer``, a URI).
PRODUCER = "urn:stemma:lineage-export:1"
#: Where Stemma's custom facets are described (their ``_schemaURL``, a URI).
FACETS_SCHEMA = "urn:stemma:openlineage-facets:1"
#: Namespace of Stemma's jobs and datasets in OpenLineage.
NAMESPACE = "stemma"
#: The OpenLineage endpoint POSTed to when a URL has no path (Marquez's).
DEFAULT_ENDPOINT = "api/v1/lineage"
#: Seconds before an HTTP request gives up, and how often a failed one is retried.
HTTP_TIMEOUT_S = 5.0
HTTP_RETRIES = 2
#: MLflow run status to OpenLineage's final event type.
FINAL_STATES = {
    "FINISHED": RunState.COMPLETE,
    "FAILED": RunState.FAIL,
    "KILLED": RunState.ABORT,
    "RUNNING": RunState.RUNNING,
    "SCHEDULED": RunState.OTHER,
}
#: Artifact of a training run holding the Great Expectations result.
VALIDATION_ARTIFACT = "checks/validation_result.json"


class _StemmaFacet:
    """Stemma's own facets: each one's ``_schemaURL`` is its class in :data:`FACETS_SCHEMA`."""

    @classmethod
    def _get_schema(cls) -> str:
        return f"{FACETS_SCHEMA}#/$defs/{cls.__name__}"


@attr.define
class StemmaNodeDatasetFacet(_StemmaFacet, DatasetFacet):
    """The lineage node a dataset stands for."""

    kind: str
    nodeId: str
    digest: str | None = attr.field(default=None)
    created: str | None = attr.field(default=None)
    madeBy: str | None = attr.field(default=None)
    flowRunId: str | None = attr.field(default=None)


@attr.define
class StemmaDvcDatasetFacet(_StemmaFacet, DatasetFacet):
    """A data version as DVC records it."""

    md5: str
    pointer: str | None = attr.field(default=None)
    path: str | None = attr.field(default=None)
    gitRev: str | None = attr.field(default=None)


@attr.define
class StemmaMlflowModelVersionDatasetFacet(_StemmaFacet, DatasetFacet):
    """A registered MLflow model version."""

    name: str
    version: str
    weightsSha256: str | None = attr.field(default=None)
    aliases: list[str] = attr.field(factory=list)
    gate: str | None = attr.field(default=None)


@attr.define
class StemmaMlflowRunFacet(_StemmaFacet, RunFacet):
    """The MLflow run (and Prefect flow run) an OpenLineage run stands for."""

    runId: str
    experimentId: str | None = attr.field(default=None)
    trackingUri: str | None = attr.field(default=None)
    status: str | None = attr.field(default=None)
    flow: str | None = attr.field(default=None)
    pipeline: str | None = attr.field(default=None)
    prefectFlowRunId: str | None = attr.field(default=None)


# ---------------------------------------------------------------------------------------
# Building events


def openlineage_run_id(run_id: str) -> str:
    """An MLflow run id (32 hex digits) read as a UUID; any other id hashed to one."""
    try:
        return str(uuid.UUID(hex=run_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{RUN_PREFIX}{run_id}"))


def fetch_assertions(client: MlflowClient, graph: LineageGraph) -> dict[str, list[dict[str, Any]]]:
    """Per validation node, its expectations' outcomes, read from the run that recorded it.

    Downloads one small artifact per validation node (the Great Expectations result);
    a node whose artifact cannot be read gets one suite-level assertion from its record.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for node in graph.nodes.values():
        if node.kind != "validation":
            continue
        runs = [e.target for e in graph.edges if e.source == node.id and _is_run(e.target)]
        artifact = str(node.attributes.get("artifact") or VALIDATION_ARTIFACT)
        for run in runs:
            results = _download_results(client, run[len(RUN_PREFIX) :], artifact)
            if results is not None:
                found[node.id] = results
                break
        else:
            if "success" in node.attributes:
                found[node.id] = [
                    {"assertion": "expectation_suite", "success": bool(node.attributes["success"])}
                ]
    return found


def _download_results(client: MlflowClient, run_id: str, artifact: str) -> list[dict] | None:
    text = read_run_artifact(client, run_id, artifact)  # None: no such artifact
    try:
        document = None if text is None else json.loads(text)
    except ValueError:  # an unreadable one
        document = None
    if document is None:  # fall back to the record's verdict
        return None
    results = []
    for item in document.get("results", []) if isinstance(document, dict) else []:
        config = item.get("expectation_config") or {}
        kwargs = config.get("kwargs") or {}
        results.append(
            {
                "assertion": str(config.get("type") or config.get("expectation_type")),
                "success": bool(item.get("success")),
                "column": kwargs.get("column"),
            }
        )
    return results


def _is_run(node_id: str) -> bool:
    return node_id.startswith(RUN_PREFIX)


def _reach(graph: LineageGraph, run: str, *, upstream: bool) -> list[str]:
    """Nodes reached from ``run`` in one direction without passing another run."""
    return sorted(reach(graph.edges, run, upstream=upstream, passes=lambda node: not _is_run(node)))


def _redacted(node: GraphNode) -> GraphNode:
    """The node as an event may show it: no credential in its id or attributes."""
    return replace(
        node,
        id=redact_url(node.id),
        made_by=redact_url(node.made_by) if node.made_by else node.made_by,
        attributes=redact(node.attributes),
    )


def _dataset_facets(node: GraphNode) -> dict[str, Any]:
    facets: dict[str, Any] = {
        "stemma_node": StemmaNodeDatasetFacet(
            kind=node.kind,
            nodeId=node.id,
            digest=node.digest,
            created=node.created,
            madeBy=node.made_by,
            flowRunId=node.flow_run_id,
            producer=PRODUCER,
        )
    }
    if node.digest:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=node.digest, producer=PRODUCER
        )
    if node.digest and node.digest.startswith("md5:"):
        facets["stemma_dvc"] = StemmaDvcDatasetFacet(
            md5=node.digest.removeprefix("md5:"),
            pointer=node.attributes.get("pointer"),
            path=node.attributes.get("path"),
            gitRev=node.attributes.get("git_rev"),
            producer=PRODUCER,
        )
    if node.kind == "model_version" and node.id.startswith("models:/"):
        name, _, version = node.id.removeprefix("models:/").rpartition("/")
        facets["stemma_mlflow_model_version"] = StemmaMlflowModelVersionDatasetFacet(
            name=name,
            version=version,
            weightsSha256=(node.digest or "").removeprefix("sha256:") or None,
            aliases=list(node.attributes.get("aliases") or []),
            gate=node.attributes.get("gate"),
            producer=PRODUCER,
        )
    return facets


def _assertions_facet(
    graph: LineageGraph, node_id: str, assertions: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The data-quality facet of an input that validations checked, else nothing."""
    checked = [
        assertions[e.target] for e in graph.edges if e.source == node_id and e.target in assertions
    ]
    if not checked:
        return {}
    facet = data_quality_assertions_dataset.DataQualityAssertionsDatasetFacet(
        assertions=[
            data_quality_assertions_dataset.Assertion(
                assertion=item["assertion"], success=item["success"], column=item.get("column")
            )
            for results in checked
            for item in results
        ],
        producer=PRODUCER,
    )
    return {"dataQualityAssertions": facet}


def _datasets(
    graph: LineageGraph, run_id: str, assertions: dict[str, list[dict[str, Any]]]
) -> tuple[list[InputDataset], list[OutputDataset]]:
    """The datasets a run read, with the assertions of the validations that checked them,
    and those it wrote, with their row counts when known."""
    statistics = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet
    inputs: list[InputDataset] = []
    outputs: list[OutputDataset] = []
    for node_id in _reach(graph, run_id, upstream=True):
        node = _redacted(graph.nodes[node_id])
        facets = _dataset_facets(node)
        checked = _assertions_facet(graph, node_id, assertions)
        inputs.append(InputDataset(NAMESPACE, node.id, facets=facets, inputFacets=checked))
    for node_id in _reach(graph, run_id, upstream=False):
        node = _redacted(graph.nodes[node_id])
        rows = node.attributes.get("rows_scored")
        written: dict[str, Any] = {}
        if isinstance(rows, int):
            written["outputStatistics"] = statistics(rowCount=rows, producer=PRODUCER)
        facets = _dataset_facets(node)
        outputs.append(OutputDataset(NAMESPACE, node.id, facets=facets, outputFacets=written))
    return inputs, outputs


def _job_and_run(run: GraphNode, tracking_uri: str | None) -> tuple[Job, Run]:
    """The OpenLineage job (``<pipeline>.<flow>``) and run of an MLflow run node."""
    pipeline = run.attributes.get("pipeline") or "stemma"
    flow = run.attributes.get("flow") or "run"
    mlflow_run = run.id[len(RUN_PREFIX) :]
    facet = StemmaMlflowRunFacet(
        runId=mlflow_run,
        experimentId=run.attributes.get("experiment_id"),
        trackingUri=redact_url(tracking_uri) if tracking_uri else None,
        status=run.attributes.get("status"),
        flow=flow,
        pipeline=pipeline,
        prefectFlowRunId=run.flow_run_id,
        producer=PRODUCER,
    )
    job = Job(namespace=NAMESPACE, name=f"{pipeline}.{flow}")
    return job, Run(runId=openlineage_run_id(mlflow_run), facets={"stemma_mlflow_run": facet})


def build_events(
    graph: LineageGraph,
    *,
    tracking_uri: str | None = None,
    assertions: dict[str, list[dict[str, Any]]] | None = None,
) -> list[RunEvent]:
    """OpenLineage START and final events for every run in ``graph``, oldest run first.

    Args:
        graph: a walked graph.
        tracking_uri: the MLflow store, recorded in the run facet.
        assertions: per validation node, from :func:`fetch_assertions`.
    """
    runs = sorted(
        (node for node in graph.nodes.values() if node.kind == "run"),
        key=lambda node: (node.created or "", node.id),
    )
    events: list[RunEvent] = []
    for original in runs:
        run = _redacted(original)
        job, ol_run = _job_and_run(run, tracking_uri)
        inputs, outputs = _datasets(graph, original.id, assertions or {})
        started = run.created or datetime.now(UTC).isoformat()
        ended = run.attributes.get("ended") or started
        final = FINAL_STATES.get(str(run.attributes.get("status")), RunState.OTHER)
        for event_type, moment in ((RunState.START, started), (final, ended)):
            events.append(
                RunEvent(
                    eventType=event_type,
                    eventTime=moment,
                    run=ol_run,
                    job=job,
                    inputs=inputs,
                    outputs=outputs,
                    producer=PRODUCER,
                )
            )
    return events


# ---------------------------------------------------------------------------------------
# Sending events


def emit_events(events: list[RunEvent], target: str) -> str:
    """Send ``events`` to a file (JSON lines) or an OpenLineage HTTP endpoint.

    Args:
        events: from :func:`build_events`.
        target: a file path, or an ``http://``/``https://`` URL.

    Returns:
        Where they went, for the user.

    Raises:
        LineageError: the endpoint is unreachable or refused an event, or the file
            cannot be written; nothing is half-written to a file.
    """
    from openlineage.client import OpenLineageClient

    if target.startswith(("http://", "https://")):
        transport, where = _http_transport(target)
        client = OpenLineageClient(transport=transport)
        for position, event in enumerate(events, start=1):
            try:
                client.emit(event)
            except Exception as error:  # requests' connection, retry and HTTP errors
                raise LineageError(
                    f"cannot send OpenLineage events to {where}",
                    [
                        f"event {position} of {len(events)} failed: {_first_line(error)}",
                        "check that the receiver runs and the URL is right "
                        f"(events go to <url>/{DEFAULT_ENDPOINT} when the URL has no path)",
                    ],
                ) from error
        client.close()
        return where
    return _emit_to_file(events, Path(target))


def _http_transport(target: str) -> tuple[Any, str]:
    from openlineage.client.transport.http import HttpConfig, HttpTransport

    parsed = urlparse(target)
    if not parsed.netloc:
        raise LineageError(f"{redact_url(target)}: not a URL an OpenLineage receiver can be at")
    base = f"{parsed.scheme}://{parsed.netloc}"
    endpoint = parsed.path.strip("/") or DEFAULT_ENDPOINT
    retry = {
        "total": HTTP_RETRIES,
        "connect": HTTP_RETRIES,
        "read": HTTP_RETRIES,
        "backoff_factor": 0.2,
        "status_forcelist": [500, 502, 503, 504],
        "allowed_methods": ["POST"],
    }
    config = HttpConfig(url=base, endpoint=endpoint, timeout=HTTP_TIMEOUT_S, retry=retry)
    return HttpTransport(config), redact_url(f"{base}/{endpoint}")


def _emit_to_file(events: list[RunEvent], path: Path) -> str:
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.file import FileConfig, FileTransport

    def write(temporary: Path) -> None:
        config = FileConfig(log_file_path=str(temporary), append=True)
        client = OpenLineageClient(transport=FileTransport(config))
        for event in events:
            client.emit(event)

    if not path.resolve().parent.is_dir():
        raise LineageError(f"{path}: its folder does not exist")
    try:
        write_file_atomically(path, write)
    except Exception as error:
        raise LineageError(
            f"{path}: cannot write OpenLineage events", [_first_line(error)]
        ) from error
    return str(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return redact_url(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "))
