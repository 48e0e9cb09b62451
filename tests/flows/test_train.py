"""The training flow end to end, on a real Prefect API, MLflow store, DVC repo and GX suite."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from stemma.components.data.tables import dir_md5, file_md5
from stemma.components.errors import DataCheckError, DataError, DataVersionError, SpecError
from stemma.components.lineage import reproduce
from stemma.components.platform import metric_names
from stemma.components.registry.gate import recorded_decision

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

FAST = ["train.epochs=3", "train.early_stopping=null", "train.batch_size=256"]


def run_train(project: Path, name: str, *extra: str) -> dict:
    from stemma.flows.train import train_flow

    overrides = [*FAST, f"pipeline.name={name}", f"pipeline.model_name={name}", *extra]
    return train_flow(config=str(project / "configs" / "credit.yaml"), overrides=overrides)


def versions_of(name: str) -> list:
    client = mlflow.MlflowClient()
    return client.search_model_versions(f"name='{name}'")


def gate_record_of(version) -> dict:
    """The whole gate decision, as the version's training run logged it."""
    return recorded_decision(mlflow.MlflowClient(), version.run_id)


def aliases_of(name: str) -> dict[str, str]:
    try:
        model = mlflow.MlflowClient().get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return {}
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_train_tracks_registers_and_links_everything(project, tmp_path):
    summary = run_train(project, "e2e")
    client = mlflow.MlflowClient()

    # the first model that passes becomes the champion
    assert summary["gate"]["passed"] is True
    assert summary["gate"]["alias"] == "champion"
    assert aliases_of("e2e") == {"champion": summary["model_version"]}
    assert summary["metrics"]["roc_auc"] > 0.8

    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["data.features.categorical"] == "[elevel, car, zipcode]"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.metrics["test/roc_auc"] == pytest.approx(summary["metrics"]["roc_auc"])
    # every metric is in a section, so MLflow draws the losses apart from the bookkeeping
    assert set(run.data.metrics) == {
        *(f"test/{name}" for name in summary["metrics"]),
        "train/loss",
        "val/loss",
        "train/epoch_seconds",
        "train/samples_per_second",
        "train/seconds",
        "train/best_epoch",
        "train/epochs_run",
        "data/checks_evaluated",
        "data/checks_failed",
        "gate/passed",
        # the registered version's latency probe (registry/latency.py)
        *(f"latency/{p}_ms_b{rows}" for p in ("p50", "p95", "p99") for rows in (1, 64, 4096)),
        "latency/rows_per_s",
        "latency/cpu_s_per_million",
        "latency/cost_per_million",
    }
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2, 3]
    assert run.data.metrics["gate/passed"] == 1.0

    # the dataset input carries the DVC md5 and names the DVC path and git revision
    recorded = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert recorded == dir_md5(project / "data")[0]
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.source_type == "dvc"
    source = json.loads(dataset.source)
    assert source["md5"] == recorded
    assert source["path"] == "data/credit/train.parquet"
    assert source["git_rev"] == run.data.tags["stemma.git.rev"]
    assert recorded.startswith(dataset.digest.removesuffix(".dir")) or dataset.digest in recorded

    # artifacts: plots, checks, data docs, lineage, model without pickles
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    )
    for relative in (
        "plots/roc.png",
        "plots/precision_recall.png",
        "plots/confusion_matrix.png",
        "plots/training_history.png",
        "checks/validation_result.json",
        "checks/data_docs/index.html",
        "lineage/record.json",
        "lineage/graph.svg",
        "spec/resolved.yaml",
    ):
        assert (artifacts / relative).is_file(), relative
    # the lineage picture: the new version, the run that made it, its checks and data
    picture = (artifacts / "lineage/graph.svg").read_text()
    assert f"e2e v{summary['model_version']}</text>" in picture
    assert f"train run {run.info.run_id[:8]}" in picture
    assert "validation" in picture and "data version" in picture

    # lineage: data md5 -> validation -> run -> model version (weights hash), consistent everywhere
    record = json.loads((artifacts / "lineage/record.json").read_text())
    nodes = {node["kind"]: node for node in record["nodes"]}
    assert nodes["data_version"]["digest"] == f"md5:{recorded}"
    assert nodes["data_file"]["digest"] == f"md5:{file_md5(project / 'data/credit/train.parquet')}"
    validation = json.loads((artifacts / "checks/validation_result.json").read_text())
    assert validation["success"] is True
    assert nodes["validation"]["digest"].startswith("sha256:")
    assert nodes["validation"]["attributes"]["success"] is True
    model_version = client.get_model_version("e2e", summary["model_version"])
    # the version names its run by run_id; the checks' digest is in the run's record
    assert model_version.run_id == run.info.run_id
    assert model_version.tags["stemma.data.md5"] == recorded
    assert model_version.tags["stemma.gate.decision"] == "passed"
    assert not {"stemma.run_id", "stemma.checks.digest"} & set(model_version.tags)
    gate_record = json.loads((artifacts / "gate/decision.json").read_text())
    assert gate_record == record["decision"]
    weights = model_version.tags["stemma.weights.sha256"]
    assert nodes["model_version"]["digest"] == f"sha256:{weights}"
    assert nodes["model_version"]["id"] == f"models:/e2e/{summary['model_version']}"
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/e2e/{summary['model_version']}", dst_path=str(tmp_path / "m")
        )
    )
    weight_files = list(model_dir.rglob("*.safetensors"))
    assert len(weight_files) == 1
    assert hashlib.sha256(weight_files[0].read_bytes()).hexdigest() == weights
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle")]
    roc_digest = hashlib.sha256((artifacts / "plots/roc.png").read_bytes()).hexdigest()
    assert record["artifacts"]["plots/roc.png"] == f"sha256:{roc_digest}"
    assert "checks/data_docs/index.html" in record["artifacts"]
    assert {edge["relation"] for edge in record["edges"]} >= {
        "contains",
        "checked_by",
        "input_of",
        "gated",
        "produced",
    }

    # the run's description answers on the first screen: data, decision, what it made
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**train** · pipeline `e2e` · decision **passed**")
    assert "alias champion" in note
    assert all(f"- {reason}" in note for reason in summary["gate"]["reasons"])
    assert f"md5:{recorded[:8]}" in note and "path data" in note
    version = summary["model_version"]
    assert f"[e2e v{version}](#/models/e2e/versions/{version})" in note
    assert record["decision"]["decision"] == "passed"
    # the Prefect flow run carries the same summary, with the metrics and the MLflow run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run = run.data.tags["stemma.prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run]))
        )
    assert artifact.key == "train-summary" and artifact.type == "markdown"
    assert artifact.data.startswith("**train** · pipeline `e2e` · decision **passed**")
    assert "| test/roc_auc |" in artifact.data
    assert f"MLflow run `{run.info.run_id}`" in artifact.data  # no server: no link to follow

    # the experiment opens on its runs (model training), not on MLflow's GenAI overview,
    # and its description says how to list the training runs
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "tags.`stemma.flow` = 'train'" in experiment.tags["mlflow.note.content"]
    assert run.info.run_name.startswith("train-credit-")

    # the logged model predicts on raw rows in a fresh process, with pickle loading disabled
    batch = project / "data" / "credit" / "batches" / "day_01.parquet"
    probe = textwrap.dedent(
        f"""
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({os.environ["MLFLOW_TRACKING_URI"]!r})
        model = mlflow.pyfunc.load_model("models:/e2e@champion")
        out = model.predict(pd.read_parquet({str(batch)!r}))
        print(len(out), sorted(out.columns), float(out["score"].min()), float(out["score"].max()))
        """
    )
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split(maxsplit=1)[0] == "500"
    assert "['prediction', 'score']" in result.stdout
    scores = [float(x) for x in result.stdout.strip().rsplit(maxsplit=2)[-2:]]
    assert 0.0 <= scores[0] <= scores[1] <= 1.0


