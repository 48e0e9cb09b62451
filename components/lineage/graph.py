"""Walking the lineage graph: where a node came from (upstream) and what it fed (downstream).

Every flow run that records lineage carries, next to ``lineage/record.json``, the index tags
of :mod:`.lineage` (``stemma.lineage.made.<key>``, ``stemma.lineage.used.<key>``,
``stemma.lineage.edges``). The walker answers from MLflow searches on those tags and never
lists or downloads every run's artifacts:

* upstream of a node: the runs that *made* it (one tag search), and inside each such run's
  record everything the node descends from; then, for each of those nodes, the runs that
  made *them*, and so on;
* downstream of a node: the runs that *used* it, and inside each such run's record
  everything that descends from the node; then the runs that used those nodes, and so on.

Nothing here knows the kinds of nodes beyond ``run`` and ``model_version`` (whose registry
entry adds its creation time and aliases): a record with new kinds (``drift_report``,
``quantized_variant``, ``decision``) appears in the graph as it is written.

A run that recorded lineage before the index tags existed (it has ``stemma.flow`` but no
``stemma.lineage.schema``) is still read when it is reached directly, by run id or through
a model version's ``stemma.run_id`` tag: its ``lineage/record.json`` is downloaded then.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stemma.components.errors import LineageError
from stemma.components.lineage.records import (
    ASSET_KEY_PREFIX,
    EDGES_IN_ARTIFACT,
    EDGES_TAG,
    INDEX_SCHEMA_TAG,
    MADE_KIND_TAG_PREFIX,
    MADE_TAG_PREFIX,
    RECORD_ARTIFACT,
    USED_KIND_TAG_PREFIX,
    USED_TAG_PREFIX,
    asset_key,
    data_node_id,
    kind_tag,
    made_tag,
    model_node_id,
    record_roles,
    run_node_id,
    used_tag,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"
#: Prefix of run node ids (``mlflow-run:<id>``) and of model version ids.
RUN_PREFIX = "mlflow-run:"
MODEL_PREFIX = "models:/"
#: Experiments whose names start so hold promotion claims, never runs.
CLAIM_EXPERIMENT_PREFIX = "stemma.claims/"
#: Runs followed from one node by default (newest first downstream); `--all` lifts it.
DEFAULT_MAX_RUNS = 20
#: Runs fetched per search page (MLflow's maximum for search_runs).
SEARCH_PAGE_SIZE = 1000
#: Run and model version tags the flows write (see NOTES.md, "Lineage records").
FLOW_TAG = "stemma.flow"
PIPELINE_TAG = "stemma.pipeline"
FLOW_RUN_TAG = "stemma.prefect.flow_run_id"
MODEL_RUN_TAG = "stemma.run_id"
DATA_MD5_TAG = "stemma.data.md5"
FILE_MD5_TAG = "stemma.data.file_md5"
OUTPUT_SHA256_TAG = "stemma.output.sha256"
#: The scoring engine's manifest, written last into a prediction folder.
MANIFEST_NAME = "_SUCCESS"

_MODEL_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_MODEL_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
_POINTER = re.compile(r"^(?P<pointer>[^@\s]+\.dvc)(?:@(?P<rev>\S+))?$")
_NODE_ID = re.compile(r"^[a-z][a-z0-9_-]*:\S+$")

#: The forms of REF, as error messages list them.
ACCEPTED_FORMS = (
    "models:/<name>@<alias>      a registered model's alias, e.g. models:/credit@champion",
    "models:/<name>/<version>    a model version, e.g. models:/credit/7",
    "<run id>                    an MLflow run that recorded lineage",
    "<md5>                       a data version by its DVC md5 (`<md5>.dir` for a folder)",
    "data.dvc@<git rev>          the data version a DVC file recorded at a git revision",
    "<folder>|_SUCCESS|<part>    a scoring output: its folder, its manifest or a part file",
    "<kind>:<id>                 any node id `stemma lineage` prints, e.g. mlflow-run:<id>",
)


# ---------------------------------------------------------------------------------------
# The graph


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

    @property
    def asset_key(self) -> str:
        """The Prefect asset key the flows materialize for this node."""
        return asset_key(self.id)


@dataclass(frozen=True)
class GraphEdge:
    """``source`` led to ``target``; ``relation`` says how."""

    source: str
    target: str
    relation: str


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
    edges: list[GraphEdge] = field(default_factory=list)
    truncated: dict[str, bool] = field(default_factory=dict)
    maker_rank: dict[str, tuple[bool, str]] = field(default_factory=dict, repr=False)
    searches: int = 0
    seconds: float = 0.0

    def parents(self, node_id: str) -> list[GraphEdge]:
        """Edges into ``node_id``, sorted by relation then source."""
        return sorted(
            (edge for edge in self.edges if edge.target == node_id),
            key=lambda edge: (edge.relation, edge.source),
        )

    def children(self, node_id: str) -> list[GraphEdge]:
        """Edges out of ``node_id``, sorted by relation then target."""
        return sorted(
            (edge for edge in self.edges if edge.source == node_id),
            key=lambda edge: (edge.relation, edge.target),
        )

    def to_dict(self) -> dict[str, Any]:
        """The graph as a JSON-able document (what ``--json`` prints)."""
        return {
            "reference": self.reference,
            "root": self.root,
            "direction": self.direction,
            "nodes": [
                {**asdict(node), "asset_key": node.asset_key} for node in self.nodes.values()
            ],
            "edges": [asdict(edge) for edge in self.edges],
            "truncated": sorted(self.truncated),
        }


# ---------------------------------------------------------------------------------------
# One run's record


@dataclass
class RunRecord:
    """The lineage a run recorded, read from its index tags (or its artifact)."""

    run_id: str
    node: dict[str, Any]
    nodes: dict[str, dict[str, Any]]
    edges: list[GraphEdge]
    made: set[str]
    used: set[str]

    @property
    def run_node(self) -> str:
        return str(self.node["id"])

    def ancestors(self, node_id: str) -> set[str]:
        """Nodes of this record from which ``node_id`` is reachable."""
        found: set[str] = set()
        frontier = [node_id]
        while frontier:
            current = frontier.pop()
            for edge in self.edges:
                if edge.target == current and edge.source not in found:
                    found.add(edge.source)
                    frontier.append(edge.source)
        found.discard(node_id)
        return found

    def descendants(self, node_id: str) -> set[str]:
        """Nodes of this record reachable from ``node_id``."""
        found: set[str] = set()
        frontier = [node_id]
        while frontier:
            current = frontier.pop()
            for edge in self.edges:
                if edge.source == current and edge.target not in found:
                    found.add(edge.target)
                    frontier.append(edge.target)
        found.discard(node_id)
        return found


def _iso(milliseconds: int | None) -> str | None:
    if not milliseconds:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC).isoformat(timespec="seconds")


def _parse_tag_node(value: str) -> dict[str, Any] | None:
    try:
        node = json.loads(value)
    except ValueError:
        return None
    if not isinstance(node, dict) or not isinstance(node.get("id"), str):
        return None
    node.setdefault("kind", "unknown")
    node.setdefault("attributes", {})
    return node


def _run_node(run: Run) -> dict[str, Any]:
    tags = run.data.tags
    attributes = {
        key: value
        for key, value in {
            "flow": tags.get(FLOW_TAG),
            "pipeline": tags.get(PIPELINE_TAG),
            "status": run.info.status,
            "experiment_id": run.info.experiment_id,
            "run_name": run.info.run_name,
            "ended": _iso(run.info.end_time),
        }.items()
        if value
    }
    return {
        "kind": "run",
        "id": run_node_id(run.info.run_id),
        "digest": None,
        "created": _iso(run.info.start_time),
        "flow_run_id": tags.get(FLOW_RUN_TAG) or None,
        "attributes": attributes,
    }


# ---------------------------------------------------------------------------------------
# Reading records from MLflow


class RecordIndex:
    """MLflow searches over the lineage index tags, with each run read once.

    Args:
        client: an MLflow client on the tracking store (and registry) to read.
    """

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.calls = 0
        self._experiments: list[str] | None = None
        self._records: dict[str, RunRecord | None] = {}
        self._versions: dict[tuple[str, str], Any] = {}

    @property
    def experiment_ids(self) -> list[str]:
        """Every active experiment that may hold runs (promotion claim experiments left out)."""
        if self._experiments is None:
            from mlflow.entities import ViewType

            self.calls += 1
            found = []
            token = None
            while True:
                page = self.client.search_experiments(
                    view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
                )
                found += [
                    e.experiment_id for e in page if not e.name.startswith(CLAIM_EXPERIMENT_PREFIX)
                ]
                token = page.token
                if not token:
                    break
            self._experiments = found
        return self._experiments

    def search(
        self, filter_string: str, *, limit: int | None = None, newest_first: bool = False
    ) -> list[RunRecord]:
        """The records of the active runs matching ``filter_string``, oldest first."""
        from mlflow.entities import ViewType

        if not self.experiment_ids:
            return []
        runs: list[Run] = []
        token = None
        while True:
            self.calls += 1
            page = self.client.search_runs(
                self.experiment_ids,
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=min(limit or SEARCH_PAGE_SIZE, SEARCH_PAGE_SIZE),
                order_by=[f"attributes.start_time {'DESC' if newest_first else 'ASC'}"],
                page_token=token,
            )
            runs += list(page)
            token = page.token
            if not token or (limit is not None and len(runs) >= limit):
                break
        runs = runs[:limit] if limit is not None else runs
        records = [self._remember(run) for run in runs]
        return [record for record in records if record is not None]

    def runs_that_made(self, node_id: str, *, limit: int | None = None) -> list[RunRecord]:
        """The runs whose records say they produced ``node_id``, oldest first."""
        return self.search(f"tags.`{made_tag(node_id)}` IS NOT NULL", limit=limit)

    def runs_that_used(
        self, node_id: str, *, limit: int | None = None, newest_first: bool = False
    ) -> list[RunRecord]:
        """The runs whose records say they read ``node_id``."""
        return self.search(
            f"tags.`{used_tag(node_id)}` IS NOT NULL", limit=limit, newest_first=newest_first
        )

    def record(self, run_id: str) -> RunRecord | None:
        """The record of one run, or None when the run does not exist."""
        if run_id in self._records:
            return self._records[run_id]
        from mlflow.exceptions import MlflowException

        self.calls += 1
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            self._records[run_id] = None
            return None
        return self._remember(run)

    def model_version(self, name: str, version: str) -> Any | None:
        """The registry entry of a version, or None when it does not exist."""
        key = (name, version)
        if key not in self._versions:
            from mlflow.exceptions import MlflowException

            self.calls += 1
            try:
                self._versions[key] = self.client.get_model_version(name, version)
            except MlflowException:
                self._versions[key] = None
        return self._versions[key]

    def _remember(self, run: Run) -> RunRecord | None:
        run_id = run.info.run_id
        if run_id in self._records:
            return self._records[run_id]
        record = self._parse(run)
        self._records[run_id] = record
        return record

    def _parse(self, run: Run) -> RunRecord:
        tags = run.data.tags
        run_node = _run_node(run)
        nodes: dict[str, dict[str, Any]] = {run_node["id"]: run_node}
        made: set[str] = set()
        used: set[str] = set()
        edges: list[GraphEdge] = []
        edges_text = tags.get(EDGES_TAG)
        if INDEX_SCHEMA_TAG in tags and edges_text != EDGES_IN_ARTIFACT:
            for key, value in tags.items():
                for prefix, role in ((MADE_TAG_PREFIX, made), (USED_TAG_PREFIX, used)):
                    node = _parse_tag_node(value) if key.startswith(prefix) else None
                    if node is not None:
                        nodes.setdefault(node["id"], node)
                        role.add(node["id"])
            try:
                triples = json.loads(edges_text or "[]")
            except ValueError:
                triples = []
            edges = [GraphEdge(str(s), str(t), str(r)) for s, t, r in triples]
        elif INDEX_SCHEMA_TAG in tags or FLOW_TAG in tags:
            document = self._download_record(run.info.run_id)
            if document is not None:
                made, used = record_roles(document, run.info.run_id)
                for node in document.get("nodes", []):
                    if node.get("id") != run_node["id"]:
                        nodes.setdefault(str(node["id"]), dict(node))
                    else:
                        run_node["attributes"] = {
                            **{k: v for k, v in (node.get("attributes") or {}).items() if v},
                            **run_node["attributes"],
                        }
                edges = [
                    GraphEdge(str(e["source"]), str(e["target"]), str(e["relation"]))
                    for e in document.get("edges", [])
                ]
        return RunRecord(run.info.run_id, run_node, nodes, edges, made, used)

    def _download_record(self, run_id: str) -> dict[str, Any] | None:
        self.calls += 1
        with tempfile.TemporaryDirectory(prefix="stemma-lineage-") as scratch:
            try:
                path = self.client.download_artifacts(run_id, RECORD_ARTIFACT, scratch)
                document = json.loads(Path(path).read_text(encoding="utf-8"))
            except Exception:  # no record, or an unreadable one: the run has no lineage
                return None
        return document if isinstance(document, dict) else None


# ---------------------------------------------------------------------------------------
# Resolving a reference


def resolve_reference(reference: str, index: RecordIndex, root: Path) -> str:
    """The node id a REF names (see :data:`ACCEPTED_FORMS`).

    Args:
        reference: what the user typed.
        index: the record index on the store.
        root: the project root (for paths, DVC files and git revisions).

    Raises:
        LineageError: the reference has none of the accepted forms, or names nothing
            the store recorded; the message says which and lists the forms.
    """
    text = reference.strip()
    if text.startswith(ASSET_KEY_PREFIX):
        text = text[len(ASSET_KEY_PREFIX) :]
    if match := _MODEL_ALIAS.match(text):
        return _resolve_alias(match["name"], match["alias"], index)
    if match := _MODEL_VERSION.match(text):
        return _resolve_version(match["name"], match["version"], index)
    if text.startswith(RUN_PREFIX):
        return _resolve_run(text[len(RUN_PREFIX) :], index, as_md5=False)
    if _MD5.match(text.lower()):
        return _resolve_run(text.lower(), index, as_md5=True)
    if match := _POINTER.match(text):
        return _resolve_pointer(match["pointer"], match["rev"], index, root)
    path = Path(text) if Path(text).is_absolute() else root / text
    if path.exists():
        if (
            (path.is_dir() and (path / MANIFEST_NAME).is_file())
            or path.name == MANIFEST_NAME
            or (path.is_file() and (path.parent / MANIFEST_NAME).is_file())
        ):
            return _resolve_predictions(path, index, root)
        return _resolve_data_path(path, index, root)
    if _NODE_ID.match(text) and (index.runs_that_made(text) or index.runs_that_used(text, limit=1)):
        return text
    raise LineageError(
        f"{reference!r} names nothing Stemma can trace",
        [
            "no model, run, data version, scoring output or recorded node matches it",
            "REF takes one of these forms:",
            *(f"  {form}" for form in ACCEPTED_FORMS),
        ],
    )


def _resolve_alias(name: str, alias: str, index: RecordIndex) -> str:
    from mlflow.exceptions import MlflowException

    index.calls += 1
    try:
        version = index.client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise LineageError(
            f"models:/{name}@{alias}: no such model alias", _registry_listing(name, index)
        ) from None
    return _resolve_version(name, str(version.version), index)


def _resolve_version(name: str, version: str, index: RecordIndex) -> str:
    entry = index.model_version(name, version)
    if entry is None:
        raise LineageError(
            f"models:/{name}/{version}: no such model version", _registry_listing(name, index)
        )
    node = model_node_id(name, version)
    tags = dict(entry.tags or {})
    if not tags.get(MODEL_RUN_TAG) and not index.runs_that_made(node):
        raise LineageError(
            f"models:/{name}/{version} carries no lineage",
            [
                f"the version has no {MODEL_RUN_TAG} tag and no run recorded making it: it was "
                "registered outside Stemma's flows",
                f"its source: {entry.source}",
            ],
        )
    return node


def _registry_listing(name: str, index: RecordIndex) -> list[str]:
    from mlflow.exceptions import MlflowException

    index.calls += 1
    try:
        registered = index.client.get_registered_model(name)
    except MlflowException:
        return [f"there is no registered model named {name!r} in {index.client.tracking_uri}"]
    aliases = ", ".join(
        f"{alias} -> v{version}" for alias, version in sorted((registered.aliases or {}).items())
    )
    index.calls += 1
    versions = sorted(
        int(v.version) for v in index.client.search_model_versions(f"name = '{name}'")
    )
    return [
        f"its aliases: {aliases or 'none'}",
        f"its versions: {', '.join(map(str, versions)) or 'none'}",
    ]


def _resolve_run(text: str, index: RecordIndex, *, as_md5: bool) -> str:
    if not as_md5 or _HEX32.match(text):
        record = index.record(text)
        if record is not None:
            return record.run_node
    if as_md5:
        node = _find_data_version(text, index)
        if node is not None:
            return node
    raise LineageError(
        f"{text!r}: no MLflow run with this id"
        + (" and no data version with this md5" if as_md5 else ""),
        [
            f"looked in {index.client.tracking_uri}",
            "check MLFLOW_TRACKING_URI (or run from the project root), or copy the id from "
            "`stemma lineage models:/<name>@champion`",
        ],
    )


def _find_data_version(md5: str, index: RecordIndex) -> str | None:
    """The node id of a data version (or data file) recorded with ``md5``."""
    digest = f"md5:{md5}"
    for tag in (DATA_MD5_TAG, FILE_MD5_TAG):
        for record in index.search(f"tags.`{tag}` = '{md5}'", limit=1):
            candidates = [
                node
                for node in record.nodes.values()
                if node.get("digest") == digest and node.get("kind") != "run"
            ]
            candidates.sort(key=lambda node: node.get("kind") != "data_version")
            if candidates:
                return str(candidates[0]["id"])
    node = data_node_id("data.dvc", md5)
    if index.runs_that_used(node, limit=1) or index.runs_that_made(node):
        return node
    return None


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def read_pointer(root: Path, pointer: str, rev: str | None) -> tuple[str, str]:
    """The md5 and out path a DVC file records, in the working tree or at a git revision.

    Raises:
        LineageError: the file does not exist there or records no md5.
    """
    if rev:
        text = _git(root, "show", f"{rev}:{pointer}")
        where = f"{pointer} at git revision {rev}"
        if text is None:
            raise LineageError(
                f"{where}: cannot read it",
                [
                    f"`git show {rev}:{pointer}` failed in {root}: check the revision and that "
                    "the project is a git repository",
                ],
            )
    else:
        where = pointer
        try:
            text = (root / pointer).read_text(encoding="utf-8")
        except OSError:
            raise LineageError(f"{root / pointer}: no such DVC file") from None
    try:
        content = yaml.safe_load(text)
        out = content["outs"][0]
        return str(out["md5"]), str(out["path"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        raise LineageError(f"{where}: records no data version (no outs[0].md5)") from None


def _resolve_pointer(pointer: str, rev: str | None, index: RecordIndex, root: Path) -> str:
    md5, _ = read_pointer(root, pointer, rev)
    node = data_node_id(pointer, md5)
    if index.runs_that_used(node, limit=1) or index.runs_that_made(node):
        return node
    found = _find_data_version(md5, index)
    if found is not None:
        return found
    raise LineageError(
        f"{pointer}{'@' + rev if rev else ''} records data version {md5}, which no run recorded",
        ["nothing was trained or scored on this data version in " + index.client.tracking_uri],
    )


def _resolve_predictions(path: Path, index: RecordIndex, root: Path) -> str:
    import hashlib

    folder = path if path.is_dir() else path.parent
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise LineageError(
            f"{path}: not a complete scoring output",
            [f"its folder has no {MANIFEST_NAME} manifest: the scoring run did not finish"],
        )
    manifest_bytes = manifest_path.read_bytes()
    sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if path.suffix == ".parquet":
        _check_part(path, manifest_bytes)
    try:
        relative = folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        relative = str(folder.resolve())
    node = f"predictions:{relative}@{sha256}"
    if index.runs_that_made(node):
        return node
    for record in index.search(f"tags.`{OUTPUT_SHA256_TAG}` = '{sha256}'", limit=1):
        for candidate in record.nodes.values():
            if candidate.get("digest") == f"sha256:{sha256}":
                return str(candidate["id"])
    raise LineageError(
        f"{folder}: no scoring run recorded this output",
        [
            f"its manifest has sha256 {sha256}",
            f"looked in {index.client.tracking_uri}; the folder may come from another store "
            "or have been rewritten after the run",
        ],
    )


def _resolve_data_path(path: Path, index: RecordIndex, root: Path) -> str:
    """A data folder or file DVC tracks: its data version, or the file in it."""
    from stemma.components.data.tables import resolve_data_version
    from stemma.components.errors import DataError

    try:
        version = resolve_data_version(root, path)
    except DataError as error:
        raise LineageError(
            f"{path}: neither a scoring output nor data DVC can vouch for",
            [error.headline, *error.details],
        ) from None
    pointer = version.dvc_file.relative_to(root.resolve()).as_posix()
    if version.file_path == version.out_path:
        node = data_node_id(pointer, version.md5)
    else:
        node = f"file:{version.relpath}@{version.file_md5}"
    if index.runs_that_used(node, limit=1) or index.runs_that_made(node):
        return node
    raise LineageError(
        f"{path}: no run recorded reading these bytes",
        [f"they are {node}", f"looked in {index.client.tracking_uri}"],
    )


def _check_part(path: Path, manifest_bytes: bytes) -> None:
    import hashlib

    try:
        manifest = json.loads(manifest_bytes)
        parts = {str(p["name"]): str(p["sha256"]) for p in manifest.get("parts", [])}
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    expected = parts.get(path.name)
    if expected is None:
        raise LineageError(
            f"{path}: the manifest beside it does not list this part",
            ["the file was not written by the scoring run that wrote the manifest"],
        )
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise LineageError(
            f"{path}: changed since it was written",
            [f"the manifest records sha256 {expected}", f"the file hashes to  {actual}"],
        )


# ---------------------------------------------------------------------------------------
# Walking


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
    seen_edges: set[GraphEdge] = set()
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
                if direction == UPSTREAM:
                    reached = record.ancestors(node_id)
                    inside = reached | {node_id}
                    edges = [e for e in record.edges if e.target in inside and e.source in reached]
                    # where this record meets others: the nodes nothing in it leads to
                    links = {n for n in reached if not any(e.target == n for e in record.edges)}
                else:
                    reached = record.descendants(node_id)
                    inside = reached | {node_id}
                    edges = [e for e in record.edges if e.source in inside and e.target in reached]
                    links = reached & record.made
                for other in inside:
                    _merge_node(graph, record, other)
                    seen = first_seen.get(other)
                    if seen is None or (record.node.get("created") or "") < (
                        seen.get("created") or ""
                    ):
                        first_seen[other] = record.node
                for made in inside & record.made:
                    _set_maker(graph, record, made)
                for edge in edges:
                    if edge not in seen_edges:
                        seen_edges.add(edge)
                        graph.edges.append(edge)
                following |= {n for n in links if n not in expanded and n != record.run_node}
        level = sorted(following)
    _add_registry_details(graph, index)
    _add_data_version_times(graph, root)
    _add_recorded_times(graph, first_seen)
    graph.searches = index.calls - calls_before
    graph.seconds = time.perf_counter() - started
    return graph


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
    counts: dict[str, int] = {}
    for node_id in level:
        if node_id != start and not node_id.startswith(RUN_PREFIX):
            kind = _kind_of(node_id)
            counts[kind] = counts.get(kind, 0) + 1
    prefix = MADE_KIND_TAG_PREFIX if direction == UPSTREAM else USED_KIND_TAG_PREFIX
    return {
        kind
        for kind, count in counts.items()
        if count >= 2 and not index.search(f"tags.`{kind_tag(prefix, kind)}` IS NOT NULL", limit=1)
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
            run_id = dict(entry.tags or {}).get(MODEL_RUN_TAG) if entry is not None else None
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
        node.created = run.get("attributes", {}).get("ended") or run.get("created")
        node.flow_run_id = run.get("flow_run_id")


def _add_registry_details(graph: LineageGraph, index: RecordIndex) -> None:
    """Creation time, aliases and status of the model versions in the graph."""
    for node in graph.nodes.values():
        match = _MODEL_VERSION.match(node.id)
        if not match:
            continue
        entry = index.model_version(match["name"], match["version"])
        if entry is None:
            node.attributes["registry"] = "deleted"
            continue
        node.created = _iso(entry.creation_timestamp) or node.created
        if entry.aliases:
            node.attributes["aliases"] = sorted(entry.aliases)
        tags = dict(entry.tags or {})
        if not node.digest and tags.get("stemma.weights.sha256"):
            node.digest = f"sha256:{tags['stemma.weights.sha256']}"
        if tags.get("stemma.gate.decision"):
            node.attributes.setdefault("gate", tags["stemma.gate.decision"])


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
    """When each data version was committed: the commit that last changed its DVC file."""
    for node in graph.nodes.values():
        pointer = node.attributes.get("pointer")
        rev = node.attributes.get("git_rev")
        if node.kind != "data_version" or node.created or not pointer or not rev:
            continue
        stamp = _git(root, "log", "-1", "--format=%cI", str(rev), "--", str(pointer))
        if stamp and stamp.strip():
            moment = datetime.fromisoformat(stamp.strip()).astimezone(UTC)
            node.created = moment.isoformat(timespec="seconds")
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


def render_tree(graph: LineageGraph) -> str:
    """The graph as an indented tree from its root; a node met again says ``(see above)``."""
    lines = [
        f"{graph.direction} of {graph.reference}"
        + (f" ({graph.root})" if graph.root != graph.reference else ""),
        "",
    ]
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
        edges = graph.parents(node_id) if graph.direction == UPSTREAM else graph.children(node_id)
        if not repeat:
            lines.append(f"{inner}{'│   ' if edges else '    '}{_details(node)}")
        shown.add(node_id)
        if repeat:
            return
        if graph.truncated.get(node_id):
            lines.append(f"{inner}│   (more runs than shown here: --all follows every one)")
        for position, edge in enumerate(edges):
            other = edge.source if graph.direction == UPSTREAM else edge.target
            visit(other, edge.relation, inner, position == len(edges) - 1)

    visit(graph.root, None, "", True)
    if len(graph.nodes) == 1:
        lines.append("")
        lines.append(f"(no recorded {graph.direction} lineage)")
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
