"""The drift-monitoring flow end to end: a briefly trained model, the example's daily batches,
a real MLflow store and a real Prefect API that the drift event must reach."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from stemma.components.errors import DataError, SpecError
from stemma.components.monitoring.profile import (
    PROFILE_FILE,
    PROFILE_SHA256_TAG,
    MissingProfileError,
    read_profile,
)
from stemma.components.monitoring.records import DRIFT_EVENT
from stemma.components.platform import lineage
from stemma.components.spec import load_spec
from stemma.examples.credit import generate_credit_data
from tests.support import SMALL_TRAIN_ROWS

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

PIPELINE = "monitoring"
NAMES = [f"pipeline.name={PIPELINE}", f"pipeline.model_name={PIPELINE}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]
#: Rows per generated day: enough for the tests to have power, few enough to stay fast.
BATCH_ROWS = 1_000
#: The example's shifts: the population from day 6, the approval rule from day 10.
DAYS = 10
#: How long the Prefect API may take to show an emitted event.
EVENT_WAIT_S = 60


@pytest.fixture(scope="module")
def monitored_project(template_project, tmp_path_factory) -> Path:
    """A project whose model `monitoring` has a champion, and ten days of batches and labels.

    The days come from the worked example's generator with the template's seed and
    training size, so day 1 is drawn like the training table and day 6 on is shifted.
    """
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("monitoring") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(config=str(root / "configs" / "credit.yaml"), overrides=[*TRAIN, *NAMES])
    generate_credit_data(
        root / "production", train_rows=SMALL_TRAIN_ROWS, days=DAYS, batch_rows=BATCH_ROWS
    )
    return root


def day(project: Path, number: int, kind: str = "batches") -> str:
    return str(project / "production" / "credit" / kind / f"day_{number:02d}.parquet")


def run_monitor(
    project: Path, *overrides: str, names=NAMES, config_name="credit.yaml", **parameters
) -> dict:
    from stemma.flows.monitor import monitor_flow

    return monitor_flow(
        config=str(project / "configs" / config_name),
        overrides=[*names, *overrides],
        **parameters,
    )


def drift_events(pipeline: str, expected: int) -> list:
    """The drift events about the pipeline, once at least ``expected`` have arrived."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + EVENT_WAIT_S
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=[DRIFT_EVENT]),
                    resource=EventResourceFilter(id=[f"stemma.pipeline.{pipeline}"]),
                ),
                limit=50,
            )
        if len(page.events) >= expected or time.monotonic() > deadline:
            return page.events
        time.sleep(0.5)


def download(run_id: str, tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / run_id)))


def test_training_saves_the_reference_profile_with_the_model(monitored_project, tmp_path):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(PIPELINE, "champion")
    recorded = version.tags[PROFILE_SHA256_TAG]

    # in the version's own artifacts, and as an artifact of the training run, same bytes
    model_folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(PIPELINE, version.version),
            dst_path=str(tmp_path / "model"),
        )
    )
    run_copy = download(version.run_id, tmp_path) / "profile" / PROFILE_FILE
    for path in (model_folder / PROFILE_FILE, run_copy):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded
    profile = read_profile(run_copy, recorded)

    train = pd.read_parquet(monitored_project / "data" / "credit" / "train.parquet")
    assert set(profile.features) == {
        "salary",
        "commission",
        "age",
        "hvalue",
        "hyears",
        "loan",
        "elevel",
        "car",
        "zipcode",
    }
    age = profile.features["age"]
    assert age.rows == len(train) and sum(age.counts) == len(train)
    # a training table smaller than the sample size is kept whole: KS is exact against it
    assert age.sample.tolist() == sorted(train["age"].astype(float))
    assert profile.label_rate == pytest.approx(train["approved"].mean())
    run = client.get_run(version.run_id)
    assert profile.performance["roc_auc"] == pytest.approx(run.data.metrics["test/roc_auc"])
    assert profile.scores is not None and profile.scores.rows == int(run.data.params["rows.test"])
    record = json.loads(
        (download(version.run_id, tmp_path / "again") / "lineage" / "record.json").read_text()
    )
    assert record["artifacts"][f"profile/{PROFILE_FILE}"] == f"sha256:{recorded}"


