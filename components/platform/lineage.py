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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
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
        document: dict[str, Any] = {
            "schema": self.schema,
            "pipeline": self.pipeline,
            "flow": self.flow,
            "created": self.created,
        }
        if self.decision is not None:
            document["decision"] = self.decision
        document["nodes"] = [asdict(node) for node in self.nodes]
        document["edges"] = [asdict(edge) for edge in self.edges]
        if self.artifacts is not None:
            document["artifacts"] = dict(sorted(self.artifacts.items()))
        if self.variants is not None:
            document["variants"] = self.variants
        document.update(self.extra)
        return document

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


def run_node(run_id: str, experiment_id: str, flow_run_id: str | None) -> Node:
    """The MLflow run of a flow, with its experiment and Prefect flow run."""
    return Node(
        "run",
        run_node_id(run_id),
        None,
        {"experiment_id": experiment_id, "flow_run_id": flow_run_id},
    )


# ---------------------------------------------------------------------------------------
# Records of decisions


@dataclass(frozen=True)
class Decided:
    """How an evaluation of a challenger against the incumbent (the champion of a shadow,
    the control of a canary) ended, and what carried the decision out."""

    evaluation: str  # the evaluation node's id
    decision: str  # the decision node's id
    challenger: str  # model node ids
    incumbent: str
    verdict: str  # promote, keep, rollback...: the decision's edge to the challenger
    reasons: list[str]
    who: str
    when: str
    labels_path: str | None = None
    labels_digest: str | None = None
    action: str | None = None  # promote or rollback, when a run carried it out
    action_outcome: str | None = None
    action_run_id: str | None = None


def _decision_links(decided: Decided) -> tuple[list[Node], list[Edge]]:
    """The nodes and edges every decision record adds to the flow's own."""
    nodes: list[Node] = []
    edges = [
        Edge(decided.evaluation, decided.decision, "decided"),
        Edge(decided.decision, decided.challenger, decided.verdict),
        Edge(decided.decision, decided.incumbent, "against"),
    ]
    if decided.labels_path and decided.labels_digest:
        labels = labels_node_id(decided.labels_path, decided.labels_digest)
        nodes.append(
            Node("labels", labels, f"md5:{decided.labels_digest}", {"path": decided.labels_path})
        )
        edges.append(Edge(labels, decided.evaluation, "labelled"))
    if decided.action_run_id:
        action_run = run_node_id(decided.action_run_id)
        attributes = {"action": decided.action, "outcome": decided.action_outcome}
        nodes.append(Node("run", action_run, None, attributes))
        edges.append(Edge(decided.decision, action_run, "carried_out_by"))
        if decided.action_outcome == "done" and decided.action == "promote":
            edges.append(Edge(decided.challenger, decided.incumbent, "promoted_over"))
        if decided.action_outcome == "done" and decided.action == "rollback":
            edges.append(Edge(decided.incumbent, decided.challenger, "rolled_back_over"))
    return nodes, edges


def build_decision_record(
    *,
    flow: str,
    pipeline: str,
    nodes: list[Node],
    edges: list[Edge],
    decided: Decided,
    summary: dict[str, Any] | None = None,
) -> LineageRecord:
    """The lineage record of an evaluation that decided on a challenger.

    ``nodes`` and ``edges`` are the flow's own (input, models, run, predictions, the
    evaluation and decision nodes); this adds what every such record links: the decision
    taken on the challenger against the incumbent, the labels, and the run that carried
    the decision out (a promotion puts the challenger over the incumbent, a rollback the
    reverse). The record's ``decision`` entry holds the verdict, ``summary`` (what the
    flow adds), the reasons, who and when.
    """
    more_nodes, more_edges = _decision_links(decided)
    return LineageRecord(
        flow=flow,
        pipeline=pipeline,
        created=decided.when,
        decision={
            "decision": decided.verdict,
            **(summary or {}),
            "reasons": list(decided.reasons),
            "who": decided.who,
            "when": decided.when,
        },
        nodes=[*nodes, *more_nodes],
        edges=[*edges, *more_edges],
    )


# ---------------------------------------------------------------------------------------
# Search index and asset keys
#
# A node the run produced (reachable from the run's own node along the record's edges)
# gets `stemma.lineage.made.<key>`; every other node (what the run read, and the facts
# around it) gets `stemma.lineage.used.<key>`. The value is the node as compact JSON, so
# a search answers without reading the artifact; `stemma.lineage.edges` holds the edges.