def test_second_model_is_challenger_and_a_worse_one_gets_no_alias(project):
    first = run_train(project, "gated")
    second = run_train(project, "gated")
    assert second["gate"]["alias"] == "challenger"
    assert second["gate"]["champion_version"] == first["model_version"]
    # same seed, same data: the champion re-scored on the same rows gives the same number
    assert second["gate"]["champion_value"] == pytest.approx(first["metrics"]["roc_auc"])

    third = run_train(project, "gated", "gate.margin_over_champion=0.5")
    assert third["gate"]["passed"] is False
    assert third["gate"]["alias"] is None
    assert aliases_of("gated") == {
        "champion": first["model_version"],
        "challenger": second["model_version"],
    }
    version = mlflow.MlflowClient().get_model_version("gated", third["model_version"])
    assert version.tags["stemma.gate.decision"] == "failed"
    assert "margin" in version.description  # the reasons, and on the run's gate record
    assert any("margin" in reason for reason in gate_record_of(version)["reasons"])
    assert not version.aliases


#: The flat names a Stemma older than the metric sections logged, by today's names (their
#: test metrics were ``test_<metric>``; ``train/seconds`` did not exist).
FLAT_TRAINING_NAMES = {
    "train/loss": "train_loss",
    "val/loss": "val_loss",
    "train/epoch_seconds": "seconds",
    "train/samples_per_second": "samples_per_second",
    "train/best_epoch": "best_epoch",
    "train/epochs_run": "epochs_run",
    "data/checks_evaluated": "checks_evaluated",
    "data/checks_failed": "checks_failed",
    "gate/passed": "gate_passed",
}


