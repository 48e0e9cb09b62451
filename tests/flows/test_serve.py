"""`stemma serve` against real servers on loopback: deployments, runs, events and the UIs.

A module-scoped stack starts the project's Prefect and MLflow servers (`stemma up`'s
code) and `stemma serve` in a child process, then drives them only through their HTTP
APIs, as the Prefect UI's Run button and the MLflow UI do. The browser test opens both
UIs in Debian's headless Chromium and saves screenshots under ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from stemma.components.platform.deployments import (
    BATCH_SCORED_EVENT,
    DRIFT_DETECTED_EVENT,
    deployment_plans,
    describe_plans,
)
from stemma.components.platform.services import environment_for, start_services, stop_services
from stemma.components.platform.tracking import run_page_url
from stemma.components.spec import load_spec
from tests.support import build_project, free_port

START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 420
#: How often the tests look at a flow run they wait for.
RUN_POLL_S = 0.5
ARTIFACTS = Path(os.environ.get("STEMMA_TEST_ARTIFACTS", "test-artifacts"))
#: The served spec's endpoint log, which `stemma serve` deploys a monitor of.
ENDPOINT_LOG = "outputs/endpoint-log"
LOG_MONITOR = "monitor/credit · endpoint drift"


def _request(method: str, url: str, body: dict | list | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(5):
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = response.read()
            return json.loads(payload) if payload else {}
        except urllib.error.HTTPError as error:
            # Prefect on SQLite answers 503 "database is locked" under load (STACK.md);
            # its own client backs off and retries the same way.
            if error.code != 503 or attempt == 4:
                raise
            time.sleep(2 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass
class Stack:
    project: Path
    prefect_api: str
    mlflow_url: str
    serve: subprocess.Popen
    serve_log: Path
    environment: dict[str, str]

    def deployments(self) -> dict[str, dict]:
        """Deployments by `<flow>/<name>`."""
        # Deployments first: a flow exists before its deployment, so every deployment read
        # finds its flow even while `stemma serve` is still creating them.
        found = _request("POST", f"{self.prefect_api}/deployments/filter", {})
        flows = {
            flow["id"]: flow["name"]
            for flow in _request("POST", f"{self.prefect_api}/flows/filter", {})  # type: ignore[union-attr]
        }
        return {f"{flows[item['flow_id']]}/{item['name']}": item for item in found}  # type: ignore[union-attr]

    def wait_for_run(self, flow_run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = _request("GET", f"{self.prefect_api}/flow_runs/{flow_run_id}")
            state = run["state"]["type"]  # type: ignore[index]
            if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return run  # type: ignore[return-value]
            time.sleep(RUN_POLL_S)
        raise AssertionError(
            f"flow run {flow_run_id} did not finish in {timeout_s} s:\n{self.log()}"
        )

    def runs_of(self, deployment_id: str) -> list[dict]:
        """Runs of a deployment due by now (not the schedule's runs of the coming days)."""
        soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 300))
        return _request(  # type: ignore[return-value]
            "POST",
            f"{self.prefect_api}/flow_runs/filter",
            {
                "flow_runs": {
                    "deployment_id": {"any_": [deployment_id]},
                    "expected_start_time": {"before_": soon},
                }
            },
        )

    def mlflow(self, method: str, path: str, body: dict | None = None) -> dict:
        return _request(method, f"{self.mlflow_url}/api/2.0/mlflow/{path}", body)  # type: ignore[return-value]

    def log(self) -> str:
        return self.serve_log.read_text() if self.serve_log.exists() else ""


