"""Walking the lineage graph: where a node came from (upstream) and what it fed (downstream).

The walk reads records through :class:`~stemma.components.lineage.index.RecordIndex`:

* upstream of a node: the runs that *made* it (one tag search), and inside each such run's
  record everything the node descends from; then, for each of those nodes, the runs that
  made *them*, and so on;
* downstream of a node: the runs that *used* it, and inside each such run's record
  everything that descends from the node; then the runs that used those nodes, and so on.

Nothing here knows the kinds of nodes beyond ``run`` and ``model_version`` (whose registry
entry adds its creation time and aliases): a record with new kinds (``drift_report``,
``quantized_variant``, ``decision``) appears in the graph as it is written.

``stemma lineage`` prints :func:`render_summary` (a line per node, long chains folded);
``--full`` prints :func:`render_tree`, every node and edge with its digests and flow runs.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

from stemma.components.lineage.index import (
    MODEL_PREFIX,
    RUN_PREFIX,
    RecordIndex,
    RunRecord,
    iso_time,
)
from stemma.components.lineage.resolve import model_reference, resolve_reference
from stemma.components.platform import tags as tag_names
from stemma.components.platform.describe import short
from stemma.components.platform.lineage import Edge, asset_key, reach
from stemma.components.platform.tracking import run_git

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"
#: Runs followed from one node by default (newest first downstream); `--all` lifts it.
DEFAULT_MAX_RUNS = 20
#: The summary folds a node whose kind its path from the root already met this often.
FOLD_AFTER = 2
#: The summary's longest line; longer ones end in "…".
SUMMARY_WIDTH = 120
#: Drifted features a summary line names before it says how many more.
SHOWN_FEATURES = 4


@dataclass
class GraphNode:
    """One node of a walked graph.

    Attributes:
        id: the node id the records use (``models:/credit/7``, ``dvc:data.dvc@<md5>``).
        kind: ``data_version``, ``run``, ``model_version``, ``predictions``, ...
        digest: ``<algorithm>:<hex>`` of its content, when it has one.
        created: when it was made (ISO 8601, UTC), when known.
        flow_run_id: the Prefect flow run that made it, when known.
        made_by: the id of the run node that made it, when a run did.
        attributes: what the records say about it besides (merged over the records).
    """

    id: str
    kind: str
    digest: str | None = None
    created: str | None = None
    flow_run_id: str | None = None
    made_by: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


#: The graph's edges are the records' edges.
GraphEdge: TypeAlias = Edge


@dataclass
class LineageGraph:
    """The nodes and edges reached from ``root`` in one direction.

    Attributes:
        reference: what the user asked about.
        root: the node id it resolved to.
        direction: :data:`UPSTREAM` or :data:`DOWNSTREAM`.
        nodes: by id.
        edges: in the order they were found, without duplicates.
        truncated: nodes from which more runs lead than were followed.
        searches: MLflow search and read calls the walk made.
        seconds: how long the walk took.
    """

    reference: str
    root: str
    direction: str
    nodes: dict[str, GraphNode] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    truncated: dict[str, bool] = field(default_factory=dict)
    maker_rank: dict[str, tuple[bool, str]] = field(default_factory=dict, repr=False)
    searches: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The graph as a JSON-able document (what ``--json`` prints), each node with the
        Prefect asset key the flows materialize for it."""
        return {
            "reference": self.reference,
            "root": self.root,
            "direction": self.direction,
            "nodes": [
                {**asdict(node), "asset_key": asset_key(node.id)} for node in self.nodes.values()
            ],
            "edges": [asdict(edge) for edge in self.edges],
            "truncated": sorted(self.truncated),
        }