def _as_an_older_stemma_logged_it(tracking_uri: str, run_id: str) -> None:
    """Rename a run's metrics in the SQLite store to the flat names an older Stemma wrote."""
    with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as store:
        for table in ("metrics", "latest_metrics"):
            where = "WHERE run_uuid = ? AND key = ?"
            store.execute(f"DELETE FROM {table} {where}", (run_id, "train/seconds"))
            # an older Stemma did not time the version it registered
            store.execute(
                f"DELETE FROM {table} WHERE run_uuid = ? AND key LIKE 'latency/%'", (run_id,)
            )
            for name, flat in FLAT_TRAINING_NAMES.items():
                store.execute(f"UPDATE {table} SET key = ? {where}", (flat, run_id, name))
            store.execute(
                f"UPDATE {table} SET key = 'test_' || substr(key, 6) "
                "WHERE run_uuid = ? AND key LIKE 'test/%'",
                (run_id,),
            )


def test_a_champion_an_older_stemma_logged_is_still_judged_and_compared(project, mlflow_uri):
    first = run_train(project, "flat")
    _as_an_older_stemma_logged_it(mlflow_uri, first["run_id"])
    client = mlflow.MlflowClient()
    flat = client.get_run(first["run_id"]).data.metrics
    assert "test_roc_auc" in flat and not [name for name in flat if "/" in name]
    recorded_auc = metric_names.read_metric(flat, "test/roc_auc")
    assert recorded_auc == pytest.approx(first["metrics"]["roc_auc"])
    assert metric_names.read_metric(flat, metric_names.TRAIN_BEST_EPOCH) == flat["best_epoch"]

    # the gate judges the new model against the old champion, on the same rows
    second = run_train(project, "flat")
    assert second["gate"]["champion_version"] == first["model_version"]
    assert second["gate"]["champion_value"] == pytest.approx(recorded_auc)
    assert second["gate"]["alias"] == "challenger"
    # a rebuild's sectioned metrics compare with the champion's flat ones, name by name
    recorded = reproduce.plan_reproduction(client, "models:/flat@champion").metrics
    rebuilt = reproduce.plan_reproduction(client, f"models:/flat/{second['model_version']}")
    assert {"test/roc_auc", "train/best_epoch", "train/epochs_run"} <= set(recorded)
    assert reproduce.compare_metrics(recorded, rebuilt.metrics) == (len(recorded), [])


def test_first_model_below_minimum_is_registered_without_alias(project):
    summary = run_train(project, "too-low", "gate.minimum=0.999")
    assert summary["gate"]["passed"] is False
    assert aliases_of("too-low") == {}
    (version,) = versions_of("too-low")
    assert any("minimum 0.999" in reason for reason in gate_record_of(version)["reasons"])


def test_training_is_deterministic(project):
    first = run_train(project, "det-a")
    second = run_train(project, "det-b")
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["metrics"] == second["metrics"]


