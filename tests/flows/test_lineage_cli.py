"""`stemma lineage` on what the real training and scoring flows recorded.

One model is trained and one batch scored (real Prefect API, MLflow store, DVC and git
project); the tests then ask for its lineage in every REF form and output, export it as
OpenLineage events to a file and to a receiver on 127.0.0.1, and read the asset events
the flows sent to the Prefect API.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import subprocess
import threading
import time
import uuid
from typing import ClassVar

import mlflow
import pytest
import yaml

from stemma.components.platform import lineage
from stemma.flows.cli import main

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "lineage-cli"
NAMES = [f"pipeline.name={NAME}", f"pipeline.model_name={NAME}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256", *NAMES]
#: Expectations in configs/credit.yaml.
CHECKS = 8


@pytest.fixture(scope="module")
def scored(template_project, tmp_path_factory) -> dict:
    """A project whose model was trained and scored a batch, with both summaries."""
    import shutil

    from stemma.flows.score import score_flow
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("lineage") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    config = str(root / "configs" / "credit.yaml")
    trained = train_flow(config=config, overrides=TRAIN)
    scored = score_flow(
        config=config,
        overrides=NAMES,
        input=str(root / "data" / "credit" / "batches"),
        output=str(root / "outputs" / "scores"),
        model=f"models:/{NAME}/{trained['model_version']}",
    )
    data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    return {"root": root, "train": trained, "score": scored, "data_md5": data_md5}


def lineage_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["lineage", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def graph_json(capsys, scored, *args: str) -> dict:
    code, out, err = lineage_cli(capsys, *args, "--root", str(scored["root"]), "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("flow", ["train", "score"], ids=["train", "score"])
def test_a_flow_run_indexes_its_lineage_in_two_tags(scored, flow):
    run = mlflow.MlflowClient().get_run(scored[flow]["run_id"])
    index = {key for key in run.data.tags if key.startswith("stemma.lineage.")}
    assert index == {lineage.MADE_NODES_TAG, lineage.USED_NODES_TAG}
    made = lineage.index_entries(run.data.tags[lineage.MADE_NODES_TAG])
    expected = "model_version" if flow == "train" else "predictions"
    assert [kind for kind, _ in made] == [expected]
    # the gate's verdict is the one gate tag on the run; its numbers are in the record
    gate = {key for key in run.data.tags if key.startswith("stemma.gate.")}
    assert gate == ({"stemma.gate.decision"} if flow == "train" else set())


def test_upstream_of_the_champion_names_kind_digest_time_and_flow_run(scored, capsys):
    client = mlflow.MlflowClient()
    train_run = client.get_run(scored["train"]["run_id"])
    flow_run_id = train_run.data.tags["stemma.prefect.flow_run_id"]
    model = f"models:/{NAME}/{scored['train']['model_version']}"

    code, out, err = lineage_cli(
        capsys, f"models:/{NAME}@champion", "--root", str(scored["root"]), "--full"
    )
    assert code == 0, err
    assert f"{model}  [model_version]" in out
    assert f"digest sha256:{scored['train']['weights_sha256']}" in out
    assert f"mlflow-run:{train_run.info.run_id}  [run]" in out
    assert f"flow run {flow_run_id}" in out
    assert f"dvc:data.dvc@{scored['data_md5']}  [data_version]" in out
    assert "aliases champion" in out

    document = graph_json(capsys, scored, f"models:/{NAME}@champion")
    nodes = {node["kind"]: node for node in document["nodes"]}
    assert set(nodes) == {"model_version", "run", "data_file", "validation", "data_version"}
    assert document["root"] == model
    assert nodes["model_version"]["made_by"] == f"mlflow-run:{train_run.info.run_id}"
    assert nodes["model_version"]["flow_run_id"] == flow_run_id
    assert nodes["validation"]["digest"].startswith("sha256:")
    # every node has a creation time: runs and versions from MLflow, the data version from
    # the git commit that recorded data.dvc
    assert all(node["created"] for node in document["nodes"]), document["nodes"]
    assert nodes["model_version"]["asset_key"] == f"stemma://{model}"


@pytest.mark.parametrize("form", ["folder", "manifest", "part"])
def test_a_prediction_file_leads_back_to_model_and_data(scored, capsys, form):
    output = scored["root"] / "outputs" / "scores"
    reference = {
        "folder": output,
        "manifest": output / "_SUCCESS",
        "part": sorted(output.glob("part-*.parquet"))[0],
    }[form]
    document = graph_json(capsys, scored, str(reference))
    ids = {node["id"] for node in document["nodes"]}
    manifest_sha256 = hashlib.sha256((output / "_SUCCESS").read_bytes()).hexdigest()
    assert document["root"] == f"predictions:outputs/scores@{manifest_sha256}"
    assert f"models:/{NAME}/{scored['train']['model_version']}" in ids
    assert f"mlflow-run:{scored['train']['run_id']}" in ids
    assert f"mlflow-run:{scored['score']['run_id']}" in ids
    assert f"dvc:data.dvc@{scored['data_md5']}" in ids


def test_downstream_of_the_data_version_reaches_model_and_predictions(scored, capsys):
    document = graph_json(capsys, scored, "data.dvc@HEAD", "--downstream", "--all")
    kinds = {node["id"]: node["kind"] for node in document["nodes"]}
    assert document["root"] == f"dvc:data.dvc@{scored['data_md5']}"
    assert kinds[f"models:/{NAME}/{scored['train']['model_version']}"] == "model_version"
    assert "predictions" in kinds.values()
    same = graph_json(capsys, scored, scored["data_md5"], "--downstream", "--all")
    assert same["root"] == document["root"]
    data_file = graph_json(capsys, scored, "data/credit/train.parquet", "--downstream", "--all")
    assert data_file["root"].startswith("file:data/credit/train.parquet@")
    assert f"models:/{NAME}/{scored['train']['model_version']}" in {
        node["id"] for node in data_file["nodes"]
    }

    code, out, _ = lineage_cli(
        capsys, scored["score"]["run_id"], "--root", str(scored["root"]), "--mermaid"
    )
    assert code == 0 and out.startswith("flowchart LR")
    assert "-->|scored_with|" in out and "-->|produced|" in out


def _events(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.strip()]


def _check_events(events: list[dict], scored: dict) -> None:
    train, score = scored["train"], scored["score"]
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        (f"{NAME}.train", "START"),
        (f"{NAME}.train", "COMPLETE"),
        (f"{NAME}.score", "START"),
        (f"{NAME}.score", "COMPLETE"),
    ]
    assert events[1]["run"]["runId"] == str(uuid.UUID(hex=train["run_id"]))
    assert events[1]["run"]["facets"]["stemma_mlflow_run"]["runId"] == train["run_id"]
    assert events[1]["run"]["facets"]["stemma_mlflow_run"]["_schemaURL"].startswith("urn:stemma")
    inputs = {d["name"]: d for d in events[1]["inputs"]}
    data = inputs[f"dvc:data.dvc@{scored['data_md5']}"]
    assert data["facets"]["stemma_dvc"]["md5"] == scored["data_md5"]
    assert data["facets"]["stemma_dvc"]["_producer"]
    assert data["facets"]["version"]["datasetVersion"] == f"md5:{scored['data_md5']}"
    (checked,) = [d for d in inputs.values() if "dataQualityAssertions" in d["inputFacets"]]
    assertions = [
        {k: v for k, v in a.items() if k != "params"}
        for a in checked["inputFacets"]["dataQualityAssertions"]["assertions"]
    ]
    assert checked["facets"]["stemma_node"]["kind"] == "data_file"
    assert len(assertions) == CHECKS and all(a["success"] for a in assertions)
    assert {
        "assertion": "expect_column_values_to_not_be_null",
        "success": True,
        "column": "salary",
    } in assertions
    (model,) = events[1]["outputs"]
    assert model["name"] == f"models:/{NAME}/{train['model_version']}"
    assert (
        model["facets"]["stemma_mlflow_model_version"]["weightsSha256"] == train["weights_sha256"]
    )
    # the model version links the two jobs: output of training, input of scoring
    assert model["name"] in {d["name"] for d in events[3]["inputs"]}
    (predictions,) = events[3]["outputs"]
    assert predictions["outputFacets"]["outputStatistics"]["rowCount"] == score["rows"]["scored"]


def test_openlineage_events_go_to_a_file(scored, capsys, tmp_path):
    target = tmp_path / "events.jsonl"
    code, _, err = lineage_cli(
        capsys,
        str(scored["root"] / "outputs" / "scores"),
        "--root",
        str(scored["root"]),
        "--openlineage",
        str(target),
    )
    assert code == 0, err
    assert "sent 4 OpenLineage events" in err
    _check_events(_events(target.read_text().splitlines()), scored)
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]  # no temporary left


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def receiver():
    """An OpenLineage receiver on 127.0.0.1 that records what is POSTed to it."""
    _Receiver.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Receiver.received
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "endpoint"), [("", "/api/v1/lineage"), ("/custom/in", "/custom/in")]
)
def test_openlineage_events_are_posted_to_a_receiver(scored, capsys, receiver, path, endpoint):
    url, received = receiver
    code, _, err = lineage_cli(
        capsys,
        str(scored["root"] / "outputs" / "scores" / "_SUCCESS"),
        "--root",
        str(scored["root"]),
        "--openlineage",
        url + path,
    )
    assert code == 0, err
    assert {where for where, _ in received} == {endpoint}
    _check_events([event for _, event in received], scored)


def test_an_unreachable_receiver_is_a_clear_error(scored, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    code, out, err = lineage_cli(
        capsys,
        f"models:/{NAME}@champion",
        "--root",
        str(scored["root"]),
        "--openlineage",
        f"http://127.0.0.1:{port}",
    )
    assert code == 6
    assert f"cannot send OpenLineage events to http://127.0.0.1:{port}/api/v1/lineage" in err
    assert "Traceback" not in err and out == ""
    assert time.perf_counter() - started < 30


def test_the_flows_materialize_prefect_assets_named_after_the_nodes(scored):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    model = lineage.asset_key(f"models:/{NAME}/{scored['train']['model_version']}")
    data = lineage.asset_key(f"dvc:data.dvc@{scored['data_md5']}")
    manifest = scored["root"] / "outputs" / "scores" / "_SUCCESS"
    predictions = lineage.asset_key(
        f"predictions:outputs/scores@{hashlib.sha256(manifest.read_bytes()).hexdigest()}"
    )
    wanted = {model, predictions}
    found: dict[str, dict] = {}
    deadline = time.monotonic() + 60  # the API persists events in batches
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline and set(found) != wanted:
            page = client.read_events(
                EventFilter(
                    event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                    resource=EventResourceFilter(id=sorted(wanted)),
                ),
                limit=50,
            )
            found = {event.resource.id: event for event in page.events}
            time.sleep(1)
    assert set(found) == wanted
    related = {r.id for r in found[model].related}
    assert data in related  # data version -> model version
    assert model in {r.id for r in found[predictions].related}  # model version -> predictions
    assert found[model].payload["node_id"] == f"models:/{NAME}/{scored['train']['model_version']}"
    assert found[model].resource.get("prefect.resource.name") == found[model].payload["node_id"]


def test_references_that_name_nothing_fail_with_the_accepted_forms(scored, capsys, stemma_exe):
    import os

    client = mlflow.MlflowClient()
    run = client.create_run(client.get_experiment_by_name("credit").experiment_id)
    client.set_terminated(run.info.run_id)
    by_hand = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    cases = [
        ("credit-model", "names nothing Stemma can trace"),
        ("0123456789abcdef0123456789abcdef", "no MLflow run with this id"),
        (f"models:/{NAME}/{by_hand.version}", "carries no lineage"),
    ]
    for reference, expected in cases:
        code, out, err = lineage_cli(capsys, reference, "--root", str(scored["root"]))
        assert code == 6, (reference, err)
        assert expected in err and "Traceback" not in err and out == ""
    assert "models:/<name>@<alias>" in lineage_cli(capsys, "x", "--root", str(scored["root"]))[2]

    # the console script itself, as a user runs it
    result = subprocess.run(
        [*stemma_exe, "lineage", "no-such-thing"],
        cwd=scored["root"],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 6
    assert "data.dvc@<git rev>" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [*stemma_exe, "lineage", f"models:/{NAME}@champion", "--full"],
        cwd=scored["root"],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"models:/{NAME}/{scored['train']['model_version']}  [model_version]" in result.stdout


def test_no_store_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code, _, err = lineage_cli(capsys, "models:/credit@champion", "--root", str(tmp_path))
    assert code == 6 and "no MLflow store at" in err
    assert not (tmp_path / ".stemma").exists()