INDEX_SCHEMA_TAG = tag_names.LINEAGE_SCHEMA
MADE_TAG_PREFIX = tag_names.LINEAGE_MADE_PREFIX
USED_TAG_PREFIX = tag_names.LINEAGE_USED_PREFIX
MADE_KIND_TAG_PREFIX = tag_names.LINEAGE_MADE_KIND_PREFIX
USED_KIND_TAG_PREFIX = tag_names.LINEAGE_USED_KIND_PREFIX
EDGES_TAG = tag_names.LINEAGE_EDGES
#: Value of :data:`EDGES_TAG` when the edges are too long for a tag: read the artifact.
EDGES_IN_ARTIFACT = "@artifact"
#: Longest tag value written; MLflow 3.17 accepts 8000 characters.
MAX_INDEX_TAG_CHARS = 7000
#: Hex characters of the node-id hash in an index tag's key.
NODE_KEY_CHARS = 24
#: Prefix that turns a node id into a Prefect asset key (which must be a URI).
ASSET_KEY_PREFIX = "stemma://"
#: Characters Prefect refuses in asset keys, and its longest key.
ASSET_KEY_RESTRICTED = "\n\r\t\0 #?&%\"'<>[]{}|\\^`"
MAX_ASSET_KEY_CHARS = 512


def node_key(node_id: str) -> str:
    """The short, stable hash of a node id used in index tag keys."""
    return hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:NODE_KEY_CHARS]


def made_tag(node_id: str) -> str:
    """The run tag that says a run produced ``node_id``."""
    return MADE_TAG_PREFIX + node_key(node_id)


def used_tag(node_id: str) -> str:
    """The run tag that says a run read (or stated a fact about) ``node_id``."""
    return USED_TAG_PREFIX + node_key(node_id)


def kind_tag(prefix: str, kind: str) -> str:
    """The tag (under ``prefix``) that says a run made or used a node of ``kind``."""
    return prefix + "".join(c if c.isalnum() or c in "_-" else "_" for c in kind)


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
    edges = [(str(edge["source"]), str(edge["target"])) for edge in document.get("edges", [])]
    run = run_node_id(run_id) if run_id else None
    if run in ids:
        made: set[str] = set()
        frontier = [run]
        while frontier:
            current = frontier.pop()
            for source, target in edges:
                if source == current and target not in made and target != run:
                    made.add(target)
                    frontier.append(target)
    else:
        made = {target for _, target in edges}
    used = {node for node in ids if node not in made and node != run}
    return made, used


def node_tag_value(node: Mapping[str, Any]) -> str:
    """A node as compact JSON, dropping its largest attributes until it fits a tag."""
    attributes = dict(node.get("attributes") or {})
    omitted: list[str] = []
    while True:
        value = {"kind": node.get("kind"), "id": node.get("id"), "digest": node.get("digest")}
        if attributes:
            value["attributes"] = attributes
        if omitted:
            value["omitted"] = sorted(omitted)
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        if len(text) <= MAX_INDEX_TAG_CHARS or not attributes:
            return text[:MAX_INDEX_TAG_CHARS]
        largest = max(attributes, key=lambda name: len(json.dumps(attributes[name], default=str)))
        omitted.append(largest)
        del attributes[largest]


def index_tags(record: LineageRecord | Mapping[str, Any], run_id: str | None) -> dict[str, str]:
    """The run tags that make a lineage record searchable (see the section comment).

    Every flow that logs ``lineage/record.json`` sets these tags on the same run, so
    ``stemma lineage`` finds the record with MLflow searches.
    """
    document = as_document(record)
    made, used = record_roles(document, run_id)
    tags = {INDEX_SCHEMA_TAG: str(document.get("schema", RECORD_SCHEMA))}
    for node in document.get("nodes", []):
        node_id = str(node["id"])
        kind = str(node.get("kind") or "unknown")
        if node_id in made:
            tags[made_tag(node_id)] = node_tag_value(node)
            tags[kind_tag(MADE_KIND_TAG_PREFIX, kind)] = "true"
        elif node_id in used:
            tags[used_tag(node_id)] = node_tag_value(node)
            tags[kind_tag(USED_KIND_TAG_PREFIX, kind)] = "true"
    edges = [
        [str(edge["source"]), str(edge["target"]), str(edge["relation"])]
        for edge in document.get("edges", [])
    ]
    text = json.dumps(edges, separators=(",", ":"))
    tags[EDGES_TAG] = text if len(text) <= MAX_INDEX_TAG_CHARS else EDGES_IN_ARTIFACT
    return tags


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
