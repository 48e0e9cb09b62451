"""The continuous-training flow on a real project: DVC, git, MLflow and Prefect."""

from __future__ import annotations

import subprocess
import threading

import pandas as pd
import pytest
import yaml

from stemma.components.errors import DataError
from stemma.components.platform.lineage import RECORD_ARTIFACT
from stemma.flows.retrain import (
    ALREADY_RUNNING,
    NO_NEW_DATA,
    RetrainError,
    pipeline_lock,
    retrain_flow,
)
from stemma.flows.train import train_flow
from tests.support import git

# A negative margin lets the retrained model pass its gate whatever the noise of two
# epochs, so the flow goes on to the shadow evaluation.
FAST = ["train.epochs=2", "retrain.min_new_rows=100", "gate.margin_over_champion=-0.5"]


def _pointer_md5(project) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def _with_retrain_section(project) -> None:
    path = project / "configs" / "credit.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["retrain"] = {"labels": "data/credit/labels", "min_new_rows": 1000}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    git(project, "commit", "-qam", "retrain section")


def _assert_times_run_forward(reference: str, project) -> None:
    """Upstream of ``reference``, nothing was made after a run that read it began: the
    data version a retraining run committed is dated by its commit, not by the end of the
    retraining run (which ends after the training run that read it)."""
    from datetime import datetime

    import mlflow

    from stemma.components.lineage.graph import UPSTREAM, walk
    from stemma.components.lineage.index import RecordIndex

    graph = walk(reference, RecordIndex(mlflow.MlflowClient()), root=project, direction=UPSTREAM)
    runs = {node.id: node for node in graph.nodes.values() if node.kind == "run"}
    checked = 0
    for edge in graph.edges:
        source, reader = graph.nodes[edge.source], runs.get(edge.target)
        if reader is None or not source.created or not reader.created:
            continue
        made = datetime.fromisoformat(source.created)
        began = datetime.fromisoformat(reader.created)
        assert made <= began, (
            f"{source.id} ({source.kind}) made {made}, read by a run begun {began}"
        )
        checked += source.kind == "data_version"
    assert checked, "no data version was read by a run of the graph"


@pytest.fixture
def retrain_project(project, prefect_api, mlflow_uri, monkeypatch):
    _with_retrain_section(project)
    monkeypatch.chdir(project)
    train_flow(config="configs/credit.yaml", overrides=["train.epochs=2"])
    return project


def test_retrain_adds_labelled_rows_as_a_new_committed_data_version(retrain_project):
    project = retrain_project
    before_md5 = _pointer_md5(project)
    before_rows = len(pd.read_parquet(project / "data/credit/train.parquet"))
    commits_before = git(project, "rev-list", "--count", "HEAD")

    result = retrain_flow(config="configs/credit.yaml", overrides=FAST)

    # Day 1 is ingested, day 2 (the newest labelled batch) is held out for the shadow.
    assert result["new_rows"] == 500
    after = pd.read_parquet(project / "data/credit/train.parquet")
    assert len(after) == before_rows + 500
    assert after["application_id"].is_unique
    day1 = pd.read_parquet(project / "data/credit/batches/day_01.parquet")
    assert set(day1["application_id"]) <= set(after["application_id"])
    day2 = pd.read_parquet(project / "data/credit/batches/day_02.parquet")
    assert not set(day2["application_id"]) & set(after["application_id"])

    assert _pointer_md5(project) == result["data_md5"] != before_md5
    assert int(git(project, "rev-list", "--count", "HEAD")) == int(commits_before) + 1
    assert "data.dvc" in git(project, "show", "--name-only", "--format=", "HEAD")
    # The previous version stays restorable: its listing is in DVC's cache.
    old = before_md5.removesuffix(".dir")
    assert (project / ".dvc/cache/files/md5" / old[:2] / f"{old[2:]}.dir").exists()

    assert result["outcome"] in {"promoted", "not_promoted"}
    assert result["shadow"]["decision"] in {"promote", "reject", "wait"}

    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(result["run_id"])
    assert run.data.tags["stemma.retrain.outcome"] == result["outcome"]
    assert run.data.tags["stemma.data.md5"] == result["data_md5"]
    version = client.get_model_version("credit", result["model_version"])
    # the version's training run is the retraining's child (below); no retrain tag on it
    assert "stemma.retrain.run_id" not in version.tags
    record = mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/{RECORD_ARTIFACT}")
    kinds = {node["kind"] for node in record["nodes"]}
    assert {"data_version", "model_version", "run"} <= kinds
    # MLflow's runs table nests the training, shadow (and any promotion) runs under it
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    flows = {child.data.tags.get("stemma.flow") for child in children}
    assert {"train", "shadow"} <= flows, flows
    assert version.run_id in {child.info.run_id for child in children}
    if result["outcome"] == "promoted":
        assert "promote" in flows
    _assert_times_run_forward(f"models:/credit/{result['model_version']}", project)

    # Nothing twice: the same labels again add nothing and leave the data alone.
    state = retrain_flow(config="configs/credit.yaml", overrides=FAST, return_state=True)
    again = state.result()
    assert again["outcome"] == NO_NEW_DATA
    # the run that did nothing says so where the Prefect UI shows its final state
    assert state.is_completed() and state.message.startswith("nothing to do: ")
    assert again["summary"] in state.message
    assert "fewer than retrain.min_new_rows" in again["summary"]
    assert _pointer_md5(project) == result["data_md5"]