def _nan_salary(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[:3], "salary"] = np.nan
    return frame


def _inf_loan(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[5], "loan"] = np.inf
    return frame


def _old_applicants(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[:42], "age"] = 150
    return frame


BAD_DATA = [
    (lambda f: f.drop(columns=["loan"]), DataError, "loan"),
    (lambda f: f.assign(salary=f["salary"].astype(str)), DataError, "salary"),
    (lambda f: f.iloc[:0], DataError, "no rows"),
    (lambda f: f.assign(approved=1), DataError, "one class"),
    (_nan_salary, DataError, "salary"),
    (_inf_loan, DataError, "loan"),
    (_old_applicants, DataCheckError, "expect_column_values_to_be_between"),
]


@pytest.mark.parametrize(
    ("change", "error", "expected"),
    BAD_DATA,
    ids=["missing-column", "wrong-type", "empty", "one-class", "nan", "inf", "failing-expectation"],
)
def test_bad_data_stops_before_training_and_registers_nothing(
    project, rewrite_data, change, error, expected
):
    rewrite_data(change)
    name = f"bad-{error.__name__}-{expected}".replace(" ", "-").lower()[:60]
    with pytest.raises(error) as caught:
        run_train(project, name)
    assert expected in caught.value.render()
    assert versions_of(name) == []
    runs = mlflow.search_runs(
        experiment_names=["credit"],
        filter_string=f"tags.`stemma.pipeline` = '{name}'",
        output_format="list",
    )
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert "stemma.error" in runs[0].data.tags


def test_failing_expectation_reports_rows_and_logs_the_result(project, rewrite_data, tmp_path):
    rewrite_data(_old_applicants)
    with pytest.raises(DataCheckError) as caught:
        run_train(project, "gx-fail")
    text = caught.value.render()
    assert "42 of" in text and "150" in text  # rows and an example value
    assert len(text.splitlines()) < 30  # one screen
    (run,) = mlflow.search_runs(
        experiment_names=["credit"],
        filter_string="tags.`stemma.pipeline` = 'gx-fail'",
        output_format="list",
    )
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path))
    )
    assert json.loads((artifacts / "checks/validation_result.json").read_text())["success"] is False
    assert (artifacts / "checks/data_docs/index.html").is_file()
    assert "expectations failed" in run.data.tags["stemma.error"]
    assert not (artifacts / "model").exists()


def test_data_that_differs_from_its_dvc_md5_is_refused(project):
    path = project / "data" / "credit" / "train.parquet"
    frame = pd.read_parquet(path)
    frame.loc[frame.index[0], "salary"] += 1.0
    frame.to_parquet(path)  # changed without `dvc add`
    with pytest.raises(DataVersionError) as caught:
        run_train(project, "tampered")
    text = caught.value.render()
    assert "data.dvc" in text and "train.parquet" in text and "dvc checkout" in text
    assert versions_of("tampered") == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.architecture=no_such_pkg.nets:Net", "cannot import module 'no_such_pkg.nets'"),
        ("train.epochs=0", "train.epochs: must be greater than 0"),
        ("train.optimiser=adam", "train.optimiser: unknown key"),
    ],
    ids=["model-class-import", "out-of-range", "typo"],
)
def test_bad_spec_fails_the_flow_before_anything_runs(project, override, expected):
    with pytest.raises(SpecError) as caught:
        run_train(project, "bad-spec", override)
    assert expected in caught.value.render()
    assert versions_of("bad-spec") == []


def test_resume_logs_the_epoch_metrics_a_kill_cut_off(project, monkeypatch):
    """Killed after epoch 2's checkpoint but before its metrics reached MLflow."""
    from stemma.components.platform import tracking

    real_log_epoch = tracking.log_epoch

    def interrupted_at_epoch_2(row, step):
        if step == 2:
            raise KeyboardInterrupt
        real_log_epoch(row, step)

    monkeypatch.setattr(tracking, "log_epoch", interrupted_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_train(project, "gap")
    monkeypatch.setattr(tracking, "log_epoch", real_log_epoch)

    summary = run_train(project, "gap")
    assert summary["resumed"] is True
    history = mlflow.MlflowClient().get_metric_history(summary["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
