"""OpenLineage events from a lineage graph, through the client's file and HTTP transports."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import uuid
from typing import ClassVar

import pytest

from stemma.components.errors import LineageError
from stemma.components.lineage.graph import GraphEdge, GraphNode, LineageGraph
from stemma.components.lineage.openlineage import (
    DEFAULT_ENDPOINT,
    build_events,
    emit_events,
    openlineage_run_id,
)

TRAIN_RUN = "0123456789abcdef0123456789abcdef"
SCORE_RUN = "fedcba9876543210fedcba9876543210"
DATA = "dvc:data.dvc@" + "a" * 32 + ".dir"
FILE = "file:data/train.parquet@" + "b" * 32
CHECKS = "gx-validation:" + "c" * 64
MODEL = "models:/credit/3"
PREDICTIONS = "predictions:outputs/scores@" + "d" * 64
REPORT = "drift-report:credit@" + "e" * 64


def _graph() -> LineageGraph:
    graph = LineageGraph(reference=REPORT, root=REPORT, direction="upstream")
    nodes = [
        GraphNode(
            DATA,
            "data_version",
            "md5:" + "a" * 32 + ".dir",
            attributes={"pointer": "data.dvc", "git_rev": "abc"},
        ),
        GraphNode(FILE, "data_file", "md5:" + "b" * 32),
        GraphNode(CHECKS, "validation", "sha256:" + "c" * 64, attributes={"success": True}),
        GraphNode(
            f"mlflow-run:{TRAIN_RUN}",
            "run",
            created="2026-01-01T00:00:00+00:00",
            flow_run_id="prefect-1",
            attributes={
                "flow": "train",
                "pipeline": "credit",
                "status": "FINISHED",
                "ended": "2026-01-01T00:01:00+00:00",
            },
        ),
        GraphNode(
            MODEL,
            "model_version",
            "sha256:" + "f" * 64,
            attributes={"aliases": ["champion"], "gate": "passed"},
        ),
        GraphNode(
            f"mlflow-run:{SCORE_RUN}",
            "run",
            created="2026-01-02T00:00:00+00:00",
            attributes={"flow": "score", "pipeline": "credit", "status": "FAILED"},
        ),
        GraphNode(
            PREDICTIONS, "predictions", "sha256:" + "d" * 64, attributes={"rows_scored": 1234}
        ),
        GraphNode(REPORT, "drift_report", "sha256:" + "e" * 64),
    ]
    graph.nodes = {node.id: node for node in nodes}
    graph.edges = [
        GraphEdge(DATA, FILE, "contains"),
        GraphEdge(FILE, CHECKS, "checked_by"),
        GraphEdge(FILE, f"mlflow-run:{TRAIN_RUN}", "input_of"),
        GraphEdge(CHECKS, f"mlflow-run:{TRAIN_RUN}", "gated"),
        GraphEdge(f"mlflow-run:{TRAIN_RUN}", MODEL, "produced"),
        GraphEdge(MODEL, f"mlflow-run:{SCORE_RUN}", "scored_with"),
        GraphEdge(f"mlflow-run:{SCORE_RUN}", PREDICTIONS, "produced"),
        GraphEdge(PREDICTIONS, REPORT, "monitored_by"),
    ]
    return graph


ASSERTIONS = {
    CHECKS: [
        {"assertion": "expect_column_values_to_not_be_null", "success": True, "column": "salary"},
        {"assertion": "expect_table_row_count_to_be_between", "success": False, "column": None},
    ]
}


def _as_json(events) -> list[dict]:
    from openlineage.client.serde import Serde

    return [json.loads(Serde.to_json(event)) for event in events]


def test_each_run_becomes_start_and_final_events_with_its_inputs_and_outputs():
    events = _as_json(build_events(_graph(), tracking_uri="sqlite:///x.db", assertions=ASSERTIONS))
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("credit.train", "START"),
        ("credit.train", "COMPLETE"),
        ("credit.score", "START"),
        ("credit.score", "FAIL"),
    ]
    train = events[1]
    assert train["run"]["runId"] == str(uuid.UUID(hex=TRAIN_RUN))
    assert train["eventTime"] == "2026-01-01T00:01:00+00:00"
    run_facet = train["run"]["facets"]["stemma_mlflow_run"]
    assert run_facet["runId"] == TRAIN_RUN and run_facet["prefectFlowRunId"] == "prefect-1"
    assert run_facet["trackingUri"] == "sqlite:///x.db"
    assert run_facet["_producer"] and run_facet["_schemaURL"].endswith("StemmaMlflowRunFacet")
    assert {d["name"] for d in train["inputs"]} == {DATA, FILE, CHECKS}
    inputs = {d["name"]: d for d in train["inputs"]}
    assert inputs[DATA]["facets"]["stemma_dvc"] == {
        "_producer": inputs[DATA]["facets"]["stemma_dvc"]["_producer"],
        "_schemaURL": inputs[DATA]["facets"]["stemma_dvc"]["_schemaURL"],
        "md5": "a" * 32 + ".dir",
        "pointer": "data.dvc",
        "gitRev": "abc",
    }
    quality = inputs[FILE]["inputFacets"]["dataQualityAssertions"]
    assert quality["_schemaURL"].startswith("https://openlineage.io/spec/facets/")
    assert [{k: v for k, v in a.items() if k != "params"} for a in quality["assertions"]] == [
        {"assertion": "expect_column_values_to_not_be_null", "success": True, "column": "salary"},
        {"assertion": "expect_table_row_count_to_be_between", "success": False},
    ]
    (model,) = train["outputs"]
    assert model["name"] == MODEL
    assert model["facets"]["stemma_mlflow_model_version"]["aliases"] == ["champion"]
    assert model["facets"]["version"]["datasetVersion"] == "sha256:" + "f" * 64
    score = events[3]
    # the predictions' consumer is no run: the report is reached through no run of its own
    assert {d["name"] for d in score["inputs"]} == {MODEL}
    assert {d["name"] for d in score["outputs"]} == {PREDICTIONS, REPORT}
    outputs = {d["name"]: d for d in score["outputs"]}
    assert outputs[PREDICTIONS]["outputFacets"]["outputStatistics"]["rowCount"] == 1234
    assert outputs[REPORT]["facets"]["stemma_node"]["kind"] == "drift_report"


def test_run_ids_are_uuids():
    assert openlineage_run_id(TRAIN_RUN) == str(uuid.UUID(hex=TRAIN_RUN))
    other = openlineage_run_id("not-hex")
    assert uuid.UUID(other) and other == openlineage_run_id("not-hex")


def test_a_file_target_gets_json_lines_atomically(tmp_path):
    target = tmp_path / "lineage.jsonl"
    target.write_text("old content\n")
    events = build_events(_graph())
    assert emit_events(events, str(target)) == str(target)
    lines = target.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["producer"] for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lineage.jsonl"]
    with pytest.raises(LineageError, match="its folder does not exist"):
        emit_events(events, str(tmp_path / "missing" / "x.jsonl"))


class _Recorder(http.server.BaseHTTPRequestHandler):
    status = 200
    received: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    _Recorder.received = []
    _Recorder.status = 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_http_target_gets_every_event_posted(receiver):
    events = build_events(_graph())
    where = emit_events(events, receiver)
    assert where == f"{receiver}/{DEFAULT_ENDPOINT}"
    assert [path for path, _ in _Recorder.received] == [f"/{DEFAULT_ENDPOINT}"] * 4
    assert [body for _, body in _Recorder.received] == _as_json(events)


def test_a_receiver_that_refuses_events_is_an_error(receiver):
    _Recorder.status = 400
    with pytest.raises(LineageError) as caught:
        emit_events(build_events(_graph()), receiver + "/lineage")
    assert "cannot send OpenLineage events to" in caught.value.headline
    assert "event 1 of 4 failed" in caught.value.render() and "400" in caught.value.render()


def test_an_unreachable_url_is_an_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LineageError) as caught:
        emit_events(build_events(_graph()), f"http://127.0.0.1:{port}")
    assert caught.value.exit_code == 6
    assert f"http://127.0.0.1:{port}/{DEFAULT_ENDPOINT}" in caught.value.headline