def _start_serve(
    project: Path, environment: dict[str, str], log: Path, stemma_exe
) -> subprocess.Popen:
    handle = log.open("a")
    return subprocess.Popen(
        [*stemma_exe, "serve", "configs/credit.yaml", "--set", "train.epochs=2"],
        cwd=project,
        env={**os.environ, **environment},
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_deployments(
    stack: Stack, expected: set[str], updated_since: datetime | None = None
) -> dict[str, dict]:
    """The deployments once every expected one exists (and, with ``updated_since``, was
    written by `stemma serve` since then)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    found: dict[str, dict] = {}
    while time.monotonic() < deadline:
        if stack.serve.poll() is not None:
            raise AssertionError(f"`stemma serve` exited {stack.serve.returncode}:\n{stack.log()}")
        found = stack.deployments()
        if expected <= set(found) and (
            updated_since is None
            or all(
                datetime.fromisoformat(found[name]["updated"]) >= updated_since for name in expected
            )
        ):
            return found
        time.sleep(1)
    raise AssertionError(f"deployments {expected - set(found)} never appeared:\n{stack.log()}")


def _stop_serve(stack: Stack) -> None:
    if stack.serve.poll() is None:
        os.killpg(stack.serve.pid, signal.SIGINT)
        try:
            stack.serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(stack.serve.pid, signal.SIGKILL)
            stack.serve.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, repo_root, stemma_exe) -> Iterator[Stack]:
    project = build_project(
        tmp_path_factory.mktemp("served") / "project", repo_root, train_rows=3_000
    )
    spec_path = project / "configs" / "credit.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["retrain"] = {"schedule": "0 3 * * *", "on_drift": True, "labels": "data/credit/labels"}
    spec["endpoint"] = {"log": {"path": ENDPOINT_LOG}}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    ports = {"prefect_port": free_port(), "mlflow_port": free_port()}
    services = start_services(project, timeout_s=START_TIMEOUT_S, **ports)
    environment = environment_for(services)
    environment["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    log = project / ".stemma" / "serve.log"
    serve = _start_serve(project, environment, log, stemma_exe)
    built = Stack(
        project=project,
        prefect_api=environment["PREFECT_API_URL"],
        mlflow_url=environment["MLFLOW_TRACKING_URI"],
        serve=serve,
        serve_log=log,
        environment=environment,
    )
    built.ports = ports  # type: ignore[attr-defined]
    try:
        yield built
    finally:
        _stop_serve(built)
        stop_services(project)


def _expected_names(project: Path) -> set[str]:
    loaded = load_spec(project / "configs" / "credit.yaml")
    return {plan.full_name for plan in deployment_plans(loaded, "configs/credit.yaml")}


def test_serve_creates_every_deployment_unpaused_with_schedules_triggers_and_forms(stack):
    expected = _expected_names(stack.project)
    assert {"train/credit · training", "score/credit · nightly scoring"} <= expected
    deployments = _wait_for_deployments(stack, expected)

    for name in expected:
        deployment = deployments[name]
        assert deployment["paused"] is False, name
        properties = deployment["parameter_openapi_schema"]["properties"]
        # The flows' typed signatures become the form in the Prefect UI.
        assert properties["config"]["type"] == "string", name
        assert deployment["parameters"]["config"] == "configs/credit.yaml"
        assert deployment["parameters"]["overrides"] == ["train.epochs=2"]
        # the description says when it runs and the command that does the same by hand
        flow = name.split("/", 1)[0]
        assert (
            f"stemma run {flow} configs/credit.yaml --set train.epochs=2"
            in (deployment["description"])
        ), name
    score = deployments["score/credit · nightly scoring"]
    assert [s["schedule"]["cron"] for s in score["schedules"]] == ["0 2 * * *"]
    assert all(s["active"] for s in score["schedules"])
    assert deployments["train/credit · training"]["schedules"] == []

    automations = _request("POST", f"{stack.prefect_api}/automations/filter", {})
    expected_events = set()
    if "monitor/credit · drift monitoring" in expected:
        expected_events.add(BATCH_SCORED_EVENT)
    if "retrain/credit · retraining" in expected:
        expected_events.add(DRIFT_DETECTED_EVENT)
        retrain = deployments["retrain/credit · retraining"]
        assert retrain["concurrency_limit"] == 1 or retrain.get("global_concurrency_limit")
    seen = {event for automation in automations for event in automation["trigger"]["expect"]}  # type: ignore[index]
    assert expected_events <= seen


def _train_through_the_api(stack: Stack) -> dict:
    """Start the training deployment as the UI's "Quick run" does (once per stack)."""
    if getattr(stack, "training_run", None) is None:
        deployments = _wait_for_deployments(stack, {"train/credit · training"})
        train = deployments["train/credit · training"]
        # What the UI sends: a scheduled state and the deployment's default parameters.
        created = _request(
            "POST",
            f"{stack.prefect_api}/deployments/{train['id']}/create_flow_run",
            {"state": {"type": "SCHEDULED", "message": "Run from the Prefect UI with defaults"}},
        )
        stack.training_run = stack.wait_for_run(created["id"])  # type: ignore[attr-defined,index]
    return stack.training_run  # type: ignore[attr-defined]


def test_a_run_started_like_the_ui_run_button_trains_and_lands_in_mlflow(stack):
    run = _train_through_the_api(stack)
    assert run["state"]["type"] == "COMPLETED", stack.log()

    experiment = stack.mlflow("GET", "experiments/get-by-name?experiment_name=credit")
    found = stack.mlflow(
        "POST",
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`stemma.prefect.flow_run_id` = '{run['id']}'",
        },
    )
    assert len(found["runs"]) == 1
    mlflow_run = found["runs"][0]
    assert mlflow_run["info"]["status"] == "FINISHED"
    dvc_md5 = yaml.safe_load((stack.project / "data.dvc").read_text())["outs"][0]["md5"]
    inputs = mlflow_run["inputs"]["dataset_inputs"]
    assert any(item["dataset"]["digest"] == dvc_md5 for item in inputs)
    assert any(item["dataset"]["source_type"] == "dvc" for item in inputs)

    model = stack.mlflow("GET", "registered-models/get?name=credit")["registered_model"]
    aliases = {alias["alias"]: alias["version"] for alias in model.get("aliases", [])}
    run_versions = stack.mlflow(
        "GET",
        "model-versions/search?filter="
        + urllib.request.quote(f"run_id='{mlflow_run['info']['run_id']}'"),
    )["model_versions"]
    assert len(run_versions) == 1
    assert aliases.get("champion") == run_versions[0]["version"]


