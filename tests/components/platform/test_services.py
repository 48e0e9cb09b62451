"""Local Prefect and MLflow servers: real servers on loopback, started once for the module."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stemma.components.errors import StemmaError
from stemma.components.platform import services as services_module
from stemma.components.platform.services import (
    Service,
    environment_for,
    service_status,
    start_services,
    stop_services,
)
from stemma.flows.services import run_down, run_status, run_up
from tests.support import free_port

START_TIMEOUT_S = 90


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Running:
    root: Path
    prefect_port: int
    mlflow_port: int
    services: list[Service]

    def by_name(self, name: str) -> Service:
        return next(service for service in self.services if service.name == name)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("project")
    prefect_port, mlflow_port = free_port(), free_port()
    try:
        services = start_services(
            root, prefect_port=prefect_port, mlflow_port=mlflow_port, timeout_s=START_TIMEOUT_S
        )
        yield Running(root, prefect_port, mlflow_port, services)
    finally:
        stop_services(root)  # even when a test (or the start) failed


def test_up_starts_both_servers_healthy_on_loopback(running: Running) -> None:
    prefect, mlflow = running.services
    assert (prefect.name, mlflow.name) == ("prefect", "mlflow")
    assert prefect.url == f"http://127.0.0.1:{running.prefect_port}"
    assert mlflow.url == f"http://127.0.0.1:{running.mlflow_port}"
    assert prefect.healthy and mlflow.healthy and not prefect.already_running
    assert _get(f"{prefect.url}/api/health") == (200, "true")
    assert _get(f"{mlflow.url}/health") == (200, "OK")
    assert prefect.pid in _processes_mentioning(running.prefect_port)
    assert mlflow.pid in _processes_mentioning(running.mlflow_port)
    # Their data lives under the project.
    state = running.root / ".stemma"
    assert (state / "prefect-server" / "prefect.db").exists()
    assert (state / "mlflow.db").exists()
    for name in ("prefect", "mlflow"):
        record = json.loads((state / "services" / f"{name}.json").read_text())
        assert record["pid"] == running.by_name(name).pid
        assert (state / "services" / f"{name}.log").exists()


def test_servers_listen_on_loopback_only(running: Running) -> None:
    for service in running.services:
        record = json.loads(
            (running.root / ".stemma/services" / f"{service.name}.json").read_text()
        )
        command = record["command"]
        assert command[command.index("--host") + 1] == "127.0.0.1"


def test_mlflow_server_starts_none_of_mlflows_job_processes(running: Running) -> None:
    """Job execution is off unless the user sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION: no job
    runner, no huey consumers, only the server's uvicorn."""
    import psutil

    assert services_module.JOB_EXECUTION_VARIABLE not in os.environ  # the default is tested
    server = psutil.Process(running.by_name("mlflow").pid)
    commands = [" ".join(child.cmdline()) for child in server.children(recursive=True)]
    assert any("uvicorn" in command for command in commands), commands
    assert not [c for c in commands if "mlflow.server.jobs" in c or "huey" in c], commands


def test_status_lists_both_with_urls(running: Running) -> None:
    statuses = service_status(running.root)
    assert [(s.name, s.pid, s.healthy) for s in statuses] == [
        (s.name, s.pid, True) for s in running.services
    ]
    report = run_status(running.root)
    assert f"Prefect UI: http://127.0.0.1:{running.prefect_port} (healthy" in report
    assert f"MLflow UI: http://127.0.0.1:{running.mlflow_port} (healthy" in report


def test_second_up_reports_already_running_and_starts_nothing(running: Running) -> None:
    report = run_up(
        running.root, prefect_port=running.prefect_port, mlflow_port=running.mlflow_port
    )
    assert report.count("already running, healthy") == 2
    assert f"export PREFECT_API_URL=http://127.0.0.1:{running.prefect_port}/api" in report
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{running.mlflow_port}" in report
    assert [s.pid for s in service_status(running.root)] == [s.pid for s in running.services]


def test_environment_points_clients_at_the_servers(running: Running) -> None:
    assert environment_for(running.services) == {
        "PREFECT_API_URL": f"http://127.0.0.1:{running.prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{running.mlflow_port}",
    }


def test_mlflow_server_tracks_runs_and_serves_artifacts(running: Running, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=running.by_name("mlflow").url)
    experiment_id = client.create_experiment("served")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "auc", 0.9)
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    client.log_artifact(run.info.run_id, str(artifact))

    assert "served" in [e.name for e in client.search_experiments()]
    assert client.get_run(run.info.run_id).data.metrics == {"auc": 0.9}
    # Proxied artifacts land in the project's artifact folder.
    stored = list((running.root / ".stemma" / "mlartifacts").rglob("note.txt"))
    assert [path.read_text() for path in stored] == ["hello"]


