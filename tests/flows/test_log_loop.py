"""The online loop end to end: a champion served by a real endpoint that logs what it scores,
the drift monitor on that log, and the retraining the drift report causes, whose new model
version leads back through lineage to the log's day folder and the report.

Real parts only: uvicorn on a free loopback port, the session's SQLite MLflow store and
Prefect API, the endpoint's own log writer, git and DVC in the project.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest

from stemma.components.data.prediction_log import day_folders, day_parts, folder_digest
from stemma.components.platform.lineage import input_node_id, run_node_id
from stemma.components.serving.server import EndpointServer, build_endpoint, max_connections
from stemma.components.spec import load_spec
from stemma.examples.credit import generate_credit_data
from tests.support import SMALL_TRAIN_ROWS

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

PIPELINE = "loop"
NAMES = [f"pipeline.name={PIPELINE}", f"pipeline.model_name={PIPELINE}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]
LOG = "logs/endpoint"
#: The endpoint logs every request and writes a part per 400 rows.
LOGGED = [f"endpoint.log.path={LOG}", "endpoint.log.rotate_rows=400", "endpoint.log.rotate_s=3600"]
#: The retraining takes the few hundred logged rows, and its gate lets the new version pass.
RETRAIN = ["retrain.min_new_rows=100", "gate.margin_over_champion=-0.5"]
#: Rows per generated day, and the day drawn from the shifted population (age, salary, loan).
DAY_ROWS = 1_000
SHIFTED_DAY = 7
REQUEST_ROWS = 250


@pytest.fixture(scope="module")
def served_project(template_project, tmp_path_factory) -> Path:
    """A project whose model `loop` has a champion, and days of production traffic."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("loop") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(config=str(root / "configs" / "credit.yaml"), overrides=[*TRAIN, *NAMES])
    generate_credit_data(
        root / "production", train_rows=SMALL_TRAIN_ROWS, days=SHIFTED_DAY, batch_rows=DAY_ROWS
    )
    return root


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records", date_format="iso"))


def _serve_and_label(project: Path, rows: pd.DataFrame, labels: pd.DataFrame) -> None:
    """Score the rows and send their labels through the endpoint, then stop it (which
    writes what its log still holds)."""
    spec = load_spec(project / "configs" / "credit.yaml", [*NAMES, *LOGGED]).spec
    endpoint = build_endpoint(spec, client=mlflow.MlflowClient(), environ={}, root=project)
    server = EndpointServer(
        endpoint.app, "127.0.0.1", 0, max_connections=max_connections(endpoint.settings)
    )
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        for start in range(0, len(rows), REQUEST_ROWS):
            chunk = rows.iloc[start : start + REQUEST_ROWS]
            answer = client.post("/v1/predict", json=_records(chunk))
            assert answer.status_code == 200, answer.text
            assert not any(result.get("rejected") for result in answer.json()["results"])
        recorded = client.post("/v1/labels", json={"columns": labels.to_dict(orient="list")})
        assert recorded.status_code == 200, recorded.text


def test_drift_in_the_endpoint_log_retrains_a_model_whose_lineage_leads_back_to_the_log(
    served_project,
):
    from stemma.components.lineage.graph import UPSTREAM, walk
    from stemma.components.lineage.index import RecordIndex
    from stemma.flows.monitor import monitor_flow
    from stemma.flows.retrain import retrain_flow

    project = served_project
    production = project / "production" / "credit"
    shifted = pd.read_parquet(production / "batches" / f"day_{SHIFTED_DAY:02d}.parquet")
    labels = pd.read_parquet(production / "labels" / f"day_{SHIFTED_DAY:02d}.parquet")
    _serve_and_label(project, shifted.drop(columns=["applied_at"]), labels)

    log = project / LOG
    (day,) = day_folders(log / "predictions")
    parts = day_parts(day)
    assert len(parts) >= 2  # rotated by rows, the last part written at shutdown
    logged = pd.concat([pd.read_parquet(part) for part in parts])
    assert len(logged) == DAY_ROWS and set(logged["stemma_variant"]) == {"champion"}

    config = str(project / "configs" / "credit.yaml")
    report = monitor_flow(
        config=config,
        overrides=NAMES,
        batch=str(log / "predictions"),
        labels=str(log / "labels"),
    )
    assert report["drift_detected"] is True, report["reasons"]
    assert {"age", "salary", "loan"} <= set(report["drifted_features"])
    assert report["event_id"] is not None  # the Prefect API took the drift event
    assert report["scores"] == {"logged": DAY_ROWS, "rescored": 0}
    assert report["labelled_rows"] == DAY_ROWS
    digest, _ = folder_digest(day, parts)
    assert report["batch"] == str(day) and report["batch_digest"] == digest

    # as the drift trigger starts it: the report's run as the cause, the log as the input
    retrained = retrain_flow(
        config=config,
        overrides=[*NAMES, *TRAIN, *RETRAIN],
        cause=report["run_id"],
        batches=str(log / "predictions"),
        labels=str(log / "labels"),
    )
    assert retrained["cause"]["kind"] == "drift_report"
    assert retrained["new_rows"] == DAY_ROWS
    assert retrained["inputs"] == {str(day): digest}
    table = pd.read_parquet(project / "data" / "credit" / "train.parquet")
    assert set(labels["application_id"]) <= set(table["application_id"])

    version = retrained["model_version"]
    graph = walk(
        f"models:/{PIPELINE}/{version}",
        RecordIndex(mlflow.MlflowClient()),
        root=project,
        direction=UPSTREAM,
    )
    day_node = input_node_id(f"{LOG}/predictions/{day.name}", digest)
    report_node = run_node_id(report["run_id"])
    assert graph.nodes[day_node].kind == "input", sorted(graph.nodes)
    assert graph.nodes[report_node].kind == "drift_report"
    edges = {(edge.source, edge.target) for edge in graph.edges}
    retrain_node = run_node_id(retrained["run_id"])
    assert {(day_node, retrain_node), (report_node, retrain_node)} <= edges