def walk(
    reference: str,
    index: RecordIndex,
    *,
    root: Path,
    direction: str = UPSTREAM,
    max_runs: int | None = DEFAULT_MAX_RUNS,
) -> LineageGraph:
    """The lineage graph of ``reference`` in one direction.

    Records explain their own insides, so the walk searches across runs only where
    records meet: upstream, for the runs that made a record's roots (nodes nothing in the
    record leads to); downstream, for the runs that used a record's outputs. Before
    searching node by node, one search per kind tells whether any run makes (or uses)
    nodes of that kind at all.

    Args:
        reference: a REF (see :data:`ACCEPTED_FORMS`).
        index: the record index on the store.
        root: the project root (for paths, DVC files and git revisions).
        direction: :data:`UPSTREAM` (where it came from) or :data:`DOWNSTREAM` (what it fed).
        max_runs: the most runs followed from one node, newest first downstream (None:
            all); the graph notes the nodes where more runs exist.

    Raises:
        LineageError: the reference cannot be resolved.
    """
    if direction not in (UPSTREAM, DOWNSTREAM):
        raise ValueError(f"direction must be {UPSTREAM!r} or {DOWNSTREAM!r}")
    started = time.perf_counter()
    calls_before = index.calls
    start = resolve_reference(reference, index, root)
    graph = LineageGraph(reference=reference, root=start, direction=direction)
    graph.nodes[start] = GraphNode(id=start, kind=_kind_of(start))
    seen_edges: set[Edge] = set()
    expanded: set[str] = set()
    first_seen: dict[str, dict[str, Any]] = {}
    level = [start]
    while level:
        expanded.update(level)
        idle_kinds = _kinds_nobody_links(level, index, direction, start)
        following: set[str] = set()
        for node_id in level:
            if _kind_of_graph(graph, node_id) in idle_kinds:
                continue
            records, more = _records_for(
                node_id, index, direction, is_start=node_id == start, max_runs=max_runs
            )
            if more:
                graph.truncated[node_id] = True
            for record in records:
                links = _take_record(graph, record, node_id, seen_edges, first_seen)
                following |= {n for n in links if n not in expanded and n != record.run_node}
        level = sorted(following)
    _add_registry_details(graph, index)
    _add_data_version_times(graph, root)
    _add_recorded_times(graph, first_seen)
    graph.searches = index.calls - calls_before
    graph.seconds = time.perf_counter() - started
    return graph


def _take_record(
    graph: LineageGraph,
    record: RunRecord,
    node_id: str,
    seen_edges: set[Edge],
    first_seen: dict[str, dict[str, Any]],
) -> set[str]:
    """Add what ``record`` says about ``node_id`` in the graph's direction; return the
    nodes where the record meets other records (to follow next)."""
    reached = record.reach(node_id, upstream=graph.direction == UPSTREAM)
    inside = reached | {node_id}
    if graph.direction == UPSTREAM:
        edges = [e for e in record.edges if e.target in inside and e.source in reached]
        # where this record meets others: the nodes nothing in it leads to
        links = {n for n in reached if not any(e.target == n for e in record.edges)}
    else:
        edges = [e for e in record.edges if e.source in inside and e.target in reached]
        links = reached & record.made
    for other in inside:
        _merge_node(graph, record, other)
        seen = first_seen.get(other)
        if seen is None or (record.node.get("created") or "") < (seen.get("created") or ""):
            first_seen[other] = record.node
    for made in inside & record.made:
        _set_maker(graph, record, made)
    for edge in edges:
        if edge not in seen_edges:
            seen_edges.add(edge)
            graph.edges.append(edge)
    return links


def _kind_of(node_id: str) -> str:
    if node_id.startswith(RUN_PREFIX):
        return "run"
    if node_id.startswith(MODEL_PREFIX):
        return "model_version"
    return node_id.split(":", 1)[0]


def _kind_of_graph(graph: LineageGraph, node_id: str) -> str:
    node = graph.nodes.get(node_id)
    return node.kind if node is not None else _kind_of(node_id)


def _kinds_nobody_links(
    level: list[str], index: RecordIndex, direction: str, start: str
) -> set[str]:
    """Kinds with several nodes in ``level`` that no run makes (upstream) or uses (downstream).

    One search per such kind saves one search per node when the answer is "none".
    """
    counts = Counter(_kind_of(n) for n in level if n != start and not n.startswith(RUN_PREFIX))
    made = direction == UPSTREAM
    return {
        kind
        for kind, count in counts.items()
        if count >= 2 and not index.any_run_with_kind(kind, made=made)
    }


