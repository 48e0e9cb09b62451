"""The lineage record: what one flow run read and wrote, with content digests, and how.

Every flow logs one record as ``lineage/record.json`` in its MLflow run and sets the index
tags below on the same run, so ``stemma lineage`` finds records by MLflow searches. The
JSON layout is ``stemma.lineage/1``: ``schema``, ``pipeline``, ``flow``, ``created``, an
optional ``decision``, ``nodes`` (``kind``, ``id``, ``digest``, ``attributes``),
``edges`` (``source``, ``target``, ``relation``), then optional ``artifacts`` and
``variants``. :class:`LineageRecord` reads and writes exactly that layout, so records
written before it existed still read. A URL's credentials never enter a written record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stemma.components.errors import LineageError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.redaction import redact

#: Version of the record layout, so readers can tell old records from new ones.
RECORD_SCHEMA = tag_names.LINEAGE_RECORD_LAYOUT
#: Where the record lives among a run's artifacts.
RECORD_ARTIFACT = "lineage/record.json"
#: Top-level keys in the order the layout writes them; others are kept after them.
_LAYOUT = ("schema", "pipeline", "flow", "created", "decision", "nodes", "edges")
_OPTIONAL = ("decision", "artifacts", "variants")


@dataclass(frozen=True)
class Node:
    """One thing in the lineage graph."""

    kind: str
    id: str
    digest: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    """``source`` led to ``target``; ``relation`` says how."""

    source: str
    target: str
    relation: str


def created_stamp(created: datetime | None = None) -> str:
    """``created`` (default: now, UTC) as the record's ISO 8601 ``created`` value."""
    return (created or datetime.now(UTC)).isoformat()


