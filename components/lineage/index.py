"""Reading lineage records from MLflow: each run's record, found by its index tags.

Every flow run that records lineage carries, next to ``lineage/record.json``, the index
tags of :mod:`stemma.components.platform.lineage` (``stemma.lineage.made-nodes`` and
``stemma.lineage.used-nodes``, short hashes of node ids). :class:`RecordIndex` finds runs
with MLflow searches on those tags (``LIKE``) and reads the record of each run it reaches,
once; it never lists or downloads every run's artifacts. Runs indexed by older Stemma
versions (one ``stemma.lineage.made.<key>`` tag per node, bodies and edges in tags) are
searched and read from their tags as before, and a run that recorded lineage before any
index existed (``stemma.flow`` but no index tag) is read when it is reached directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from stemma.components.platform import tags as tag_names
from stemma.components.platform.lineage import (
    EDGES_IN_ARTIFACT,
    EDGES_TAG,
    INDEX_SCHEMA_TAG,
    MADE_NODES_TAG,
    USED_NODES_TAG,
    Edge,
    LineageRecord,
    index_part_tag,
    kind_filter,
    kind_tag,
    made_tag,
    node_filter,
    reach,
    read_run_record,
    record_roles,
    run_node_id,
    used_tag,
)
from stemma.components.platform.metric_names import KEY_METRIC_PREFIXES, metric_rank

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

#: Prefix of run node ids (``mlflow-run:<id>``) and of model version ids.
RUN_PREFIX = "mlflow-run:"
MODEL_PREFIX = "models:/"
#: Experiments whose names start so hold promotion claims, never runs.
CLAIM_EXPERIMENT_PREFIX = tag_names.CLAIMS_EXPERIMENT_PREFIX + "/"
#: Runs (and experiments) fetched per search page (MLflow's maximum for search_runs).
SEARCH_PAGE_SIZE = 1000
#: Key metrics a run node carries (ranked by :func:`.metric_names.metric_rank`).
KEY_METRICS = 3


@dataclass
class RunRecord:
    """The lineage a run recorded, read from its index tags (or its artifact)."""

    run_id: str
    node: dict[str, Any]
    nodes: dict[str, dict[str, Any]]
    edges: list[Edge]
    made: set[str]
    used: set[str]

    @property
    def run_node(self) -> str:
        return str(self.node["id"])

    def reach(self, node_id: str, *, upstream: bool) -> set[str]:
        """Nodes of this record from which ``node_id`` is reachable (``upstream``), or
        reachable from it."""
        return reach(self.edges, node_id, upstream=upstream)


def iso_time(milliseconds: int | None) -> str | None:
    """An MLflow timestamp (milliseconds) as ISO 8601 in UTC, to the second."""
    if not milliseconds:
        return None
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC).isoformat(timespec="seconds")


def key_metrics(metrics: Mapping[str, float], limit: int = KEY_METRICS) -> dict[str, float]:
    """At most ``limit`` of a run's metrics whose names start with a key prefix, best ranked
    first; values that are not finite numbers are left out (JSON has no NaN)."""
    chosen = sorted(
        (
            name
            for name, value in metrics.items()
            if metric_rank(name)[0] < len(KEY_METRIC_PREFIXES)
            and isinstance(value, int | float)
            and math.isfinite(value)
        ),
        key=metric_rank,
    )
    return {name: float(metrics[name]) for name in chosen[:limit]}


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
            "flow": tags.get(tag_names.FLOW),
            "pipeline": tags.get(tag_names.PIPELINE),
            "status": run.info.status,
            "experiment_id": run.info.experiment_id,
            "run_name": run.info.run_name,
            "ended": iso_time(run.info.end_time),
            "metrics": key_metrics(run.data.metrics or {}),
        }.items()
        if value
    }
    return {
        "kind": "run",
        "id": run_node_id(run.info.run_id),
        "digest": None,
        "created": iso_time(run.info.start_time),
        "flow_run_id": tags.get(tag_names.PREFECT_FLOW_RUN_ID) or None,
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
        self._legacy: bool | None = None
        self._parts: dict[str, list[str]] = {}

    @property
    def experiment_ids(self) -> list[str]:
        """Every active experiment that may hold runs (promotion claim experiments left out)."""
        if self._experiments is None:
            from mlflow.entities import ViewType
            from mlflow.utils import get_results_from_paginated_fn

            self.calls += 1
            found = get_results_from_paginated_fn(
                lambda max_results, token: self.client.search_experiments(
                    view_type=ViewType.ACTIVE_ONLY, max_results=max_results, page_token=token
                ),
                SEARCH_PAGE_SIZE,
            )
            self._experiments = [
                e.experiment_id for e in found if not e.name.startswith(CLAIM_EXPERIMENT_PREFIX)
            ]
        return self._experiments

    @property
    def legacy(self) -> bool:
        """Whether the store holds runs indexed by older Stemma versions (one search, once)."""
        if self._legacy is None:
            self._legacy = bool(self._runs(f"tags.`{INDEX_SCHEMA_TAG}` IS NOT NULL", limit=1))
        return self._legacy

    def index_parts(self, tag: str) -> list[str]:
        """The tags that hold ``tag``'s entries in this store: ``tag``, then ``<tag>.2``, ...
        as far as some run has them (one search per part, once)."""
        if tag not in self._parts:
            parts = [tag]
            while self._runs(f"tags.`{index_part_tag(tag, len(parts) + 1)}` IS NOT NULL", limit=1):
                parts.append(index_part_tag(tag, len(parts) + 1))
            self._parts[tag] = parts
        return self._parts[tag]

    def search(
        self, filter_string: str, *, limit: int | None = None, newest_first: bool = False
    ) -> list[RunRecord]:
        """The records of the active runs matching ``filter_string``, oldest first."""
        return self.search_any([filter_string], limit=limit, newest_first=newest_first)

    def search_any(
        self, filters: list[str], *, limit: int | None = None, newest_first: bool = False
    ) -> list[RunRecord]:
        """The records of the active runs matching any of ``filters`` (MLflow's filters have
        no OR: one search each), oldest first, or newest first."""
        found: dict[str, Run] = {}
        for filter_string in filters:
            for run in self._runs(filter_string, limit=limit, newest_first=newest_first):
                found.setdefault(run.info.run_id, run)
        runs = sorted(
            found.values(),
            key=lambda run: (run.info.start_time or 0, run.info.run_id),
            reverse=newest_first,
        )
        runs = runs[:limit] if limit is not None else runs
        records = [self._remember(run) for run in runs]
        return [record for record in records if record is not None]

    def _runs(
        self, filter_string: str, *, limit: int | None = None, newest_first: bool = False
    ) -> list[Run]:
        """The active runs matching ``filter_string``, as MLflow returns them."""
        from mlflow.entities import ViewType
        from mlflow.utils import get_results_from_paginated_fn

        if not self.experiment_ids:
            return []

        def page(max_results: int, token: str | None) -> Any:
            self.calls += 1
            return self.client.search_runs(
                self.experiment_ids,
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=max_results,
                order_by=[f"attributes.start_time {'DESC' if newest_first else 'ASC'}"],
                page_token=token,
            )

        return get_results_from_paginated_fn(page, SEARCH_PAGE_SIZE, limit)

    def _node_filters(self, node_id: str, *, made: bool) -> list[str]:
        tag = MADE_NODES_TAG if made else USED_NODES_TAG
        filters = [node_filter(part, node_id) for part in self.index_parts(tag)]
        if self.legacy:
            filters.append(f"tags.`{(made_tag if made else used_tag)(node_id)}` IS NOT NULL")
        return filters

    def runs_that_made(self, node_id: str, *, limit: int | None = None) -> list[RunRecord]:
        """The runs whose records say they produced ``node_id``, oldest first."""
        return self.search_any(self._node_filters(node_id, made=True), limit=limit)

    def runs_that_used(
        self, node_id: str, *, limit: int | None = None, newest_first: bool = False
    ) -> list[RunRecord]:
        """The runs whose records say they read ``node_id``."""
        return self.search_any(
            self._node_filters(node_id, made=False), limit=limit, newest_first=newest_first
        )

    def any_run_with_kind(self, kind: str, *, made: bool) -> bool:
        """Whether some run made (or used) a node of ``kind``; reads no record."""
        tag = MADE_NODES_TAG if made else USED_NODES_TAG
        filters = [kind_filter(part, kind) for part in self.index_parts(tag)]
        if self.legacy:
            prefix = (
                tag_names.LINEAGE_MADE_KIND_PREFIX if made else tag_names.LINEAGE_USED_KIND_PREFIX
            )
            filters.append(f"tags.`{kind_tag(prefix, kind)}` IS NOT NULL")
        return any(self._runs(filter_string, limit=1) for filter_string in filters)

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
        edges: list[Edge] = []
        edges_text = tags.get(EDGES_TAG)
        if INDEX_SCHEMA_TAG in tags and edges_text != EDGES_IN_ARTIFACT:
            roles = ((tag_names.LINEAGE_MADE_PREFIX, made), (tag_names.LINEAGE_USED_PREFIX, used))
            for key, value in tags.items():
                for prefix, role in roles:
                    node = _parse_tag_node(value) if key.startswith(prefix) else None
                    if node is not None:
                        nodes.setdefault(node["id"], node)
                        role.add(node["id"])
            try:
                triples = json.loads(edges_text or "[]")
            except ValueError:
                triples = []
            edges = [Edge(str(s), str(t), str(r)) for s, t, r in triples]
        elif MADE_NODES_TAG in tags or INDEX_SCHEMA_TAG in tags or tag_names.FLOW in tags:
            record = self._download_record(run.info.run_id)
            if record is not None:
                made, used = record_roles(record, run.info.run_id)
                for node in record.nodes:
                    if node.id != run_node["id"]:
                        nodes.setdefault(node.id, asdict(node))
                    else:
                        run_node["attributes"] = {
                            **{k: v for k, v in node.attributes.items() if v},
                            **run_node["attributes"],
                        }
                edges = list(record.edges)
        return RunRecord(run.info.run_id, run_node, nodes, edges, made, used)

    def _download_record(self, run_id: str) -> LineageRecord | None:
        self.calls += 1
        return read_run_record(self.client, run_id)