def test_drift_report_is_recorded_as_the_cause(retrain_project):
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("credit")
    report = client.create_run(
        experiment.experiment_id,
        tags={
            "stemma.flow": "monitor",
            "stemma.input.path": "data/credit/batches/day_02.parquet",
            "stemma.input.digest": "0123abcd",
        },
    )
    result = retrain_flow(config="configs/credit.yaml", overrides=FAST, cause=report.info.run_id)
    assert result["cause"]["kind"] == "drift_report"
    version = client.get_model_version("credit", result["model_version"])
    # the version leads to the cause through its training run, the retraining run's child
    training = client.get_run(version.run_id)
    assert training.data.tags["mlflow.parentRunId"] == result["run_id"]
    cause = client.get_run(result["run_id"]).data.tags
    assert cause["stemma.cause.run_id"] == report.info.run_id
    assert not any(key.startswith("stemma.cause.") for key in version.tags)
    record = mlflow.artifacts.load_dict(f"runs:/{result['run_id']}/{RECORD_ARTIFACT}")
    reports = [node for node in record["nodes"] if node["kind"] == "drift_report"]
    assert len(reports) == 1
    # the batch the report judged is in the record, not in a tag
    assert reports[0]["attributes"]["batch"] == "data/credit/batches/day_02.parquet"
    assert not {"stemma.cause.batch", "stemma.cause.features"} & set(cause)
    # a retraining a drift report started stays within the documented handful of tags
    from stemma.components.platform import tags as tag_names

    own = {key for key in cause if not key.startswith("mlflow.")}
    assert len(own) <= tag_names.MAX_TAGS, sorted(own)
    assert own <= {*tag_names.COMMON_RUN_TAGS, *tag_names.RUN_TAGS["retrain"]}, sorted(own)
    assert any(
        edge["source"] == reports[0]["id"] and edge["relation"] == "caused"
        for edge in record["edges"]
    )


def test_a_second_retrain_while_one_runs_does_nothing(retrain_project):
    md5 = _pointer_md5(retrain_project)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with pipeline_lock(retrain_project, "credit") as acquired:
            assert acquired
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        result = retrain_flow(config="configs/credit.yaml", overrides=FAST)
    finally:
        release.set()
        holder.join()
    assert result["outcome"] == ALREADY_RUNNING
    assert _pointer_md5(retrain_project) == md5