def _records_for(
    node_id: str, index: RecordIndex, direction: str, *, is_start: bool, max_runs: int | None
) -> tuple[list[RunRecord], bool]:
    """The records that explain ``node_id`` in ``direction``, and whether more exist."""
    if node_id.startswith(RUN_PREFIX):
        record = index.record(node_id[len(RUN_PREFIX) :])
        return ([record] if record is not None else []), False
    limit = None if max_runs is None else max_runs + 1
    if direction == DOWNSTREAM:
        records = index.runs_that_used(node_id, limit=limit, newest_first=True)
    else:
        records = index.runs_that_made(node_id, limit=limit)
        if node_id.startswith(MODEL_PREFIX) and is_start:
            # A version registered before records were indexed: its training run by tag.
            name, _, version = node_id[len(MODEL_PREFIX) :].rpartition("/")
            entry = index.model_version(name, version)
            run_id = dict(entry.tags or {}).get(tag_names.RUN_ID) if entry is not None else None
            if run_id and all(record.run_id != run_id for record in records):
                legacy = index.record(run_id)
                if legacy is not None:
                    legacy.made.add(node_id)
                    records.append(legacy)
        if not records and is_start:
            # Nothing made it (a data version): one record that used it gives its context.
            records = index.runs_that_used(node_id, limit=1)
    more = max_runs is not None and len(records) > max_runs
    return records[:max_runs] if more else records, more


def _merge_node(graph: LineageGraph, record: RunRecord, node_id: str) -> None:
    source = record.nodes.get(node_id)
    node = graph.nodes.get(node_id)
    if node is None:
        node = GraphNode(id=node_id, kind=_kind_of(node_id))
        graph.nodes[node_id] = node
    if source is None:
        return
    if node.kind in ("run", _kind_of(node_id)):  # a specific kind wins over the generic one
        node.kind = str(source.get("kind") or node.kind)
    node.digest = node.digest or source.get("digest")
    node.created = node.created or source.get("created")
    node.flow_run_id = node.flow_run_id or source.get("flow_run_id")
    for key, value in (source.get("attributes") or {}).items():
        if value not in (None, "", {}, []):
            node.attributes.setdefault(key, value)
    if node.kind == "run":
        node.made_by = node.id


def _set_maker(graph: LineageGraph, record: RunRecord, node_id: str) -> None:
    """Record that ``record``'s run made ``node_id``.

    A run with an edge straight to the node beats one that made it through other runs
    (a retraining run that triggered the training run); among equals the earliest wins.
    """
    node = graph.nodes.get(node_id)
    if node is None:
        _merge_node(graph, record, node_id)
        node = graph.nodes[node_id]
    run = record.node
    rank = (
        not any(e.source == record.run_node and e.target == node_id for e in record.edges),
        run.get("created") or "",
    )
    maker = graph.nodes.get(node.made_by) if node.made_by else None
    current = graph.maker_rank.get(node_id)
    if maker is None or current is None or rank < current:
        graph.maker_rank[node_id] = rank
        node.made_by = record.run_node
        if node.kind != "run":  # a run started by another began when its own record says
            node.created = run.get("attributes", {}).get("ended") or run.get("created")
            node.flow_run_id = run.get("flow_run_id")


def _add_registry_details(graph: LineageGraph, index: RecordIndex) -> None:
    """Creation time, aliases and status of the model versions in the graph."""
    for node in graph.nodes.values():
        model = model_reference(node.id)
        if model is None or model.version is None:
            continue
        entry = index.model_version(model.name, model.version)
        if entry is None:
            node.attributes["registry"] = "deleted"
            continue
        node.created = iso_time(entry.creation_timestamp) or node.created
        if entry.aliases:
            node.attributes["aliases"] = sorted(entry.aliases)
        tags = dict(entry.tags or {})
        if not node.digest and tags.get(tag_names.WEIGHTS_SHA256):
            node.digest = f"sha256:{tags[tag_names.WEIGHTS_SHA256]}"
        if tags.get(tag_names.GATE_DECISION):
            node.attributes.setdefault("gate", tags[tag_names.GATE_DECISION])