def test_prefect_api_answers(running: Running) -> None:
    request = urllib.request.Request(
        f"{running.by_name('prefect').url}/api/flows/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read()) == []


@pytest.mark.parametrize("flag", ["--prefect-port", "--mlflow-port"], ids=["prefect", "mlflow"])
def test_port_in_use_is_a_clear_error(flag: str, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupier:
        occupier.bind(("127.0.0.1", 0))
        occupier.listen()
        busy = occupier.getsockname()[1]
        ports = {"prefect_port": free_port(), "mlflow_port": free_port()}
        ports["prefect_port" if flag == "--prefect-port" else "mlflow_port"] = busy
        with pytest.raises(StemmaError) as raised:
            start_services(tmp_path, **ports)
    assert raised.value.headline == (f"127.0.0.1:{busy} is in use by another process; pass {flag}")
    assert not (tmp_path / ".stemma" / "services" / "prefect.json").exists()


def test_another_project_cannot_take_the_running_ports(running: Running, tmp_path: Path) -> None:
    with pytest.raises(StemmaError, match=f"127.0.0.1:{running.prefect_port} is in use"):
        start_services(tmp_path, prefect_port=running.prefect_port, mlflow_port=free_port())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"mlflow_database_url": "mysql://u:secret@db/x"},
            "--mlflow-database-url mysql://u:***@db/x: must be a PostgreSQL URL",
        ),
        (
            {
                "prefect_database_url": "postgresql://u@db:5432/stemma",
                "mlflow_database_url": "postgresql+psycopg2://u@db:5432/stemma",
            },
            "Prefect and MLflow cannot share one database",
        ),
        ({"prefect_port": 4242, "mlflow_port": 4242}, "both servers were given port 4242"),
        ({"prefect_port": 0}, "--prefect-port 0: must be between 1 and 65535"),
    ],
    ids=["not-postgres", "shared-database", "same-port", "bad-port"],
)
def test_bad_settings_are_refused_before_anything_starts(
    arguments: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(StemmaError) as raised:
        start_services(tmp_path, **arguments)
    assert any(detail.startswith(message) for detail in raised.value.details), raised.value.details
    assert not (tmp_path / ".stemma" / "services").exists()


def _processes_mentioning(port: int) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            if str(port).encode() in arguments and _pid_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def test_start_timeout_stops_what_it_started_and_shows_the_log(tmp_path: Path) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    with pytest.raises(StemmaError) as raised:
        start_services(tmp_path, prefect_port=prefect_port, mlflow_port=mlflow_port, timeout_s=0.2)
    assert "server was not healthy after 0.2 s; its log says:" in raised.value.headline
    assert raised.value.details[-1].startswith("(full log: ")
    assert not list((tmp_path / ".stemma" / "services").glob("*.json"))
    assert _processes_mentioning(prefect_port) == []
    assert _processes_mentioning(mlflow_port) == []


def test_server_that_exits_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    # Nothing listens on this port, so Prefect cannot reach its database and exits.
    database_url = f"postgresql://stemma:secret@127.0.0.1:{free_port()}/prefect"
    prefect_port, mlflow_port = free_port(), free_port()
    with pytest.raises(StemmaError) as raised:
        start_services(
            tmp_path,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            prefect_database_url=database_url,
            timeout_s=START_TIMEOUT_S,
        )
    assert raised.value.headline == "the prefect server exited while starting; its log says:"
    assert any("Application startup failed" in line for line in raised.value.details)
    assert not list((tmp_path / ".stemma" / "services").glob("*.json"))
    assert _processes_mentioning(mlflow_port) == []  # the healthy one is stopped too


@pytest.mark.parametrize("content", ["dead-pid", "garbage"], ids=["dead-pid", "unreadable"])
def test_stale_state_file_is_cleaned(content: str, tmp_path: Path) -> None:
    state = tmp_path / ".stemma" / "services"
    state.mkdir(parents=True)
    record_path = state / "mlflow.json"
    if content == "dead-pid":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        record = {"pid": dead.pid, "port": 5999, "command": [sys.executable], "data": ""}
        record_path.write_text(json.dumps(record))
    else:
        record_path.write_text("{not json")
    statuses = service_status(tmp_path)
    assert [(s.name, s.pid) for s in statuses] == [("prefect", None), ("mlflow", None)]
    assert not record_path.exists()
    assert "MLflow UI: not running" in run_status(tmp_path)
    assert run_down(tmp_path) == "no Stemma servers are running for this project"


def test_state_layout_matches_the_embedded_tracking_store() -> None:
    from stemma.components.platform import tracking

    assert services_module.STATE_DIR == tracking.STATE_DIR
    assert services_module.MLFLOW_DB_NAME == tracking.LOCAL_DB_NAME
    assert services_module.MLFLOW_ARTIFACTS_DIR == tracking.LOCAL_ARTIFACTS_DIR


def test_down_stops_both_and_frees_the_ports(running: Running) -> None:
    # Last test of the module: it stops the shared servers.
    pids = [s.pid for s in running.services]
    report = run_down(running.root)
    assert report.splitlines() == [
        f"stopped prefect (pid {pids[0]}, port {running.prefect_port})",
        f"stopped mlflow (pid {pids[1]}, port {running.mlflow_port})",
    ]
    assert not any(_pid_alive(pid) for pid in pids)
    assert _port_free(running.prefect_port) and _port_free(running.mlflow_port)
    assert [s.pid for s in service_status(running.root)] == [None, None]
    assert "Prefect UI: not running" in run_status(running.root)
    assert run_down(running.root) == "no Stemma servers are running for this project"