def test_day_one_is_quiet_and_day_six_drifts_with_an_event_on_the_prefect_api(
    monitored_project, tmp_path
):
    quiet = run_monitor(monitored_project, batch=day(monitored_project, 1))
    assert quiet["drift_detected"] is False, quiet["reasons"]
    assert quiet["drifted_features"] == [] and quiet["event_id"] is None
    assert quiet["rows"] == BATCH_ROWS

    shifted = run_monitor(monitored_project, batch=day(monitored_project, 6))
    assert shifted["drift_detected"] is True
    # the generator shifts age, salary and loan from day 6; nothing else changes
    assert {"age", "salary", "loan"} <= set(shifted["drifted_features"])
    assert not {"car", "zipcode", "elevel", "hyears"} & set(shifted["drifted_features"])
    assert "features" in shifted["kinds"]
    assert shifted["columns"]["age"]["ks_pvalue"] < 1e-6
    assert shifted["columns"]["age"]["psi"] > 0.2

    # exactly one event about the pipeline reached Prefect: day 6's, not day 1's
    (event,) = drift_events(PIPELINE, expected=1)
    assert str(event.id) == shifted["event_id"]
    assert event.resource.id == f"stemma.pipeline.{PIPELINE}"
    payload = event.payload
    assert payload["report_run_id"] == shifted["run_id"]
    assert payload["batch_digest"] == shifted["batch_digest"]
    assert payload["batch"].endswith("day_06.parquet")
    assert payload["drifted_features"] == shifted["drifted_features"]
    assert payload["statistics"]["age"]["psi"] == pytest.approx(shifted["columns"]["age"]["psi"])
    assert payload["model"] == f"models:/{PIPELINE}/{shifted['model_version']}"
    related = {resource.id: resource for resource in event.related}
    model_resource = related[f"stemma.model-version.{PIPELINE}.{shifted['model_version']}"]
    assert model_resource.role == "model-version"

    # the report: an MLflow run of the pipeline's experiment, tagged, with its statistics
    client = mlflow.MlflowClient()
    run = client.get_run(shifted["run_id"])
    assert run.info.run_name == "monitor day_06"
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == shifted["experiment"] == "credit"
    assert run.data.tags["stemma.drift.detected"] == "true"
    report = lineage.record_node(lineage.read_run_record(client, shifted["run_id"]), "drift_report")
    assert report["attributes"]["drifted_features"] == shifted["drifted_features"]
    assert run.data.tags["stemma.drift.event_id"] == shifted["event_id"]
    assert run.data.metrics["drift/feature.age.psi"] == pytest.approx(
        shifted["columns"]["age"]["psi"]
    )
    assert run.data.metrics["drift/features_drifted"] == len(shifted["drifted_features"])
    assert client.get_run(quiet["run_id"]).data.tags["stemma.drift.detected"] == "false"
    # the run page links the batch (its own dataset input) and the model version it monitored
    (batch,) = run.inputs.dataset_inputs
    assert "day_06" in batch.dataset.source
    (model,) = run.inputs.model_inputs
    version = client.get_model_version(PIPELINE, shifted["model_version"])
    assert client.get_logged_model(model.model_id).source_run_id == version.run_id

    artifacts = download(shifted["run_id"], tmp_path)
    table = pd.read_csv(artifacts / "drift" / "statistics.csv").set_index("column")
    assert table.loc["age", "drifted"] and not table.loc["car", "drifted"]
    assert (artifacts / "drift" / "statistics.json").is_file()
    assert (artifacts / "drift" / "summary.png").stat().st_size > 10_000
    report = json.loads((artifacts / "drift" / "report.json").read_text())
    assert report["detected"] is True

    # the lineage record: the drift report is a node linked to the batch and the model version
    record = json.loads((artifacts / "lineage" / "record.json").read_text())
    nodes = {node["id"]: node for node in record["nodes"]}
    (report_node,) = [node for node in record["nodes"] if node["kind"] == "drift_report"]
    report_sha = hashlib.sha256((artifacts / "drift" / "report.json").read_bytes()).hexdigest()
    assert report_node["digest"] == f"sha256:{report_sha}"
    monitored = {edge["source"] for edge in record["edges"] if edge["target"] == report_node["id"]}
    batch_node = next(nodes[source] for source in monitored if nodes[source]["kind"] == "input")
    assert batch_node["digest"] == f"md5:{shifted['batch_digest']}"
    assert f"models:/{PIPELINE}/{shifted['model_version']}" in monitored