def _add_recorded_times(graph: LineageGraph, first_seen: dict[str, dict[str, Any]]) -> None:
    """For nodes no run made (nor git dates): when, and by which flow run, first recorded."""
    for node in graph.nodes.values():
        run = first_seen.get(node.id)
        if node.made_by or node.created or run is None:
            continue
        node.created = run.get("created")
        node.flow_run_id = run.get("flow_run_id")
        node.attributes["recorded_by"] = run.get("id")


def _add_data_version_times(graph: LineageGraph, root: Path) -> None:
    """When each data version was committed: the commit that last changed its DVC file.

    The commit dates a version even when a run made it: a retraining run commits the new
    version, then trains on it, and ends after that training run began.
    """
    for node in graph.nodes.values():
        pointer = node.attributes.get("pointer")
        rev = node.attributes.get("git_rev")
        if node.kind != "data_version" or not pointer or not rev:
            continue
        if node.created and not node.made_by:
            continue
        stamp = run_git(root, "log", "-1", "--format=%cI", str(rev), "--", str(pointer))
        if stamp and stamp.strip():
            moment = datetime.fromisoformat(stamp.strip()).astimezone(UTC)
            node.created = moment.isoformat(timespec="seconds")
            if not node.made_by:
                node.attributes.setdefault("created_by", "git commit of " + str(pointer))


# ---------------------------------------------------------------------------------------
# Rendering


def _details(node: GraphNode) -> str:
    parts = [f"digest {node.digest or '-'}", f"created {node.created or 'unknown'}"]
    if node.kind != "run" and node.made_by:
        parts.append(f"made by {node.made_by}")
    elif node.kind != "run" and node.attributes.get("recorded_by"):
        parts.append(f"first recorded by {node.attributes['recorded_by']}")
    parts.append(f"flow run {node.flow_run_id or '-'}")
    if node.attributes.get("aliases"):
        parts.append("aliases " + ", ".join(node.attributes["aliases"]))
    if node.kind == "run" and node.attributes.get("flow"):
        parts.append(f"flow {node.attributes['flow']}")
    if node.kind == "validation" and "success" in node.attributes:
        parts.append("passed" if node.attributes["success"] else "FAILED")
    return " · ".join(parts)


def _heading(graph: LineageGraph) -> list[str]:
    """The opening lines of a rendering: the direction, the reference and its node."""
    resolved = f" ({graph.root})" if graph.root != graph.reference else ""
    return [f"{graph.direction} of {graph.reference}{resolved}", ""]


def render_tree(graph: LineageGraph) -> str:
    """The graph as an indented tree from its root; a node met again says ``(see above)``."""
    lines = _heading(graph)
    following = _following(graph)
    shown: set[str] = set()

    def visit(node_id: str, relation: str | None, prefix: str, last: bool) -> None:
        node = graph.nodes[node_id]
        branch = "" if relation is None else ("└── " if last else "├── ")
        label = "" if relation is None else f"{relation}: "
        repeat = node_id in shown
        lines.append(
            f"{prefix}{branch}{label}{node.id}  [{node.kind}]" + ("  (see above)" if repeat else "")
        )
        inner = prefix + ("" if relation is None else ("    " if last else "│   "))
        edges = following.get(node_id, [])
        if not repeat:
            lines.append(f"{inner}{'│   ' if edges else '    '}{_details(node)}")
        shown.add(node_id)
        if repeat:
            return
        if graph.truncated.get(node_id):
            lines.append(f"{inner}│   (more runs than shown here: --all follows every one)")
        for position, (edge_relation, other) in enumerate(edges):
            visit(other, edge_relation, inner, position == len(edges) - 1)

    visit(graph.root, None, "", True)
    if len(graph.nodes) == 1:
        lines += ["", f"(no recorded {graph.direction} lineage)"]
    return "\n".join(lines)