def test_a_drift_event_starts_the_retraining_deployment_with_its_cause(stack):
    import uuid
    from datetime import UTC, datetime

    assert _train_through_the_api(stack)["state"]["type"] == "COMPLETED", stack.log()
    retrain = _wait_for_deployments(stack, {"retrain/credit · retraining"})[
        "retrain/credit · retraining"
    ]
    experiment = stack.mlflow("GET", "experiments/get-by-name?experiment_name=credit")
    # A drift report as the monitor leaves one: an MLflow run of the `monitor` flow.
    report = stack.mlflow(
        "POST",
        "runs/create",
        {
            "experiment_id": experiment["experiment"]["experiment_id"],
            "tags": [
                {"key": "stemma.flow", "value": "monitor"},
                {"key": "stemma.input.path", "value": "data/credit/batches/day_02.parquet"},
            ],
        },
    )["run"]["info"]["run_id"]
    before = {run["id"] for run in stack.runs_of(retrain["id"])}
    event = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": DRIFT_DETECTED_EVENT,
        "resource": {"prefect.resource.id": "stemma.pipeline.credit"},
        "related": [],
        "payload": {"report_run_id": report, "drifted_features": ["age"]},
    }
    _request("POST", f"{stack.prefect_api}/events", [event])  # type: ignore[arg-type]

    deadline = time.monotonic() + 120
    started: list[dict] = []
    while time.monotonic() < deadline and not started:
        started = [r for r in stack.runs_of(retrain["id"]) if r["id"] not in before]
        time.sleep(1)
    assert len(started) == 1, "the drift event started no retraining run"
    assert started[0]["parameters"]["cause"] == report
    finished = stack.wait_for_run(started[0]["id"])
    assert finished["state"]["type"] == "COMPLETED", stack.log()
    runs = stack.mlflow(
        "POST",
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`stemma.cause.run_id` = '{report}' and tags.`stemma.flow` = 'retrain'",
        },
    )["runs"]
    assert len(runs) == 1
    tags = {tag["key"]: tag["value"] for tag in runs[0]["data"]["tags"]}
    # The project's two days hold too few new labelled rows: the run says so and stops.
    assert tags["stemma.retrain.outcome"] == "no_new_data"
    assert tags["stemma.cause.kind"] == "drift_report"