def test_labels_show_performance_decay_only_after_the_concept_shift(monitored_project):
    before = run_monitor(
        monitored_project,
        batch=day(monitored_project, 2),
        labels=day(monitored_project, 2, "labels"),
    )
    assert before["labelled_rows"] == BATCH_ROWS
    assert before["drift_detected"] is False, before["reasons"]
    assert before["performance"]["current"] > 0.8

    after = run_monitor(
        monitored_project,
        batch=day(monitored_project, 10),
        labels=day(monitored_project, 10, "labels"),
    )
    performance = after["performance"]
    assert performance["decayed"] is True
    assert performance["drop"] >= 0.05
    assert performance["current"] < 0.7 < performance["reference"]
    assert "performance" in after["kinds"] and "label" in after["columns"]


def test_thresholds_decide_drift(monitored_project):
    lenient = [
        "monitor.thresholds.psi=10",
        "monitor.thresholds.ks_pvalue=1e-300",
        "monitor.thresholds.chi2_pvalue=1e-300",
    ]
    summary = run_monitor(monitored_project, *lenient, batch=day(monitored_project, 6))
    assert summary["drift_detected"] is False
    assert summary["event_id"] is None
    # the statistics are the same; only the verdict changed
    assert summary["columns"]["age"]["psi"] > 0.2


def test_a_batch_under_the_minimum_sends_no_event_and_its_report_says_why(
    monitored_project, tmp_path
):
    small = monitored_project / "day_06_first_33.parquet"
    pd.read_parquet(day(monitored_project, 6)).head(33).to_parquet(small)
    summary = run_monitor(monitored_project, batch=str(small))
    # shifted rows, but 33 of them: under monitor.min_rows (default 100), no verdict
    assert summary["rows"] == 33
    assert summary["drift_detected"] is False and summary["event_id"] is None
    why = "the batch has 33 rows, fewer than monitor.min_rows (100): drift not assessed"
    assert summary["summary"] == why and summary["reasons"] == [why]
    report = json.loads((download(summary["run_id"], tmp_path) / "drift/report.json").read_text())
    assert report["assessed"] is False and report["reasons"] == [why]
    tags = mlflow.MlflowClient().get_run(summary["run_id"]).data.tags
    assert tags["stemma.drift.detected"] == "false" and "stemma.drift.event_id" not in tags


def test_an_unshifted_batch_of_33_rows_judged_anyway_is_not_drift(monitored_project):
    small = monitored_project / "day_01_first_33.parquet"
    pd.read_parquet(day(monitored_project, 1)).head(33).to_parquet(small)
    summary = run_monitor(monitored_project, "monitor.min_rows=1", batch=str(small))
    assert summary["drift_detected"] is False, summary["reasons"]
    assert summary["event_id"] is None
    # the tests ran, on the features and the scores; PSI was not, and the report says why
    prediction = summary["columns"]["prediction"]
    assert prediction["ks_pvalue"] > 0 and "psi" not in prediction
    assert "psi" not in summary["columns"]["age"] and summary["columns"]["age"]["ks_pvalue"] > 0
    (line,) = [line for line in summary["reasons"] if line.startswith("psi not assessed for ")]
    assert "age" in line and "prediction" in line and "monitor.psi_min_expected" in line


def test_a_psi_threshold_without_psi_is_a_spec_error(monitored_project):
    with pytest.raises(SpecError) as caught:
        run_monitor(
            monitored_project,
            "monitor.statistics={numeric: [ks], categorical: [chi2]}",
            "monitor.thresholds.psi=0.2",
            batch=day(monitored_project, 1),
        )
    assert "monitor.thresholds.psi: PSI is not among monitor.statistics" in caught.value.render()


WINE = "wine-monitoring"


@pytest.fixture(scope="module")
def wine_project(tmp_path_factory) -> Path:
    """A multiclass project (sklearn's wine, cultivars named) whose model `wine-monitoring`
    has a champion."""
    from stemma.flows.train import train_flow
    from tests.support import build_multiclass_project

    root = build_multiclass_project(tmp_path_factory.mktemp("wine") / "project")
    train_flow(config=str(root / "configs" / "wine.yaml"), overrides=wine_names())
    return root


