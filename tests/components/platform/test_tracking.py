"""Tracking helpers against a real MLflow on SQLite in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError, StemmaError
from stemma.components.platform.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    TRUNCATION_MARK,
    DVCDatasetSource,
    configure_tracking,
    dataset_digest,
    ensure_experiment,
    git_revision,
    local_artifact_root,
    log_dataset,
    log_epoch,
    log_metrics_batch,
    log_params_flat,
    run_page_url,
)

FILE_MD5 = "0f343b0931126a20f133d67c2b018a3b"
DIR_MD5 = "9c1a2a7a6e4b8f0f2c3d4e5f60718293.dir"


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "salary": [50_000.0, 72_500.5, 31_000.0],
            "elevel": [1, 3, 0],
            "car": ["a", "b", "a"],
            "approved": [1, 0, 1],
        }
    )


def test_configure_tracking_defaults_to_sqlite_under_the_project(tracking: str, tmp_path: Path):
    assert tracking == f"sqlite:///{tmp_path.resolve()}/.stemma/mlflow.db"
    assert mlflow.get_tracking_uri() == tracking
    assert mlflow.get_registry_uri() == tracking

    experiment_id = ensure_experiment("credit", tmp_path)

    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.artifact_location == (local_artifact_root(tmp_path) / "credit").as_uri()
    assert ensure_experiment("credit", tmp_path) == experiment_id


def test_an_experiment_describes_its_runs_and_how_to_find_the_training_runs(
    tracking: str, tmp_path: Path
):
    client = MlflowClient()
    experiment = client.get_experiment(ensure_experiment("credit", tmp_path))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    note = experiment.tags["mlflow.note.content"]
    assert "`credit`" in note and "train-<spec>-<time>" in note
    assert "tags.`stemma.flow` = 'train'" in note
    assert all(f"`{section}/`" in note for section in ("train", "val", "test", "drift", "shadow"))


def test_an_older_stemma_description_is_brought_up_to_date_and_a_hand_written_one_kept(
    tracking: str, tmp_path: Path
):
    client = MlflowClient()
    older = client.create_experiment(
        "older",
        tags={
            "mlflow.experimentKind": "custom_model_development",
            "mlflow.note.content": "Runs of the Stemma pipeline that writes to `older`: ...",
        },
    )
    by_hand = client.create_experiment("by-hand", tags={"mlflow.note.content": "Our team's runs"})

    assert ensure_experiment("older", tmp_path) == older
    assert ensure_experiment("by-hand", tmp_path) == by_hand

    assert "`train/`" in client.get_experiment(older).tags["mlflow.note.content"]
    kept = client.get_experiment(by_hand).tags
    assert kept["mlflow.note.content"] == "Our team's runs"
    assert kept["mlflow.experimentKind"] == "custom_model_development"


def test_configure_tracking_does_not_inherit_a_previous_local_store(tracking: str, tmp_path: Path):
    # mlflow.set_tracking_uri exported the first store into os.environ; a second project in
    # the same process must still get its own.
    other = tmp_path / "other"
    other.mkdir()

    assert os.environ["MLFLOW_TRACKING_URI"] == tracking
    assert configure_tracking(other) == f"sqlite:///{other.resolve()}/.stemma/mlflow.db"
    assert (other / ".stemma").is_dir()


def test_configure_tracking_uses_the_environment_uri(tracking: str, tmp_path: Path):
    server = f"sqlite:///{tmp_path / 'server.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = server

    assert configure_tracking(tmp_path / "project") == server
    assert mlflow.get_registry_uri() == server
    assert not (tmp_path / "project" / ".stemma").exists()


def test_a_derived_registry_is_not_left_in_the_environment(tracking: str, tmp_path: Path):
    # mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI; a registry that merely follows
    # the tracking store must not be inherited by the next store or a child process.
    first = f"sqlite:///{tmp_path / 'first.db'}"
    second = f"sqlite:///{tmp_path / 'second.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = first
    configure_tracking(tmp_path)
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    os.environ["MLFLOW_TRACKING_URI"] = second
    configure_tracking(tmp_path)
    assert mlflow.get_registry_uri() == second
    # A registry the user chose is kept, in MLflow and in the environment.
    chosen = f"sqlite:///{tmp_path / 'registry.db'}"
    os.environ["MLFLOW_REGISTRY_URI"] = chosen
    configure_tracking(tmp_path)
    assert mlflow.get_registry_uri() == os.environ["MLFLOW_REGISTRY_URI"] == chosen
    del os.environ["MLFLOW_REGISTRY_URI"]


def test_ensure_experiment_refuses_a_deleted_experiment(tracking: str, tmp_path: Path):
    experiment_id = ensure_experiment("credit", tmp_path)
    MlflowClient().delete_experiment(experiment_id)

    with pytest.raises(StemmaError, match=r"'credit' \(id \d+\) is deleted") as caught:
        ensure_experiment("credit", tmp_path)
    assert f"mlflow experiments restore --experiment-id {experiment_id}" in str(caught.value)


@pytest.mark.parametrize("md5", [FILE_MD5, DIR_MD5], ids=["file-md5", "dir-md5"])
def test_log_dataset_records_the_dvc_version(tracking, tmp_path, frame, md5):
    source = DVCDatasetSource(
        path="data/credit/train.parquet",
        dvc_file="data.dvc",
        md5=md5,
        file_md5=FILE_MD5,
        git_rev="a" * 40,
        repo=str(tmp_path),
    )
    with mlflow.start_run(experiment_id=ensure_experiment("credit", tmp_path)) as run:
        log_dataset(
            frame,
            name="credit-train",
            source=source,
            context="training",
            digest=md5,
            target="approved",
        )

    (dataset_input,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.source_type == "dvc"
    assert dataset.digest == md5  # 32 hex, or 36 with ".dir": both within MLflow's limit
    assert dataset.name == "credit-train"
    recorded = json.loads(dataset.source)
    assert recorded["path"] == "data/credit/train.parquet"
    assert recorded["md5"] == md5
    assert recorded["git_rev"] == "a" * 40
    assert recorded["dvc_file"] == "data.dvc"
    assert mlflow.data.get_source(dataset_input) == source
    assert json.loads(dataset.profile)["num_rows"] == 3
    columns = {c["name"]: c["type"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert columns == {"salary": "double", "elevel": "long", "car": "string", "approved": "long"}
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_dataset_digest_cuts_long_digests_to_mlflows_limit():
    sha256 = "ab" * 32

    assert dataset_digest(sha256) == sha256[:36]
    assert dataset_digest(DIR_MD5) == DIR_MD5


def test_dataset_source_loads_a_local_file_or_says_how_to_fetch_it(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("a\n1\n")
    present = DVCDatasetSource("data/train.csv", "data.dvc", FILE_MD5, repo=str(tmp_path))
    absent = DVCDatasetSource(
        "data/other.csv", "data.dvc", FILE_MD5, git_rev="abc123", repo="https://example.org/r.git"
    )

    assert present.load() == str(tmp_path / "data" / "train.csv")
    with pytest.raises(DataError, match=r"data/other.csv \(DVC version 0f34") as caught:
        absent.load()
    assert "dvc get https://example.org/r.git data/other.csv --rev abc123" in str(caught.value)


def test_log_params_flat_chunks_and_truncates(tracking, tmp_path):
    params = {f"section.key{i:03d}": str(i) for i in range(250)}
    params["data.features.numeric"] = "x" * (MAX_PARAM_VALUE_LENGTH + 500)

    with mlflow.start_run(experiment_id=ensure_experiment("credit", tmp_path)) as run:
        log_params_flat(params)

    logged = MlflowClient().get_run(run.info.run_id).data.params
    assert len(logged) == 251
    assert logged["section.key249"] == "249"
    long_value = logged["data.features.numeric"]
    assert len(long_value) == MAX_PARAM_VALUE_LENGTH
    assert long_value.endswith(TRUNCATION_MARK)


def test_log_epoch_builds_a_metric_history(tracking, tmp_path):
    rows = [
        {
            "epoch": epoch,
            "train_loss": 1.0 / (epoch + 1),
            "phase": "train",
            "best": epoch == 2,
            "note": None,
        }
        for epoch in range(3)
    ]
    with mlflow.start_run(experiment_id=ensure_experiment("credit", tmp_path)) as run:
        for row in rows:
            log_epoch(row, step=row["epoch"])

    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert set(client.get_run(run.info.run_id).data.metrics) == {"epoch", "train_loss"}


def test_log_metrics_batch_logs_more_than_one_batch(tracking, tmp_path):
    metrics = {f"m{i}": float(i) for i in range(1500)}
    with mlflow.start_run(experiment_id=ensure_experiment("credit", tmp_path)) as run:
        log_metrics_batch(metrics, step=4)

    logged = MlflowClient().get_run(run.info.run_id).data.metrics
    assert len(logged) == 1500
    assert logged["m1499"] == 1499.0


def test_logging_outside_a_run_is_refused(tracking):
    with pytest.raises(RuntimeError, match="log_metrics_batch must be called inside an active"):
        log_metrics_batch({"loss": 1.0})


def test_git_revision_outside_git(tmp_path: Path):
    assert git_revision(tmp_path) == (None, False)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_revision_reports_head_and_dirty_tree(tmp_path: Path):
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "data.dvc").write_text("outs: []\n")
    git("add", "data.dvc")
    git("commit", "-q", "-m", "data")
    head = git("rev-parse", "HEAD")
    (tmp_path / "untracked.txt").write_text("not part of the tree\n")

    assert git_revision(tmp_path) == (head, False)
    (tmp_path / "data.dvc").write_text("outs: [changed]\n")
    assert git_revision(tmp_path) == (head, True)


def test_a_run_page_link_carries_no_credentials():
    page = run_page_url("http://stemma:s3cret@127.0.0.1:5000/", "7", "abc")
    assert page == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    token = run_page_url("https://TOKEN@mlflow.example.com", "7")
    assert token == (
        "https://mlflow.example.com/#/experiments/7/runs?workflowType=machine_learning"
        "&searchFilter=tags.%60stemma.flow%60%20%3D%20%27train%27"
    )
    assert run_page_url("sqlite:///mlflow.db", "7") is None