def test_serve_deploys_a_scheduled_monitor_of_the_endpoint_log(stack):
    from datetime import UTC, datetime, timedelta

    import pandas as pd

    from tests.support import write_log_part

    deployment = _wait_for_deployments(stack, {LOG_MONITOR})[LOG_MONITOR]
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["30 0 * * *"]
    assert deployment["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert deployment["parameters"] == {
        "config": "configs/credit.yaml",
        "overrides": ["train.epochs=2"],
        "batch": f"{ENDPOINT_LOG}/predictions",
        "days": 1,
        "labels": f"{ENDPOINT_LOG}/labels",
    }
    assert deployment["paused"] is False
    assert (
        f"stemma run monitor configs/credit.yaml --set train.epochs=2 --batch "
        f"{ENDPOINT_LOG}/predictions --days 1 --labels {ENDPOINT_LOG}/labels"
    ) in deployment["description"]

    # A run as the schedule starts it reads the day before from the log the endpoint wrote.
    assert _train_through_the_api(stack)["state"]["type"] == "COMPLETED", stack.log()
    log = stack.project / ENDPOINT_LOG
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    batch = sorted((stack.project / "data").rglob("day_01.parquet"))[0]
    rows = pd.read_parquet(batch).drop(columns=["applied_at"])
    write_log_part(log, "predictions", rows, at=f"{yesterday} 12:00")
    (log / "labels").mkdir(parents=True, exist_ok=True)  # no label received yet
    created = _request(
        "POST",
        f"{stack.prefect_api}/deployments/{deployment['id']}/create_flow_run",
        {"state": {"type": "SCHEDULED", "message": "as the schedule starts it"}},
    )
    run = stack.wait_for_run(created["id"])  # type: ignore[index]
    assert run["state"]["type"] == "COMPLETED", stack.log()

    experiment = stack.mlflow("GET", "experiments/get-by-name?experiment_name=credit")
    (report,) = stack.mlflow(
        "POST",
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`stemma.prefect.flow_run_id` = '{run['id']}'",
        },
    )["runs"]
    assert report["info"]["run_name"] == f"monitor {yesterday}"
    (source,) = [item["dataset"]["source"] for item in report["inputs"]["dataset_inputs"]]
    assert f"{ENDPOINT_LOG}/predictions/{yesterday}" in source


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], None),
        (["endpoint.log.path=s3://bucket/log"], None),  # the monitor reads project folders
        (["endpoint.log.path=logs/credit", "monitor.log_schedule=null"], None),
        (
            [
                "endpoint.log.path=logs/credit/",
                "monitor.log_days=7",
                "monitor.log_schedule=0 6 * * 1",
            ],
            {"batch": "logs/credit/predictions", "days": 7, "labels": "logs/credit/labels"},
        ),
        (
            ["endpoint.log.path=logs/credit", "monitor.labels=data/credit/labels"],
            {"batch": "logs/credit/predictions", "days": 1},  # the flow takes monitor.labels
        ),
    ],
    ids=["no-log", "s3-log", "no-schedule", "weekly", "spec-labels"],
)
def test_the_endpoint_log_monitor_is_planned_only_for_a_log_in_the_project(
    repo_root, overrides, expected
):
    loaded = load_spec(str(repo_root / "configs" / "credit.yaml"), overrides, check_paths=False)
    plans = [
        plan
        for plan in deployment_plans(loaded, "configs/credit.yaml")
        if plan.name == "credit · endpoint drift"
    ]
    if expected is None:
        assert plans == []
        return
    (plan,) = plans
    assert plan.entrypoint == "stemma.flows.monitor:monitor_flow" and not plan.triggers
    assert plan.parameters == {"config": "configs/credit.yaml", "overrides": [], **expected}
    assert plan.cron == loaded.spec.monitor.log_schedule
    # the batch monitor after scoring is still there, beside it
    names = {entry.name for entry in deployment_plans(loaded, "configs/credit.yaml")}
    assert "credit · drift monitoring" in names