def wine_names() -> list[str]:
    return [f"pipeline.name={WINE}", f"pipeline.model_name={WINE}", f"pipeline.experiment={WINE}"]


@pytest.mark.parametrize("cultivar", [None, 0], ids=["every-cultivar", "one-cultivar"])
def test_a_multiclass_models_predicted_classes_are_compared(wine_project, cultivar):
    from tests.support import wine_frame

    rows = wine_frame(text_classes=False)
    if cultivar is not None:
        rows = rows[rows["cultivar"] == cultivar]
    batch = wine_project / f"batch_{cultivar}.parquet"
    rows.drop(columns="cultivar").sample(n=400, replace=True, random_state=3).assign(
        wine_id=range(400)
    ).to_parquet(batch)
    summary = run_monitor(
        wine_project, names=wine_names(), config_name="wine.yaml", batch=str(batch)
    )
    predicted = summary["columns"]["predicted_class"]
    # the likeliest class's probability by KS, the predicted classes by chi-square
    assert summary["columns"]["prediction"]["ks_pvalue"] >= 0 and predicted["chi2_pvalue"] >= 0
    if cultivar is None:
        assert not predicted["drifted"] and "prediction" not in summary["kinds"]
    else:  # one cultivar: the model predicts mostly its class
        assert predicted["drifted"] and predicted["breaches"] == ["chi2"]
        assert "prediction" in summary["kinds"] and summary["event_id"] is not None


def test_a_model_registered_before_profiles_existed_is_named_clearly(monitored_project, tmp_path):
    from stemma.components.platform.tracking import configure_tracking, ensure_experiment
    from tests.support import log_trained_model

    configure_tracking(monitored_project)
    train = pd.read_parquet(monitored_project / "data" / "credit" / "train.parquet")
    spec = load_spec(monitored_project / "configs" / "credit.yaml").spec
    _, _, info, _, run_id = log_trained_model(
        train,
        spec.data.features,
        task="binary",
        target="approved",
        experiment_id=ensure_experiment("legacy", monitored_project),
        workdir=tmp_path / "model",
    )
    client = mlflow.MlflowClient()
    client.create_registered_model("legacy")
    client.create_model_version("legacy", info.model_uri, run_id=run_id, model_id=info.model_id)

    with pytest.raises(MissingProfileError) as caught:
        run_monitor(monitored_project, model="models:/legacy/1", batch=day(monitored_project, 1))
    assert "legacy v1 has no reference profile" in caught.value.headline
    assert "train the model again" in caught.value.render()


def test_a_batch_missing_a_feature_column_is_a_clear_error(monitored_project):
    broken = monitored_project / "day_broken.parquet"
    pd.read_parquet(day(monitored_project, 1)).drop(columns=["age"]).to_parquet(broken)
    with pytest.raises(DataError) as caught:
        run_monitor(monitored_project, batch=str(broken))
    text = caught.value.render()
    assert "day_broken.parquet: missing 1 column: age (long)" in text


def test_labels_without_the_id_column_are_a_clear_error(monitored_project):
    labels = monitored_project / "labels_day_01.parquet"
    pd.read_parquet(day(monitored_project, 1, "labels")).rename(
        columns={"application_id": "id"}
    ).to_parquet(labels)
    with pytest.raises(DataError) as caught:
        run_monitor(monitored_project, batch=day(monitored_project, 1), labels=str(labels))
    text = caught.value.render()
    assert "labels_day_01.parquet: no id column 'application_id'" in text
    assert "(its columns: approved, id)" in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("monitor.thresholds.psi=-0.1", "monitor.thresholds.psi: must be greater than 0"),
        ("monitor.thresholds.ks_pvalue=1.5", "monitor.thresholds.ks_pvalue: must be less than 1"),
        ("monitor.bins=1", "monitor.bins: must be greater than or equal to 2"),
        ("monitor.statistics.numeric=[psi, wasserstein]", "monitor.statistics.numeric[1]"),
        ("monitor.features=[salary, income]", "'income' is not a feature of data.features"),
        ("monitor.metric=rmse", "'rmse' is not a binary metric"),
        (
            "monitor.statistics.numeric=[psi]",
            "monitor.statistics.numeric: psi decides nothing without monitor.thresholds.psi",
        ),
        ("monitor.psi_min_expected=0", "monitor.psi_min_expected: must be greater than or equal"),
    ],
    ids=[
        "psi-negative",
        "pvalue-above-1",
        "one-bin",
        "unknown-statistic",
        "feature",
        "metric",
        "nothing-decides",
        "psi-minimum",
    ],
)
def test_monitor_spec_problems_are_spec_errors(monitored_project, override, message):
    with pytest.raises(SpecError) as caught:
        run_monitor(monitored_project, override, batch=day(monitored_project, 1))
    assert message in caught.value.render()