@dataclass
class _Entry:
    """A line of the summary: a node, or a fold standing for the nodes beyond it."""

    node_id: str
    relation: str | None
    folded: bool = False
    beyond: int = 0
    children: list[_Entry] = field(default_factory=list)


def _minute(stamp: str) -> str:
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    return (moment.astimezone(UTC) if moment.tzinfo else moment).strftime("%Y-%m-%d %H:%M")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return short(str(value))
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if 0.001 <= abs(value) < 1000:
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def node_name(node: GraphNode) -> str:
    """``model version credit v8``, ``train run b8319bd7``, ``data version data.dvc@4d34e097``."""
    words = node.kind.replace("_", " ")
    version = re.fullmatch(r"models:/([^/@]+)/(\d+)", node.id)
    if version:
        return f"{words} {version[1]} v{version[2]}"
    if node.kind == "run" and node.id.startswith(RUN_PREFIX):
        flow = node.attributes.get("flow")
        return f"{f'{flow} ' if flow else ''}run {node.id[len(RUN_PREFIX) :][:8]}"
    return f"{words} {short(node.id.split(':', 1)[-1])}"


def node_facts(node: GraphNode) -> list[str]:
    """What a summary line says about a node, from the attributes it has."""
    found = node.attributes
    facts = [_minute(node.created)] if node.created else []
    if found.get("status") not in (None, "FINISHED"):
        facts.append(f"status {found['status']}")
    if found.get("aliases"):
        facts.append(" ".join(f"@{alias}" for alias in found["aliases"]))
    facts += [
        f"{key} {_number(found[key])}" for key in ("gate", "role", "decision") if key in found
    ]
    if isinstance(found.get("success"), bool):
        facts.append("passed" if found["success"] else "FAILED")
    comparison = found.get("comparison")
    if isinstance(comparison, Mapping) and {"champion", "challenger"} <= set(comparison):
        metric = comparison.get("metric") or found.get("metric") or "metric"
        facts.append(
            f"{metric} champion {_number(comparison['champion'])} "
            f"→ challenger {_number(comparison['challenger'])}"
        )
    drifted = found.get("drifted_features") or ("drift" in node.kind and found.get("features"))
    if drifted:
        names = [
            str(n).strip() for n in (drifted.split(",") if isinstance(drifted, str) else drifted)
        ]
        more = f" +{len(names) - SHOWN_FEATURES} more" if len(names) > SHOWN_FEATURES else ""
        facts.append("drifted " + ", ".join(names[:SHOWN_FEATURES]) + more)
    if isinstance(found.get("metrics"), Mapping):
        facts += [f"{name} {_number(value)}" for name, value in found["metrics"].items()]
    return facts


def _plan_summary(graph: LineageGraph) -> tuple[_Entry, int]:
    """The summary's entries from the root, each node once and deep paths folded, and the
    count of links to nodes shown elsewhere (left out)."""
    following = _following(graph)
    shown: set[str] = set()
    links = 0

    def visit(node_id: str, relation: str | None, met: dict[str, int]) -> _Entry:
        nonlocal links
        kind = graph.nodes[node_id].kind
        if met.get(kind, 0) >= FOLD_AFTER:
            return _Entry(node_id, relation, folded=True)
        shown.add(node_id)
        entry = _Entry(node_id, relation)
        inner = {**met, kind: met.get(kind, 0) + 1}
        for edge_relation, other in following.get(node_id, []):
            if other in shown:
                links += 1
            else:
                entry.children.append(visit(other, edge_relation, inner))
        return entry

    root = visit(graph.root, None, {})
    return root, links + _count_folds(graph, root, shown)


def _count_folds(graph: LineageGraph, root: _Entry, shown: set[str]) -> int:
    """Give each fold the count of the nodes beyond it shown nowhere else (each node counted
    by the first fold that reaches it); drop folds with none. Returns the links dropped."""
    upstream = graph.direction == UPSTREAM
    claimed: set[str] = set()
    dropped = 0

    def resolve(entry: _Entry) -> None:
        nonlocal dropped
        kept = []
        for child in entry.children:
            if child.folded:
                reached = {child.node_id} | reach(graph.edges, child.node_id, upstream=upstream)
                beyond = reached - shown - claimed
                claimed.update(beyond)
                child.beyond = len(beyond)
                if not beyond:
                    dropped += 1
                    continue
            resolve(child)
            kept.append(child)
        entry.children = kept

    resolve(root)
    return dropped