@dataclass(frozen=True)
class LineageRecord:
    """One flow run's lineage record (the ``lineage/record.json`` document).

    Attributes:
        flow: the flow that ran (``train``, ``score``, ``shadow``, ``promote``...).
        pipeline: the pipeline's name (a promotion names its model).
        nodes: what the run read and wrote, the run itself included.
        edges: how the nodes led to each other.
        created: when the record was made (ISO 8601).
        decision: what an evaluation or promotion decided, and why.
        artifacts: ``sha256:<hex>`` of the run's other artifacts, by artifact path.
        variants: a quantize run's numbers for every variant it tried.
        extra: top-level keys of a read record this layout does not know, kept as read.
    """

    flow: str
    pipeline: str
    nodes: list[Node]
    edges: list[Edge]
    created: str = field(default_factory=created_stamp)
    decision: dict[str, Any] | None = None
    artifacts: dict[str, str] | None = None
    variants: list[dict[str, Any]] | None = None
    schema: str = RECORD_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Credentials never enter a record, however it was built (see redaction.py).
        nodes = [Node(n.kind, redact(n.id), n.digest, redact(n.attributes)) for n in self.nodes]
        edges = [Edge(*redact([e.source, e.target, e.relation])) for e in self.edges]
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "edges", edges)
        for name in ("pipeline", "decision", "artifacts", "variants", "extra"):
            object.__setattr__(self, name, redact(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-able document, in the layout's key order."""
        document = {
            "schema": self.schema,
            "pipeline": self.pipeline,
            "flow": self.flow,
            "created": self.created,
            "decision": self.decision,
            "nodes": [asdict(node) for node in self.nodes],
            "edges": [asdict(edge) for edge in self.edges],
            "artifacts": None if self.artifacts is None else dict(sorted(self.artifacts.items())),
            "variants": self.variants,
        }
        kept = {k: v for k, v in document.items() if k not in _OPTIONAL or v is not None}
        return kept | self.extra

    def to_json(self) -> str:
        """The record as JSON text, as MLflow's ``log_dict`` writes ``lineage/record.json``."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> LineageRecord:
        """A record from its document (any record of the layout, old ones included).

        Raises:
            LineageError: the document is not a lineage record.
        """
        if not isinstance(document, Mapping):
            raise LineageError(
                "not a lineage record", [f"expected a JSON object, got {type(document).__name__}"]
            )
        try:
            nodes = [_node(item) for item in document.get("nodes") or []]
            edges = [
                Edge(str(item["source"]), str(item["target"]), str(item["relation"]))
                for item in document.get("edges") or []
            ]
        except (KeyError, TypeError, AttributeError) as error:
            raise LineageError(
                "not a lineage record",
                [f"a node needs an id and an edge a source, target and relation ({error!r})"],
            ) from None
        return cls(
            flow=str(document.get("flow") or ""),
            pipeline=str(document.get("pipeline") or ""),
            nodes=nodes,
            edges=edges,
            created=str(document.get("created") or ""),
            decision=document.get("decision"),
            artifacts=document.get("artifacts"),
            variants=document.get("variants"),
            schema=str(document.get("schema") or RECORD_SCHEMA),
            extra={k: v for k, v in document.items() if k not in (*_LAYOUT, *_OPTIONAL)},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> LineageRecord:
        """A record from the text of a ``lineage/record.json``.

        Raises:
            LineageError: the text is not JSON or not a lineage record.
        """
        try:
            document = json.loads(text)
        except ValueError as error:
            raise LineageError("not a lineage record", [f"invalid JSON: {error}"]) from None
        return cls.from_dict(document)


def _node(item: Mapping[str, Any]) -> Node:
    return Node(
        kind=str(item.get("kind") or "unknown"),
        id=str(item["id"]),
        digest=item.get("digest"),
        attributes=dict(item.get("attributes") or {}),
    )


def as_document(record: LineageRecord | Mapping[str, Any]) -> dict[str, Any]:
    """A record's document, from a :class:`LineageRecord` or a document already."""
    return record.to_dict() if isinstance(record, LineageRecord) else dict(record)


# ---------------------------------------------------------------------------------------
# Node ids


def data_node_id(pointer: str, md5: str) -> str:
    """Id of a data version: the DVC pointer and the md5 it records."""
    return f"dvc:{pointer}@{md5}"


def file_node_id(path: str, md5: str) -> str:
    """Id of one data file by its md5."""
    return f"file:{path}@{md5}"


def validation_node_id(digest: str) -> str:
    """Id of a Great Expectations validation result by its sha256."""
    return f"gx-validation:{digest}"


def run_node_id(run_id: str) -> str:
    """Id of an MLflow run."""
    return f"mlflow-run:{run_id}"


def model_node_id(model_name: str, version: str) -> str:
    """Id of a registered model version."""
    return f"models:/{model_name}/{version}"


def input_node_id(path: str, digest: str) -> str:
    """Id of a scored input (a file or folder of batches) by its content digest."""
    return f"input:{path}@{digest}"


def predictions_node_id(path: str, manifest_sha256: str) -> str:
    """Id of a prediction output: its folder and the sha256 of its `_SUCCESS` manifest."""
    return f"predictions:{path}@{manifest_sha256}"


def evaluation_node_id(kind: str, run_id: str) -> str:
    """Id of an evaluation (``shadow-evaluation``, ``canary-step``) by the run that made it."""
    return f"{kind}:{run_id}"


def decision_node_id(run_id: str) -> str:
    """Id of the decision an evaluation run took."""
    return f"decision:{run_id}"


def labels_node_id(path: str, digest: str) -> str:
    """Id of a labels file or folder by its content digest."""
    return f"labels:{path}@{digest}"


def model_version_node(model_name: str, version: str, weights_sha256: str, role: str) -> Node:
    """A model version in an evaluation, with its part (``champion``, ``challenger``...)."""
    return Node(
        "model_version",
        model_node_id(model_name, version),
        f"sha256:{weights_sha256}",
        {"role": role},
    )


def run_node(run_id: str, experiment_id: str, flow_run_id: str | None, **attributes: Any) -> Node:
    """The MLflow run of a flow, with its experiment and Prefect flow run (then ``attributes``)."""
    return Node(
        "run",
        run_node_id(run_id),
        None,
        {"experiment_id": experiment_id, "flow_run_id": flow_run_id, **attributes},
    )


# ---------------------------------------------------------------------------------------
# Records of training, scoring and retraining runs
#
# A training run produces the chain
#
#     data version (DVC md5) ─contains─▶ data file (md5) ─checked_by─▶ validation (sha256)
#                                            │                              │
#                                            └──────input_of──▶ MLflow run ◀┘ gated
#                                                                   │
#                                                       produced ───▶ model version (weights sha256)
#
# The same facts are written three ways, so each place a user looks agrees: as the run's
# LineageRecord (`lineage/record.json`), as `stemma.*` tags on the MLflow run, and as tags
# on the model version.


@dataclass(frozen=True)
class TrainingLineage:
    """The digests one training run read and wrote."""

    pipeline: str
    data_pointer: str
    data_md5: str
    data_path: str
    file_path: str
    file_md5: str
    git_rev: str | None
    git_dirty: bool
    validation_digest: str
    validation_success: bool
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    config_path: str
    config_sha256: str
    model_name: str | None = None
    model_version: str | None = None
    weights_sha256: str | None = None
    #: sha256 of every other file the run logged, by artifact path.
    artifacts: dict[str, str] = field(default_factory=dict)
    #: Digest of the project code the model carries (a custom architecture's module);
    #: each file's sha256 is among ``artifacts`` under ``model/code/``.
    code_sha256: str | None = None


def build_training_record(
    lineage: TrainingLineage, *, created: datetime | None = None
) -> LineageRecord:
    """The lineage record of a training run."""
    data = data_node_id(lineage.data_pointer, lineage.data_md5)
    data_file = file_node_id(lineage.file_path, lineage.file_md5)
    validation = validation_node_id(lineage.validation_digest)
    run = run_node_id(lineage.run_id)
    nodes = [
        Node(
            "data_version",
            data,
            f"md5:{lineage.data_md5}",
            {
                "pointer": lineage.data_pointer,
                "path": lineage.data_path,
                "git_rev": lineage.git_rev,
            },
        ),
        Node("data_file", data_file, f"md5:{lineage.file_md5}", {"path": lineage.file_path}),
        Node(
            "validation",
            validation,
            f"sha256:{lineage.validation_digest}",
            {"success": lineage.validation_success, "artifact": "checks/validation_result.json"},
        ),
        run_node(
            lineage.run_id,
            lineage.experiment_id,
            lineage.flow_run_id,
            config=lineage.config_path,
            config_sha256=lineage.config_sha256,
            git_rev=lineage.git_rev,
            git_dirty=lineage.git_dirty,
            **_present({"code_sha256": lineage.code_sha256}),
        ),
    ]
    edges = [
        Edge(data, data_file, "contains"),
        Edge(data_file, validation, "checked_by"),
        Edge(data_file, run, "input_of"),
        Edge(validation, run, "gated"),
    ]
    if lineage.model_name and lineage.model_version:
        model = model_node_id(lineage.model_name, lineage.model_version)
        nodes.append(Node("model_version", model, f"sha256:{lineage.weights_sha256}", {}))
        edges.append(Edge(run, model, "produced"))
    return LineageRecord(
        flow="train",
        pipeline=lineage.pipeline,
        created=created_stamp(created),
        nodes=nodes,
        edges=edges,
        artifacts={path: f"sha256:{digest}" for path, digest in lineage.artifacts.items()},
    )


def artifact_digests(folder: Path, prefix: str) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its artifact path ``prefix/relative``."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        digests[f"{prefix}/{relative}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def run_tags(lineage: TrainingLineage) -> dict[str, str]:
    """``stemma.*`` tags for the MLflow run: the ones users filter on (see
    :mod:`~stemma.components.platform.tags`). The data pointer and file path, the checks,
    the spec and the work tree's state are attributes of the record's nodes."""
    tags = {
        tag_names.PIPELINE: lineage.pipeline,
        tag_names.DATA_MD5: lineage.data_md5,
        # `stemma lineage <md5>` finds a run by the data file's md5 as well as the version's
        tag_names.DATA_FILE_MD5: lineage.file_md5,
    }
    if lineage.git_rev:
        tags[tag_names.GIT_REV] = lineage.git_rev
    if lineage.flow_run_id:
        tags[tag_names.PREFECT_FLOW_RUN_ID] = lineage.flow_run_id
    return redact(tags)


def read_run_record(client: Any, run_id: str) -> LineageRecord | None:
    """The lineage record ``run_id`` logged, or None when it logged none (or it is unreadable).

    What a run's tags no longer carry (data pointer and path, checks, spec, drift details)
    is read from here; callers fall back to the tags runs of older Stemma versions hold.
    """
    from stemma.components.platform.tracking import read_run_artifact

    text = read_run_artifact(client, run_id, RECORD_ARTIFACT)  # None: the run logged none
    try:
        return None if text is None else LineageRecord.from_json(text)
    except Exception:  # an unreadable record
        return None


def record_node(record: LineageRecord | None, kind: str) -> dict[str, Any] | None:
    """The first node of ``kind`` in ``record`` (as a mapping), or None."""
    nodes = record.nodes if record is not None else []
    return next((asdict(node) for node in nodes if node.kind == kind), None)


def _present(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``attributes`` without the ones that are None."""
    return {key: value for key, value in attributes.items() if value is not None}


@dataclass(frozen=True)
class ScoringLineage:
    """The digests one batch-scoring run read and wrote."""

    pipeline: str
    input_path: str
    input_digest: str
    input_files: dict[str, str]
    data_pointer: str | None
    data_md5: str | None
    model_name: str
    model_version: str
    weights_sha256: str
    run_id: str
    experiment_id: str
    flow_run_id: str | None
    output_path: str
    manifest_sha256: str
    parts: dict[str, str]
    rows_scored: int
    rows_rejected: int
    #: The model as the user named it, the backend that ran it, the runner that scored.
    model_reference: str | None = None
    backend: str | None = None
    runner: str | None = None


def build_scoring_record(
    lineage: ScoringLineage, *, created: datetime | None = None
) -> LineageRecord:
    """The lineage record of a scoring run: input and model in, predictions out."""
    batch = input_node_id(lineage.input_path, lineage.input_digest)
    model = model_node_id(lineage.model_name, lineage.model_version)
    run = run_node_id(lineage.run_id)
    predictions = predictions_node_id(lineage.output_path, lineage.manifest_sha256)
    nodes = [
        Node(
            "input",
            batch,
            f"md5:{lineage.input_digest}",
            {"path": lineage.input_path, "files": dict(lineage.input_files)},
        ),
        Node(
            "model_version",
            model,
            f"sha256:{lineage.weights_sha256}",
            _present({"reference": lineage.model_reference, "backend": lineage.backend}),
        ),
        run_node(lineage.run_id, lineage.experiment_id, lineage.flow_run_id),
        Node(
            "predictions",
            predictions,
            f"sha256:{lineage.manifest_sha256}",
            {
                "path": lineage.output_path,
                "parts": dict(lineage.parts),
                "rows_scored": lineage.rows_scored,
                "rows_rejected": lineage.rows_rejected,
                **_present({"runner": lineage.runner}),
            },
        ),
    ]
    edges = [
        Edge(batch, run, "input_of"),
        Edge(model, run, "scored_with"),
        Edge(run, predictions, "produced"),
    ]
    if lineage.data_pointer and lineage.data_md5:
        data = data_node_id(lineage.data_pointer, lineage.data_md5)
        attributes = {"pointer": lineage.data_pointer}
        nodes.insert(0, Node("data_version", data, f"md5:{lineage.data_md5}", attributes))
        edges.insert(0, Edge(data, batch, "contains"))
    return LineageRecord(
        flow="score",
        pipeline=lineage.pipeline,
        created=created_stamp(created),
        nodes=nodes,
        edges=edges,
    )


def _retrain_cause(cause: dict[str, str], run: str, nodes: list[Node], edges: list[Edge]) -> None:
    """Add the drift report (or run) that caused a retraining, and the batch it judged."""
    report = run_node_id(cause["run_id"])
    kind = "drift_report" if cause.get("kind") == "drift_report" else "run"
    attributes = {k: v for k, v in cause.items() if k != "run_id" and v}
    nodes.append(Node(kind, report, None, attributes))
    edges.append(Edge(report, run, "caused"))
    if cause.get("batch") and cause.get("batch_digest"):
        batch = input_node_id(cause["batch"], cause["batch_digest"])
        digest = f"md5:{cause['batch_digest']}"
        nodes.append(Node("input", batch, digest, {"path": cause["batch"]}))
        edges.append(Edge(batch, report, "monitored_in"))


def _retrain_inputs(
    inputs: Mapping[str, str], run: str, nodes: list[Node], edges: list[Edge]
) -> None:
    """Add each batch a retraining read (path to digest) as an input of its run."""
    for path, digest in inputs.items():
        batch = input_node_id(path, digest)
        if all(node.id != batch for node in nodes):  # else the batch a drift report judged
            nodes.append(Node("input", batch, f"md5:{digest}", {"path": path, "role": "batch"}))
        edges.append(Edge(batch, run, "input_of"))


def build_retrain_record(
    *,
    pipeline: str,
    run_id: str,
    cause: dict[str, str],
    previous_data_md5: str,
    data_md5: str,
    data_pointer: str,
    train_run_id: str,
    model_name: str,
    model_version: str,
    shadow_run_id: str | None,
    decision: str,
    created: datetime | None = None,
    data_git_rev: str | None = None,
    sources: Mapping[str, int] | None = None,
    holdout: str | None = None,
    inputs: Mapping[str, str] | None = None,
) -> LineageRecord:
    """The lineage record of a retraining run: why it ran and what it made.

    The new data version's node holds the commit that recorded it (``git_rev``) and the
    rows taken from each file (``sources``); the run's node names the held-out batch the
    shadow judged (``holdout``). Each batch the new rows came from (``inputs``, path to
    content digest: a file, or a day folder of the endpoint's prediction log) is an
    ``input`` node read by the run, the same node the drift monitor records for it.

    A drift report that caused the run is a ``drift_report`` node (the monitor's MLflow
    run) linked from the batch it judged, so walking upstream from the new model version
    reads "retrained because of drift report X on batch Y".
    """
    run = run_node_id(run_id)
    before = data_node_id(data_pointer, previous_data_md5)
    after = data_node_id(data_pointer, data_md5)
    train = run_node_id(train_run_id)
    model = model_node_id(model_name, model_version)
    nodes = [
        Node(
            "run",
            run,
            None,
            {"flow": "retrain", "decision": decision, **_present({"holdout": holdout})},
        ),
        Node("data_version", before, f"md5:{previous_data_md5}", {"pointer": data_pointer}),
        Node(
            "data_version",
            after,
            f"md5:{data_md5}",
            {
                "pointer": data_pointer,
                **_present({"git_rev": data_git_rev or None, "sources": sources}),
            },
        ),
        Node("run", train, None, {"flow": "train"}),
        Node("model_version", model, None, {}),
    ]
    edges = [
        Edge(before, run, "input_of"),
        Edge(run, after, "produced"),
        Edge(run, train, "triggered"),
        Edge(after, train, "input_of"),
        Edge(train, model, "produced"),
    ]
    if cause.get("run_id"):
        _retrain_cause(cause, run, nodes, edges)
    _retrain_inputs(inputs or {}, run, nodes, edges)
    if shadow_run_id:
        shadow = run_node_id(shadow_run_id)
        nodes.append(Node("run", shadow, None, {"flow": "shadow"}))
        edges.append(Edge(model, shadow, "evaluated_in"))
    return LineageRecord(
        flow="retrain",
        pipeline=pipeline,
        created=created_stamp(created),
        nodes=nodes,
        edges=edges,
    )


# ---------------------------------------------------------------------------------------
# Search index and asset keys
#
# A run carries two index tags: `stemma.lineage.made-nodes` lists the nodes the run produced
# (reachable from the run's own node along the record's edges), `stemma.lineage.used-nodes`
# every other node (what it read, and the facts around it). Each lists `|kind:key|` entries,
# `key` a short hash of the node id, so one MLflow search (`LIKE '%:<key>|%'`, or
# `LIKE '%|<kind>:%'`) finds the runs that made or used a node, or a kind of node, and a
# pattern cannot match across two entries (hex keys and tidied kinds hold neither `:` nor
# `|`). Node bodies and edges are in `lineage/record.json`. Entries past one tag value go on
# to `<tag>.2`, `<tag>.3`, ... (hundreds of nodes per tag: only unusual records need them).
#
# Runs indexed by older Stemma versions carry one tag per node instead (`LEGACY_`
# names below: `stemma.lineage.made.<sha256(id)[:24]>` with the node as JSON, `used.`,
# `made-kind.`/`used-kind.`, `edges`, `schema`); readers search both layouts.

#: The index tags (see the section comment).
MADE_NODES_TAG = tag_names.LINEAGE_MADE_NODES
USED_NODES_TAG = tag_names.LINEAGE_USED_NODES
#: Separates a kind from its key in an entry, and entries from each other.
KIND_SEPARATOR = ":"
ENTRY_SEPARATOR = "|"
#: Hex characters of the node-id hash in an index entry (64 bits: no collision in practice).
INDEX_KEY_CHARS = 16
#: The legacy layout's tags, read in stores written by older Stemma versions.
INDEX_SCHEMA_TAG = tag_names.LINEAGE_SCHEMA
EDGES_TAG = tag_names.LINEAGE_EDGES
#: Value of :data:`EDGES_TAG` when the edges are too long for a tag: read the artifact.
EDGES_IN_ARTIFACT = "@artifact"
#: Longest tag value written; MLflow 3.17 accepts 8000 characters.
MAX_INDEX_TAG_CHARS = 7000
#: Hex characters of the node-id hash in a legacy index tag's key (and asset keys).
NODE_KEY_CHARS = 24
#: Prefix that turns a node id into a Prefect asset key (which must be a URI).
ASSET_KEY_PREFIX = "stemma://"
#: Characters Prefect refuses in asset keys, and its longest key.
ASSET_KEY_RESTRICTED = "\n\r\t\0 #?&%\"'<>[]{}|\\^`"
MAX_ASSET_KEY_CHARS = 512


def node_key(node_id: str) -> str:
    """The stable hash of a node id in legacy index tag keys and long asset keys."""
    return hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:NODE_KEY_CHARS]


def index_key(node_id: str) -> str:
    """The short, stable hash of a node id in the index tags' entries."""
    return node_key(node_id)[:INDEX_KEY_CHARS]


def tidy_kind(kind: str) -> str:
    """A node kind as index tags spell it: letters, digits, ``_`` and ``-`` only."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in kind) or "unknown"


def index_part_tag(tag: str, part: int) -> str:
    """The tag holding part ``part`` (from 1) of index tag ``tag``'s entries."""
    return tag if part == 1 else f"{tag}.{part}"


def node_filter(tag: str, node_id: str) -> str:
    """An MLflow run filter: runs whose ``tag`` lists ``node_id``."""
    return f"tags.`{tag}` LIKE '%{KIND_SEPARATOR}{index_key(node_id)}{ENTRY_SEPARATOR}%'"


def kind_filter(tag: str, kind: str) -> str:
    """An MLflow run filter: runs whose ``tag`` lists a node of ``kind``.

    ``_`` in a kind is LIKE's one-character wildcard: a near-identical kind may match too,
    which costs a reader one more look, never a missed run.
    """
    return f"tags.`{tag}` LIKE '%{ENTRY_SEPARATOR}{tidy_kind(kind)}{KIND_SEPARATOR}%'"


def index_entries(value: str) -> list[tuple[str, str]]:
    """The ``(kind, key)`` entries of one index tag value."""
    parts = (entry.rpartition(KIND_SEPARATOR) for entry in value.split(ENTRY_SEPARATOR))
    return [(kind, key) for kind, separator, key in parts if separator and key]


def made_tag(node_id: str) -> str:
    """The legacy run tag that says a run produced ``node_id``."""
    return tag_names.LINEAGE_MADE_PREFIX + node_key(node_id)


def used_tag(node_id: str) -> str:
    """The legacy run tag that says a run read (or stated a fact about) ``node_id``."""
    return tag_names.LINEAGE_USED_PREFIX + node_key(node_id)


def kind_tag(prefix: str, kind: str) -> str:
    """The legacy tag (under ``prefix``) that says a run made or used a node of ``kind``."""
    return prefix + tidy_kind(kind)


def record_roles(
    record: LineageRecord | Mapping[str, Any], run_id: str | None
) -> tuple[set[str], set[str]]:
    """The ids of the nodes a record's run produced, and of the nodes it used.

    Produced: reachable from the run's own node (``mlflow-run:<run_id>``) along the
    edges. Used: everything else but the run node. A record without the run's node
    counts the targets of its edges as produced and the rest as used.
    """
    document = as_document(record)
    ids = [str(node["id"]) for node in document.get("nodes", [])]
    edges = [Edge(str(e["source"]), str(e["target"]), "") for e in document.get("edges", [])]
    run = run_node_id(run_id) if run_id else None
    made = reach(edges, run) if run in ids else {edge.target for edge in edges}
    used = {node for node in ids if node not in made and node != run}
    return made, used


def reach(
    edges: Sequence[Edge],
    start: str,
    *,
    upstream: bool = False,
    passes: Callable[[str], bool] = lambda node_id: True,
) -> set[str]:
    """The nodes reached from ``start`` along ``edges`` (against them when ``upstream``),
    ``start`` left out, going only to and through the nodes ``passes`` accepts."""
    found: set[str] = set()
    frontier = [start]
    while frontier:
        current = frontier.pop()
        for edge in edges:
            near, far = (edge.target, edge.source) if upstream else (edge.source, edge.target)
            if near == current and far not in found and passes(far):
                found.add(far)
                frontier.append(far)
    found.discard(start)
    return found


def _index_parts(tag: str, entries: list[str]) -> dict[str, str]:
    """``entries`` as the value of ``tag``, continued in ``<tag>.2``, ... past one value."""
    parts: list[list[str]] = [[]]
    length = 1
    for entry in entries:
        if parts[-1] and length + len(entry) + 1 > MAX_INDEX_TAG_CHARS:
            parts.append([])
            length = 1
        parts[-1].append(entry)
        length += len(entry) + 1
    return {
        index_part_tag(tag, number): ENTRY_SEPARATOR.join(["", *part, ""]) if part else "|"
        for number, part in enumerate(parts, start=1)
    }


def index_tags(record: LineageRecord | Mapping[str, Any], run_id: str | None) -> dict[str, str]:
    """The run tags that make a lineage record searchable (see the section comment).

    Every flow that logs ``lineage/record.json`` sets these tags on the same run, so
    ``stemma lineage`` finds the record with MLflow searches.
    """
    document = as_document(record)
    made, used = record_roles(document, run_id)
    entries: dict[str, list[str]] = {MADE_NODES_TAG: [], USED_NODES_TAG: []}
    for node in document.get("nodes", []):
        node_id = str(node["id"])
        tag = MADE_NODES_TAG if node_id in made else USED_NODES_TAG if node_id in used else None
        entry = f"{tidy_kind(str(node.get('kind') or 'unknown'))}{KIND_SEPARATOR}"
        entry += index_key(node_id)
        if tag is not None and entry not in entries[tag]:
            entries[tag].append(entry)
    return {
        key: value
        for tag, listed in entries.items()
        for key, value in _index_parts(tag, listed).items()
    }


def asset_key(node_id: str) -> str:
    """The Prefect asset key of a lineage node: ``stemma://`` + its id.

    Characters Prefect refuses in keys become ``_``; an overlong key keeps its start and
    ends with the id's hash, so keys stay unique.
    """
    cleaned = "".join("_" if char in ASSET_KEY_RESTRICTED else char for char in node_id)
    key = ASSET_KEY_PREFIX + cleaned
    if len(key) > MAX_ASSET_KEY_CHARS:
        suffix = "~" + node_key(node_id)
        key = key[: MAX_ASSET_KEY_CHARS - len(suffix)] + suffix
    return key