def test_deployments_stay_unpaused_after_serve_and_the_server_restart(stack, stemma_exe):
    expected = _expected_names(stack.project)
    _wait_for_deployments(stack, expected)
    _stop_serve(stack)
    assert stack.serve.returncode is not None
    after_stop = stack.deployments()
    assert all(after_stop[name]["paused"] is False for name in expected)

    stop_services(stack.project)
    start_services(stack.project, timeout_s=START_TIMEOUT_S, **stack.ports)  # type: ignore[attr-defined]
    after_restart = stack.deployments()
    assert all(after_restart[name]["paused"] is False for name in expected)
    assert all(s["active"] for s in after_restart["score/credit · nightly scoring"]["schedules"])
    # Serve again, as a restarted `stemma serve` would: the deployments are taken back.
    restarted = datetime.now(UTC)
    stack.serve = _start_serve(stack.project, stack.environment, stack.serve_log, stemma_exe)
    _wait_for_deployments(stack, expected, updated_since=restarted)


@pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("chromedriver") is None,
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)
def test_browser_finds_and_starts_a_deployment_and_sees_the_model_aliases(stack):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    prefect_ui = stack.prefect_api.removesuffix("/api")
    # The UI must call this server's API, not Prefect's default port.
    assert _request("GET", f"{prefect_ui}/ui-settings")["api_url"] == stack.prefect_api  # type: ignore[index]
    assert _train_through_the_api(stack)["state"]["type"] == "COMPLETED", stack.log()
    deployments = _wait_for_deployments(
        stack, {"train/credit · training", "score/credit · nightly scoring"}
    )
    score = deployments["score/credit · nightly scoring"]
    runs_before = len(stack.runs_of(score["id"]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=ChromeService(executable_path=shutil.which("chromedriver")), options=options
    )
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(f"{prefect_ui}/deployments")
        wait.until(
            expected_conditions.presence_of_element_located(
                (By.XPATH, "//*[contains(normalize-space(.), 'score')]")
            )
        )
        wait.until(lambda d: "nightly scoring" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(ARTIFACTS / "prefect-deployments.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        # each deployment by its title, not seven times the pipeline's name
        assert "credit · training" in body and "credit · nightly scoring" in body

        driver.get(f"{prefect_ui}/deployments/deployment/{score['id']}")
        run_button = wait.until(
            expected_conditions.element_to_be_clickable(
                (By.XPATH, "//button[normalize-space(.)='Run']")
            )
        )
        run_button.click()
        quick = wait.until(
            expected_conditions.element_to_be_clickable(
                (By.XPATH, "//*[normalize-space(.)='Quick run']")
            )
        )
        quick.click()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(stack.runs_of(score["id"])) == runs_before:
            time.sleep(0.5)
        driver.save_screenshot(str(ARTIFACTS / "prefect-quick-run.png"))
        assert len(stack.runs_of(score["id"])) == runs_before + 1
        # The deployment's Description tab says when it runs and what does the same by hand
        # (opened after the quick run: switching tabs first re-renders the Run button).
        driver.get(f"{prefect_ui}/deployments/deployment/{score['id']}")
        wait.until(
            expected_conditions.element_to_be_clickable(
                (By.XPATH, "//*[normalize-space(.)='Description']")
            )
        ).click()
        wait.until(lambda d: "stemma run score" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(ARTIFACTS / "prefect-deployment-description.png"))

        driver.get(f"{stack.mlflow_url}/#/models/credit")
        wait.until(lambda d: "champion" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(ARTIFACTS / "mlflow-model-aliases.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "champion" in body and "Version 1" in body
        # the registered model's description names the champion, its data and its story
        assert "Champion: v1, trained on data version" in body

        # The version page names the backend that serves it and the hash of its graph.
        driver.get(f"{stack.mlflow_url}/#/models/credit/versions/1")
        wait.until(lambda d: "stemma.runtime.backend" in d.find_element(By.TAG_NAME, "body").text)
        tag = driver.find_element(By.XPATH, "//*[normalize-space(text())='stemma.runtime.backend']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", tag)
        driver.save_screenshot(str(ARTIFACTS / "mlflow-runtime-tags.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "onnxruntime" in body and "stemma.onnx.sha256" in body
        # ... and its description opens with its role, the gate's decision and its data
        data_md5 = yaml.safe_load((stack.project / "data.dvc").read_text())["outs"][0]["md5"]
        opening = "champion · gate passed on roc_auc"
        assert f"{opening} 0." in body and f"data {data_md5[:8]}" in body
        assert "History:" in body and "champion" in body.split("History:", 1)[1]

        # The experiment opens on its runs (not on MLflow's GenAI overview), and a training
        # run's page starts with its description: the decision, the data and the version.
        version = stack.mlflow("GET", "model-versions/get?name=credit&version=1")["model_version"]
        run = stack.mlflow("GET", f"runs/get?run_id={version['run_id']}")["run"]
        experiment = run["info"]["experiment_id"]
        driver.get(run_page_url(stack.mlflow_url, experiment))
        wait.until(lambda d: "train-credit" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(ARTIFACTS / "mlflow-experiment.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Model training" in body and "Runs" in body and "Judges" not in body
        driver.get(run_page_url(stack.mlflow_url, experiment, version["run_id"]))
        wait.until(lambda d: "decision passed" in d.find_element(By.TAG_NAME, "body").text)
        headline = driver.find_element(By.XPATH, "//strong[normalize-space(text())='train']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", headline)
        driver.save_screenshot(str(ARTIFACTS / "mlflow-run-description.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "credit v1" in body and "data version" in body and "alias champion" in body
        # its artifacts hold the lineage picture, drawn in the artifact viewer
        page = run_page_url(stack.mlflow_url, experiment, version["run_id"])
        driver.get(page.replace("?", "/artifacts/lineage/graph.svg?", 1))
        wait.until(lambda d: "lineage/graph.svg" in d.find_element(By.TAG_NAME, "body").text)
        drawn = wait.until(  # the viewer shows the SVG as an image of the picture's width
            lambda d: [
                image.get_property("naturalWidth")
                for image in d.find_elements(By.XPATH, "//img[starts-with(@src, 'blob:')]")
                if image.get_property("naturalWidth") > 500
            ]
        )
        assert drawn
        driver.save_screenshot(str(ARTIFACTS / "mlflow-lineage-picture.png"))

        # The training flow run in Prefect carries the same summary, linking the MLflow run.
        training = _train_through_the_api(stack)
        (artifact,) = _request(
            "POST",
            f"{stack.prefect_api}/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [training["id"]]}}},
        )
        assert artifact["key"] == "train-summary"  # type: ignore[index]
        driver.get(f"{prefect_ui}/artifacts/artifact/{artifact['id']}")  # type: ignore[index]
        wait.until(lambda d: "decision passed" in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(ARTIFACTS / "prefect-run-summary.png"))
        link = driver.find_element(By.PARTIAL_LINK_TEXT, "MLflow run")
        assert link.get_attribute("href") == run_page_url(
            stack.mlflow_url, experiment, version["run_id"]
        )
    finally:
        driver.quit()


def test_dry_run_lists_the_plan_and_creates_nothing(stack, stemma_exe):
    result = subprocess.run(
        [*stemma_exe, "serve", "configs/credit.yaml", "--dry-run"],
        cwd=stack.project,
        env={**os.environ, **stack.environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = load_spec(stack.project / "configs" / "credit.yaml")
    assert describe_plans(deployment_plans(loaded, "configs/credit.yaml")) in result.stdout
    assert "not created" in result.stdout


def test_serve_without_a_prefect_server_is_a_clear_error(project, stemma_exe):
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [*stemma_exe, "serve", "configs/credit.yaml"],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 6
    assert "no Prefect server" in result.stderr and "stemma up" in result.stderr
    assert "Traceback" not in result.stderr


def _without_servers() -> dict[str, str]:
    """This environment less every variable pointing at a server: a command's defaults."""
    names = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_PROFILES_PATH"}
    return {key: value for key, value in os.environ.items() if key not in names}


def test_a_command_uses_the_servers_stemma_up_runs_for_the_project(stack, stemma_exe):
    """No PREFECT_API_URL, no MLFLOW_TRACKING_URI: `stemma run` finds the project's running
    servers, its flow run lands in their Prefect UI and its MLflow run on their store."""
    _train_through_the_api(stack)  # a champion to score with
    batch = sorted((stack.project / "data").rglob("day_01.parquet"))[0]
    result = subprocess.run(
        [*stemma_exe, "run", "score", "configs/credit.yaml", "--input", str(batch)],
        cwd=stack.project,
        env=_without_servers(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    prefect_url, mlflow_url = (stack.prefect_api.removesuffix("/api"), stack.mlflow_url)
    assert f"using the servers of `stemma up`: Prefect at {prefect_url}" in result.stderr
    assert f"MLflow at {mlflow_url}" in result.stderr

    experiment = stack.mlflow("GET", "experiments/get-by-name?experiment_name=credit")
    (score_run,) = stack.mlflow(
        "POST",
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": "tags.`stemma.flow` = 'score'",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1,
        },
    )["runs"]
    tags = {tag["key"]: tag["value"] for tag in score_run["data"]["tags"]}
    flow_run = _request(
        "GET", f"{stack.prefect_api}/flow_runs/{tags['stemma.prefect.flow_run_id']}"
    )
    assert flow_run["state"]["type"] == "COMPLETED"  # type: ignore[call-overload]
    # no temporary server was started for the command
    assert not (stack.project / ".stemma" / "prefect" / "temporary-server.log").exists()


def test_the_demo_takes_only_prefect_from_stemma_up_and_a_set_variable_wins(stack, monkeypatch):
    from stemma.flows.cli.session import use_running_services

    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    assert use_running_services(stack.project, mlflow=False) == [
        f"Prefect at {stack.prefect_api.removesuffix('/api')}"
    ]
    assert os.environ["PREFECT_API_URL"] == stack.prefect_api
    assert "MLFLOW_TRACKING_URI" not in os.environ

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert use_running_services(stack.project) == []  # both set: nothing to find
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"


def test_a_recorded_server_that_does_not_answer_is_named_and_left_out(
    tmp_path, monkeypatch, capsys
):
    from stemma.flows.cli.session import use_running_services

    services = tmp_path / ".stemma" / "services"
    services.mkdir(parents=True)
    # a live process under the recorded command, on a port nothing listens on
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        # Popen returns once the child's exec began; its arguments show in /proc a moment
        # later, and until then the record would look stale and be removed
        cmdline = Path(f"/proc/{sleeper.pid}/cmdline")
        deadline = time.monotonic() + 10
        while cmdline.exists() and b"sleep" not in cmdline.read_bytes():
            assert time.monotonic() < deadline, "the sleeper never showed its command"
            time.sleep(0.01)
        record = {
            "name": "prefect",
            "pid": sleeper.pid,
            "port": free_port(),
            "command": ["sleep", "300"],
        }
        (services / "prefect.json").write_text(json.dumps(record))
        for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
            monkeypatch.delenv(name, raising=False)
        assert use_running_services(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "PREFECT_API_URL" not in os.environ
    assert "the Prefect server of `stemma up`" in capsys.readouterr().err