def test_broken_labels_and_unknown_cause_fail_clearly_and_change_nothing(retrain_project):
    md5 = _pointer_md5(retrain_project)
    broken = retrain_project / "incoming" / "labels"
    broken.mkdir(parents=True)
    source = retrain_project / "data/credit/labels/day_01.parquet"
    pd.read_parquet(source).rename(columns={"application_id": "id"}).to_parquet(
        broken / "day_01.parquet"
    )
    with pytest.raises(DataError, match="lack column"):
        retrain_flow(config="configs/credit.yaml", overrides=FAST, labels=str(broken))
    assert _pointer_md5(retrain_project) == md5
    with pytest.raises(RetrainError, match="not an MLflow run"):
        retrain_flow(config="configs/credit.yaml", overrides=FAST, cause="no-such-run")


def test_retrain_command_reports_no_new_data(retrain_project, stemma_exe):
    import os

    result = subprocess.run(
        [
            *stemma_exe,
            "run",
            "retrain",
            "configs/credit.yaml",
            "--set",
            "retrain.min_new_rows=100000",
        ],
        cwd=retrain_project,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "no retraining" in result.stdout and "fewer than retrain.min_new_rows" in result.stdout


def test_retrain_takes_the_endpoint_log_and_the_labels_it_received(retrain_project):
    import mlflow

    from stemma.components.data.prediction_log import day_parts, folder_digest
    from stemma.components.platform.lineage import input_node_id, read_run_record, run_node_id
    from tests.support import write_log_part

    project = retrain_project
    log = project / "logs" / "endpoint"
    batches, labelled = project / "data/credit/batches", project / "data/credit/labels"
    first = pd.read_parquet(batches / "day_01.parquet").drop(columns=["applied_at"])
    second = pd.read_parquet(batches / "day_02.parquet").drop(columns=["applied_at"])
    # day 1's applications, 50 of them scored twice; day 2's the next day
    write_log_part(log, "predictions", first.iloc[:300], at="2025-06-01 10:00")
    write_log_part(log, "predictions", first.iloc[250:], at="2025-06-01 12:00")
    write_log_part(log, "predictions", second, at="2025-06-02 09:00")
    truth = pd.concat(
        [pd.read_parquet(labelled / "day_01.parquet"), pd.read_parquet(labelled / "day_02.parquet")]
    )
    wrong = truth.head(10).assign(approved=lambda frame: 1 - frame["approved"])
    write_log_part(log, "labels", wrong, at="2025-06-02 08:00")
    write_log_part(log, "labels", truth, at="2025-06-03 08:00")  # corrections come later
    before_rows = len(pd.read_parquet(project / "data/credit/train.parquet"))

    result = retrain_flow(
        config="configs/credit.yaml",
        overrides=FAST,
        batches=str(log / "predictions"),
        labels=str(log / "labels"),
    )

    # day 1 is ingested once per id, with its latest labels; day 2 is held out for the shadow
    assert result["new_rows"] == 500
    after = pd.read_parquet(project / "data/credit/train.parquet")
    assert len(after) == before_rows + 500 and after["application_id"].is_unique
    new = after.tail(500).merge(truth, on="application_id", suffixes=("", "_label"))
    assert (new["approved"] == new["approved_label"]).all()
    assert new["applied_at"].isna().all()  # the log holds the model's inputs and the id
    assert not set(second["application_id"]) & set(after["application_id"])
    assert result["shadow"]["decision"] in {"promote", "reject", "wait"}

    # the run read the day folder: an input node with the digest the monitor records
    day = log / "predictions" / "2025-06-01"
    digest, _ = folder_digest(day, day_parts(day))
    assert result["inputs"] == {str(day): digest}
    record = read_run_record(mlflow.MlflowClient(), result["run_id"])
    node = input_node_id("logs/endpoint/predictions/2025-06-01", digest)
    (batch,) = [item for item in record.nodes if item.id == node]
    assert batch.digest == f"md5:{digest}" and batch.attributes["role"] == "batch"
    run = run_node_id(result["run_id"])
    assert any(e.source == node and e.target == run for e in record.edges)
    (retrain_node,) = [item for item in record.nodes if item.id == run]
    assert retrain_node.attributes["holdout"] == "logs/endpoint/predictions/2025-06-02"
    (version_node,) = [
        item
        for item in record.nodes
        if item.kind == "data_version" and item.digest.endswith(result["data_md5"])
    ]
    assert version_node.attributes["sources"] == {"2025-06-01": 500}
