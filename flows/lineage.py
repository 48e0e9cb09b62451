"""Lineage in the flows and on the command line.

:func:`record_lineage` is what a flow calls once it knows what its run read and wrote: it
logs ``lineage/record.json``, sets the index tags ``stemma lineage`` searches, and
materializes the record's outputs as Prefect assets that depend on its inputs, with the
asset keys derived from the same node ids (``stemma://models:/credit/7``), so the
Prefect UI shows the graph the command prints.

:func:`run_lineage` answers ``stemma lineage REF``: it needs neither Prefect nor a
running flow, only the MLflow store.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from stemma.components.errors import LineageError
from stemma.components.platform import lineage
from stemma.components.platform.redaction import redact, redact_url

#: Key of the asset the materializing task is declared with; replaced on every call.
PLACEHOLDER_ASSET = "stemma://lineage"
#: Set to `false` to record lineage without Prefect assets (a reproduction trains into a
#: store of its own, whose version numbers must not name the real store's assets).
ASSETS_VARIABLE = "STEMMA_RECORD_ASSETS"
#: Flows whose runs log a lineage picture of their model version, and where it goes.
PICTURED_FLOWS = ("train", "shadow", "canary", "quantize")
PICTURE_ARTIFACT = "lineage/graph.svg"
#: Output formats of `stemma lineage`.
FORMATS = ("tree", "json", "mermaid")


# ---------------------------------------------------------------------------------------
# Recording (inside a flow run)


def record_lineage(record: lineage.LineageRecord | dict[str, Any]) -> None:
    """Log a flow run's lineage record, its index tags and its Prefect assets.

    Call it inside the active MLflow run of the flow (:class:`TrackedRun` does, given it as
    its ``lineage`` writer). Credentials in any URL of the record are masked before it is
    written anywhere.
    """
    import mlflow
    from mlflow import MlflowClient

    from stemma.components.platform.tracking import log_batches

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("record_lineage must be called inside an active MLflow run")
    run_id = run.info.run_id
    record = redact(lineage.as_document(record))
    mlflow.log_dict(record, lineage.RECORD_ARTIFACT)
    log_batches(MlflowClient(), run_id, tags=lineage.index_tags(record, run_id))
    try:
        materialize_assets(record, run_id)
    except Exception as error:  # the record and its index are logged: keep the run
        import logging

        logging.getLogger(__name__).warning(
            "lineage recorded, but the Prefect assets were not: %s", error
        )
    log_picture(record, run_id)


def log_picture(record: dict[str, Any], run_id: str) -> str | None:
    """For a run of :data:`PICTURED_FLOWS`: the lineage picture of the model version it made
    (else of the newest it used), upstream, as the run's ``lineage/graph.svg``. Returns the
    version pictured; a picture that cannot be drawn is a warning, not a failed run."""
    from mlflow import MlflowClient

    from stemma.components.lineage import graph as lineage_graph
    from stemma.components.lineage.picture import render_svg

    if record.get("flow") not in PICTURED_FLOWS:
        return None
    made, _ = lineage.record_roles(record, run_id)
    versions = [
        str(node["id"]) for node in record.get("nodes", []) if node.get("kind") == "model_version"
    ]
    ranked = sorted(versions, key=lambda node: (node in made, int(node.rpartition("/")[2] or 0)))
    if not ranked:
        return None
    client = MlflowClient()
    try:
        graph = lineage_graph.walk(
            ranked[-1],
            lineage_graph.RecordIndex(client),
            root=Path.cwd(),
            direction=lineage_graph.UPSTREAM,
        )
        client.log_text(run_id, render_svg(graph), PICTURE_ARTIFACT)
    except Exception as error:  # the record is logged; the picture is a view of it
        import logging

        logging.getLogger(__name__).warning("lineage picture not drawn: %s", error)
        return None
    return ranked[-1]


@cache
def _materializing_task() -> Any:
    from prefect.assets import add_asset_metadata, materialize

    @materialize(PLACEHOLDER_ASSET, name="record lineage assets", by="stemma")
    def record_assets(metadata: dict[str, dict[str, Any]]) -> list[str]:
        for key, values in metadata.items():
            add_asset_metadata(key, values)
        return sorted(metadata)

    return record_assets


def materialize_assets(record: dict[str, Any], run_id: str) -> list[str]:
    """Materialize the nodes a record's run made as Prefect assets; return their keys.

    The nodes it used become the assets' upstream dependencies. Outside a Prefect flow
    run there is nothing to attach the events to, and nothing is done.
    """
    from prefect.assets import Asset, AssetProperties
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return []
    if os.environ.get(ASSETS_VARIABLE, "true").strip().lower() in ("0", "false", "no"):
        return []
    made, used = lineage.record_roles(record, run_id)
    if not made:
        return []
    nodes = {str(node["id"]): node for node in record.get("nodes", [])}
    assets = [
        Asset(
            key=lineage.asset_key(node_id),
            properties=AssetProperties(
                name=node_id, description=f"Stemma {nodes[node_id].get('kind', 'node')}"
            ),
        )
        for node_id in sorted(made)
    ]
    metadata = {
        lineage.asset_key(node_id): {
            "kind": nodes[node_id].get("kind"),
            "node_id": node_id,
            "digest": nodes[node_id].get("digest"),
            "mlflow_run_id": run_id,
            "flow": record.get("flow"),
        }
        for node_id in sorted(made)
    }
    task = _materializing_task().with_options(
        assets=assets, asset_deps=[lineage.asset_key(node_id) for node_id in sorted(used)]
    )
    return task(metadata)


# ---------------------------------------------------------------------------------------
# `stemma lineage`


def open_store(root: Path) -> Any:
    """An MLflow client on the project's store (``MLFLOW_TRACKING_URI`` or ``.stemma/``).

    Raises:
        LineageError: there is no store to read.
    """
    from mlflow import MlflowClient

    from stemma.components.platform import tracking

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        database = root / tracking.STATE_DIR / tracking.LOCAL_DB_NAME
        if not database.is_file():
            raise LineageError(
                f"no MLflow store at {database}",
                [
                    "run a flow first (stemma run train CONFIG), run from the project root "
                    "(--root), or point MLFLOW_TRACKING_URI at the store",
                ],
            )
    uri = tracking.configure_tracking(root)
    return MlflowClient(tracking_uri=uri)


def run_lineage(
    reference: str,
    root: Path,
    *,
    downstream: bool = False,
    output: str = "tree",
    openlineage: str | None = None,
    all_runs: bool = False,
    full: bool = False,
) -> str:
    """The text `stemma lineage` prints; sends OpenLineage events when asked.

    The ``tree`` output is a summary (one line per node, repeats and long chains folded),
    or with ``full`` every node and edge with its digest, times and flow run.

    Raises:
        LineageError: the reference names nothing recorded, or the export failed.
    """
    from stemma.components.lineage import graph as lineage_graph

    if output not in FORMATS:
        raise ValueError(f"output must be one of {FORMATS}")
    client = open_store(root)
    graph = lineage_graph.walk(
        reference,
        lineage_graph.RecordIndex(client),
        root=root,
        direction=lineage_graph.DOWNSTREAM if downstream else lineage_graph.UPSTREAM,
        max_runs=None if all_runs else lineage_graph.DEFAULT_MAX_RUNS,
    )
    if output == "json":
        text = json.dumps(graph.to_dict(), indent=2, sort_keys=False)
    elif output == "mermaid":
        text = lineage_graph.render_mermaid(graph)
    else:
        render = lineage_graph.render_tree if full else lineage_graph.render_summary
        text = render(graph)
        text += f"\n\n({len(graph.nodes)} nodes, {graph.searches} MLflow calls, "
        text += f"{graph.seconds * 1000:.0f} ms)"
    if openlineage:
        from stemma.components.lineage import openlineage as lineage_export

        events = lineage_export.build_events(
            graph,
            tracking_uri=client.tracking_uri,
            assertions=lineage_export.fetch_assertions(client, graph),
        )
        if not events:
            raise LineageError(
                f"{reference}: the graph holds no run, so there is no OpenLineage run event to send"
            )
        where = lineage_export.emit_events(events, openlineage)
        note = redact_url(
            f"sent {len(events)} OpenLineage events ({len(events) // 2} runs) to {where}"
        )
        # Machine-readable output stays clean on stdout; the note goes to stderr.
        import sys

        print(note, file=sys.stderr)
    return redact_url(text)