def _following(graph: LineageGraph) -> dict[str, list[tuple[str, str]]]:
    """Each node's next nodes in the graph's direction, with the relation to each."""
    upstream = graph.direction == UPSTREAM
    following: dict[str, list[tuple[str, str]]] = {}
    for edge in sorted(graph.edges, key=lambda e: (e.relation, e.source if upstream else e.target)):
        here, other = (edge.target, edge.source) if upstream else (edge.source, edge.target)
        following.setdefault(here, []).append((edge.relation, other))
    return following


def summary_tree(graph: LineageGraph) -> list[tuple[int, str, str | None, int | None]]:
    """The lines of :func:`render_summary` as ``(depth, node id, relation to its parent,
    nodes beyond a fold or None)``, in the order printed (for a picture of the same tree)."""
    root, _ = _plan_summary(graph)
    lines: list[tuple[int, str, str | None, int | None]] = []

    def visit(entry: _Entry, depth: int) -> None:
        lines.append((depth, entry.node_id, entry.relation, entry.beyond if entry.folded else None))
        for child in entry.children:
            visit(child, depth + 1)

    visit(root, 0)
    return lines


def render_summary(graph: LineageGraph) -> str:
    """The graph as a short tree: one line per node with its short name and key facts.

    A node reached again is not repeated, and a node whose kind its path from the root
    already met :data:`FOLD_AFTER` times folds into one line saying how many nodes lie
    beyond it (a chain of retrainings). :func:`render_tree` shows everything.
    """
    root, links = _plan_summary(graph)
    lines = _heading(graph)

    def draw(entry: _Entry, prefix: str, last: bool) -> None:
        branch = "" if entry.relation is None else ("└── " if last else "├── ")
        if entry.folded:
            nodes = "node" if entry.beyond == 1 else "nodes"
            text = f"… {entry.beyond} more {graph.direction} {nodes} (stemma lineage --full)"
        else:
            node = graph.nodes[entry.node_id]
            label = "" if entry.relation is None else f"{entry.relation}: "
            text = " · ".join([label + node_name(node), *node_facts(node)])
        line = prefix + branch + text
        lines.append(line if len(line) <= SUMMARY_WIDTH else line[: SUMMARY_WIDTH - 1] + "…")
        inner = prefix + ("" if entry.relation is None else ("    " if last else "│   "))
        if graph.truncated.get(entry.node_id) and not entry.folded:
            lines.append(
                f"{inner}{'│   ' if entry.children else '    '}"
                "(more runs than shown here: --all follows every one)"
            )
        for position, child in enumerate(entry.children):
            draw(child, inner, position == len(entry.children) - 1)

    draw(root, "", True)
    if len(graph.nodes) == 1:
        lines += ["", f"(no recorded {graph.direction} lineage)"]
    elif links:
        lines.append(
            f"\n({links} {'link' if links == 1 else 'links'} to nodes above not repeated; "
            "--full shows every node and edge)"
        )
    return "\n".join(lines)


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def render_mermaid(graph: LineageGraph) -> str:
    """The graph as a Mermaid flowchart, data flowing left to right."""
    ids = {node_id: f"n{position}" for position, node_id in enumerate(graph.nodes)}
    lines = ["flowchart LR"]
    for node_id, node in graph.nodes.items():
        label = f"{node.kind}<br/>{_mermaid_text(node.id)}"
        if node.digest:
            label += f"<br/>{_mermaid_text(node.digest)}"
        lines.append(f'    {ids[node_id]}["{label}"]')
    for edge in graph.edges:
        lines.append(
            f"    {ids[edge.source]} -->|{_mermaid_text(edge.relation)}| {ids[edge.target]}"
        )
    lines.append(f"    style {ids[graph.root]} stroke-width:3px")
    return "\n".join(lines)