# ---------------------------------------------------------------------------------------
# The online endpoint's prediction log as the batch


def _utc_day(offset_days: int) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) + timedelta(days=offset_days)).strftime("%Y-%m-%d")


def _model_scores(frame: pd.DataFrame, version: str) -> list[float]:
    """The monitored model's scores of the rows, as the endpoint logs them."""
    import pyarrow as pa

    from stemma.components.monitoring.drift import make_scorer
    from stemma.components.runtime.loading import load_scoring_model

    model = load_scoring_model(f"models:/{PIPELINE}/{version}")
    return make_scorer(model)(pa.Table.from_pandas(frame, preserve_index=False)).tolist()


def _log_rows(project: Path, number: int) -> pd.DataFrame:
    """A day's batch as the endpoint logs its rows: the model's inputs and the id."""
    return pd.read_parquet(day(project, number)).drop(columns=["applied_at"])


@pytest.fixture
def log_of(monitored_project, request) -> Path:
    """A prediction log folder under the project, named after the test."""
    return monitored_project / "logs" / re.sub(r"\W+", "-", request.node.name.removeprefix("test_"))


def test_a_day_of_the_endpoint_log_drifts_like_its_batch_with_its_labels(monitored_project, log_of):
    from stemma.components.data.prediction_log import day_parts, folder_digest
    from tests.support import write_log_part

    champion = mlflow.MlflowClient().get_model_version_by_alias(PIPELINE, "champion").version
    rows = _log_rows(monitored_project, 6)
    yesterday, today = _utc_day(-1), _utc_day(0)
    # most rows the champion scored; a few a canary did (its scores are not the champion's)
    served, canary = rows.iloc[:800], rows.iloc[800:]
    write_log_part(
        log_of, "predictions", served, at=f"{yesterday} 10:00", version=champion,
        score=_model_scores(served, champion),
    )  # fmt: skip
    write_log_part(
        log_of, "predictions", canary, at=f"{yesterday} 11:00", version="0", score=[0.0] * 200
    )
    write_log_part(
        log_of,
        "predictions",
        _log_rows(monitored_project, 1),
        at=f"{today} 00:10",
        version=champion,
    )
    labels = pd.read_parquet(day(monitored_project, 6, "labels"))
    write_log_part(log_of, "labels", labels, at=f"{today} 00:20")

    summary = run_monitor(
        monitored_project,
        batch=str(log_of / "predictions"),
        labels=str(log_of / "labels"),
        days=1,
    )
    whole_day = run_monitor(monitored_project, batch=day(monitored_project, 6))

    day_folder = log_of / "predictions" / yesterday
    assert summary["batch"] == str(day_folder) and summary["days"] == [yesterday]
    assert summary["rows"] == BATCH_ROWS  # today's rows are not in the complete day
    assert summary["scores"] == {"logged": 800, "rescored": 200}
    assert summary["drift_detected"] is True
    assert {"age", "salary", "loan"} <= set(summary["drifted_features"])
    # the log's columns are not features: the verdict is the batch file's
    assert summary["drifted_features"] == whole_day["drifted_features"]
    assert summary["columns"]["prediction"]["psi"] == pytest.approx(
        whole_day["columns"]["prediction"]["psi"], rel=1e-4
    )
    # labels from the log's labels folder join by the id the endpoint logged as text
    assert summary["labelled_rows"] == BATCH_ROWS
    assert summary["performance"]["current"] > 0.5

    client = mlflow.MlflowClient()
    assert client.get_run(summary["run_id"]).info.run_name == f"monitor {yesterday}"
    record = lineage.read_run_record(client, summary["run_id"])
    (batch,) = [
        node for node in record.nodes
        if node.kind == "input" and node.attributes.get("role") == "batch"
    ]  # fmt: skip
    relative = f"logs/{log_of.name}/predictions/{yesterday}"
    digest, _ = folder_digest(day_folder, day_parts(day_folder))
    assert batch.attributes["path"] == relative and batch.digest == f"md5:{digest}"
    assert summary["batch_digest"] == digest
    assert len(batch.attributes["files"]) == 2


@pytest.mark.parametrize(
    ("logged_by", "prediction_drift"),
    [("champion", True), ("another version", False)],
    ids=["reused", "rescored"],
)
def test_logged_scores_count_only_when_the_monitored_version_made_them(
    monitored_project, log_of, logged_by, prediction_drift
):
    from tests.support import write_log_part

    champion = mlflow.MlflowClient().get_model_version_by_alias(PIPELINE, "champion").version
    version = champion if logged_by == "champion" else "0"
    # day 1 is drawn like the training data; the logged scores are not the model's
    write_log_part(
        log_of, "predictions", _log_rows(monitored_project, 1), at=f"{_utc_day(0)} 09:00", version=version,
        score=[0.999] * BATCH_ROWS,
    )  # fmt: skip
    summary = run_monitor(monitored_project, batch=str(log_of / "predictions"))
    assert summary["drifted_features"] == []
    assert summary["columns"]["prediction"]["drifted"] is prediction_drift
    assert ("prediction" in summary["kinds"]) is prediction_drift
    logged = BATCH_ROWS if prediction_drift else 0
    assert summary["scores"] == {"logged": logged, "rescored": BATCH_ROWS - logged}


def test_a_log_with_nothing_in_the_window_is_nothing_to_do(monitored_project, log_of):
    from tests.support import write_log_part

    write_log_part(
        log_of, "predictions", _log_rows(monitored_project, 1), at=f"{_utc_day(0)} 00:05"
    )
    state = run_monitor(
        monitored_project, batch=str(log_of / "predictions"), days=1, return_state=True
    )
    assert state.is_completed()
    assert state.message.startswith("nothing to do: ") and "nothing was logged on" in state.message
    assert state.result()["outcome"] == "nothing_logged"
    with pytest.raises(DataError, match="days apply to the prediction log's folder"):
        run_monitor(monitored_project, batch=day(monitored_project, 1), days=1)


def test_cli_prints_the_verdict_and_exits_0_on_drift(
    monitored_project, stemma_exe, prefect_api, mlflow_uri
):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_uri}
    args = [
        *stemma_exe,
        "run",
        "monitor",
        "configs/credit.yaml",
        "--batch",
        day(monitored_project, 7),
    ]
    for override in NAMES:
        args += ["--set", override]
    done = subprocess.run(
        args, cwd=monitored_project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("DRIFT: ") and "day_07.parquet" in first
    assert "feature age: psi" in done.stdout
    assert "event stemma.drift.detected emitted" in done.stdout


def test_cli_monitors_the_last_complete_days_of_the_log_or_says_there_is_nothing(
    monitored_project, log_of, stemma_exe, prefect_api, mlflow_uri
):
    from tests.support import write_log_part

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_uri}
    write_log_part(
        log_of, "predictions", _log_rows(monitored_project, 1), at=f"{_utc_day(0)} 00:05"
    )
    args = [*stemma_exe, "run", "monitor", "configs/credit.yaml", "--batch"]
    args += [str(log_of / "predictions"), "--days", "2"]
    for override in NAMES:
        args += ["--set", override]
    done = subprocess.run(
        args, cwd=monitored_project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("nothing to do: ")
    assert f"nothing was logged on {_utc_day(-2)} to {_utc_day(-1)} (UTC)" in done.stdout


def test_cli_refuses_thresholds_out_of_range_before_starting_anything(
    monitored_project, stemma_exe
):
    done = subprocess.run(
        [
            *stemma_exe,
            "run",
            "monitor",
            "configs/credit.yaml",
            "--set",
            "monitor.thresholds.chi2_pvalue=0",
        ],
        cwd=monitored_project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "monitor.thresholds.chi2_pvalue: must be greater than 0" in done.stderr
    assert "Traceback" not in done.stderr
