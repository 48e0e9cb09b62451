"""Local Prefect and MLflow servers on loopback: start, stop, and say what runs where.

``stemma up`` runs ``prefect server start`` and ``mlflow server`` from the project's
virtual environment as detached processes (each in its own session, so the command returns
and ``stemma down`` can stop the whole process group). Both bind to 127.0.0.1 only. Their
data stays under the project: Prefect's home (and SQLite database) in
``.stemma/prefect-server``, MLflow's store in ``.stemma/mlflow.db`` (the same file the
embedded runs use, so runs logged before ``stemma up`` show in the UI) and its artifacts in
``.stemma/mlartifacts``. Either store can be a PostgreSQL database instead.

What was started is recorded in ``.stemma/services/<name>.json`` (pid, port, command, start
time) beside the server's log ``.stemma/services/<name>.log``; that record is how a second
``stemma up`` knows the servers already run and how ``stemma down`` finds them.

Only the standard library is used, so ``stemma status`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from stemma.components.errors import StemmaError
from stemma.components.platform.outages import check_health
from stemma.components.platform.redaction import redact_url

#: Every server binds to loopback only: these are a developer's local servers.
HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
#: A fresh Prefect database migrates for ~16 s on a 2-core machine; leave ample room.
DEFAULT_START_TIMEOUT_S = 120.0
#: How long ``stop_services`` waits after SIGTERM before it sends SIGKILL.
STOP_GRACE_S = 10.0
#: Lines of a server's log shown when it fails to start.
LOG_TAIL_LINES = 10
#: Pause between two rounds of health checks while waiting for the servers.
POLL_INTERVAL_S = 0.5
#: Time limit of one health request.
HEALTH_REQUEST_TIMEOUT_S = 2.0
#: MLflow's server runs its jobs (GenAI scorers, evaluations and prompt optimization;
#: nothing Stemma uses) in a job runner and several huey consumers, each a Python process
#: that imports mlflow, which slows every start on a small machine. Off unless the user
#: sets the variable.
JOB_EXECUTION_VARIABLE = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"

# Kept equal to tracking.STATE_DIR / LOCAL_DB_NAME / LOCAL_ARTIFACTS_DIR (a test checks it):
# importing tracking would import mlflow and cost ~1.5 s on every `stemma status`.
STATE_DIR = ".stemma"
MLFLOW_DB_NAME = "mlflow.db"
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
PREFECT_HOME_DIR = "prefect-server"
SERVICES_DIR = "services"

PREFECT = "prefect"
MLFLOW = "mlflow"
#: Service names in the order they are started and reported.
SERVICE_NAMES = (PREFECT, MLFLOW)
#: The CLI flag that sets each service's port, named in "port in use" errors.
PORT_FLAGS = {PREFECT: "--prefect-port", MLFLOW: "--mlflow-port"}
#: The CLI flag that sets each service's database URL.
DATABASE_FLAGS = {PREFECT: "--prefect-database-url", MLFLOW: "--mlflow-database-url"}


@dataclass(frozen=True)
class Service:
    """One local server as Stemma knows it.

    Attributes:
        name: ``"prefect"`` or ``"mlflow"``.
        host: the address it binds to (always 127.0.0.1).
        port: its port (the recorded one when it runs, else the default).
        url: the base URL of its UI (Prefect's API is ``<url>/api``).
        pid: the process id of the server (leader of its process group), None when not running.
        healthy: whether its health endpoint answered as expected.
        log_path: the file its output goes to.
        data: where its store lives (folder or database URL, password hidden).
        already_running: True when ``start_services`` found it running and left it alone.
    """

    name: str
    host: str
    port: int
    url: str
    pid: int | None
    healthy: bool
    log_path: Path
    data: str
    already_running: bool = False


# ---------------------------------------------------------------------------------------
# Public functions


def start_services(
    root: Path,
    *,
    prefect_port: int = DEFAULT_PREFECT_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    prefect_database_url: str | None = None,
    mlflow_database_url: str | None = None,
    mlflow_artifacts_destination: str | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
) -> list[Service]:
    """Start the Prefect and MLflow servers of the project, and wait until both are healthy.

    A server already recorded as running (live pid, healthy) is left alone and reported
    with ``already_running=True``; a record whose process is gone is removed first.

    Args:
        root: the project root; state goes under ``<root>/.stemma``.
        prefect_port: port of the Prefect server (UI and API).
        mlflow_port: port of the MLflow server.
        prefect_database_url: a PostgreSQL URL for Prefect's database; None uses SQLite in
            ``.stemma/prefect-server``.
        mlflow_database_url: a PostgreSQL URL for MLflow's store; None uses
            ``.stemma/mlflow.db``. Must not be the same database as Prefect's (both keep
            their schema version in a table named ``alembic_version``).
        mlflow_artifacts_destination: where the MLflow server stores artifacts, e.g.
            ``s3://bucket/path`` (S3 settings such as ``MLFLOW_S3_ENDPOINT_URL`` and
            ``AWS_*`` come from the environment); None uses ``.stemma/mlartifacts``.
        timeout_s: how long to wait for both servers to answer their health checks.

    Returns:
        Both services, Prefect first.

    Raises:
        StemmaError: a bad database URL, a port in use by another process, a missing
            executable, or a server that exited or stayed unhealthy past ``timeout_s``
            (then everything this call started is stopped again and the log's last lines
            are in the details).
    """
    root = Path(root).resolve()
    _check_database_urls(prefect_database_url, mlflow_database_url)
    _check_ports(prefect_port, mlflow_port)
    launches = {
        PREFECT: _prefect_launch(root, prefect_port, prefect_database_url),
        MLFLOW: _mlflow_launch(
            root, mlflow_port, mlflow_database_url, mlflow_artifacts_destination
        ),
    }
    _services_dir(root).mkdir(parents=True, exist_ok=True)

    found = {name: _read_live_record(root, name) for name in SERVICE_NAMES}
    running = {name: record for name, record in found.items() if record is not None}
    # Check every port before starting anything, so a conflict leaves nothing behind.
    for name, launch in launches.items():
        if name not in running and not _port_is_free(launch.port):
            raise StemmaError(
                f"{HOST}:{launch.port} is in use by another process; pass {PORT_FLAGS[name]}",
                [f"{name} needs a free port on {HOST}; pick another one or stop that process"],
            )

    started: dict[str, dict] = {}
    try:
        for name, launch in launches.items():
            if name not in running:
                started[name] = _launch(root, launch)
        _wait_until_healthy(root, {**running, **started}, timeout_s)
    except BaseException:
        for name, record in started.items():
            _terminate(record["pid"])
            _state_path(root, name).unlink(missing_ok=True)
        raise
    records = {**running, **started}
    return [
        _service_from_record(
            root, name, records[name], healthy=True, already_running=name in running
        )
        for name in SERVICE_NAMES
    ]


def stop_services(root: Path) -> list[str]:
    """Stop the project's servers: SIGTERM to each process group, SIGKILL after 10 s.

    Args:
        root: the project root.

    Returns:
        One line per server stopped (``"prefect (pid 123, port 4200)"``); empty when
        nothing was running. Stale records are removed either way.
    """
    root = Path(root).resolve()
    stopped = []
    for name in SERVICE_NAMES:
        record = _read_live_record(root, name)
        if record is None:
            continue
        _terminate(record["pid"])
        _state_path(root, name).unlink(missing_ok=True)
        stopped.append(f"{name} (pid {record['pid']}, port {record['port']})")
    return stopped


def service_status(root: Path) -> list[Service]:
    """What runs where: both services, Prefect first, each with its pid and health.

    A record whose process is gone is removed and the service reported as not running.
    """
    root = Path(root).resolve()
    services = []
    for name in SERVICE_NAMES:
        record = _read_live_record(root, name)
        if record is None:
            services.append(_stopped_service(root, name))
        else:
            healthy = _is_healthy(name, record["port"])
            services.append(_service_from_record(root, name, record, healthy=healthy))
    return services


def environment_for(services: Iterable[Service]) -> dict[str, str]:
    """The environment variables that point Stemma (and Prefect, MLflow) at these servers."""
    environment = {}
    for service in services:
        if service.name == PREFECT:
            environment["PREFECT_API_URL"] = f"{service.url}/api"
        elif service.name == MLFLOW:
            environment["MLFLOW_TRACKING_URI"] = service.url
    return environment


# ---------------------------------------------------------------------------------------
# What to run


@dataclass(frozen=True)
class _Launch:
    name: str
    port: int
    command: tuple[str, ...]
    environment: Mapping[str, str]
    data: str


def _executable(name: str) -> str:
    # The servers must come from the same environment as Stemma, not whatever is on PATH.
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StemmaError(
            f"{path} does not exist: cannot start the {name} server",
            [f"install Stemma's dependencies into {Path(sys.executable).parent.parent}"],
        )
    return str(path)


def _child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    environment = dict(os.environ)
    # A client setting pointing elsewhere must not leak into the servers themselves.
    for variable in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        environment.pop(variable, None)
    environment.update(extra)
    return environment


def _prefect_launch(root: Path, port: int, database_url: str | None) -> _Launch:
    home = root / STATE_DIR / PREFECT_HOME_DIR
    home.mkdir(parents=True, exist_ok=True)
    extra = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
        # The UI calls the API at this address; Prefect's default is port 4200 whatever
        # port the server listens on.
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
    }
    data = str(home)
    if database_url:
        extra["PREFECT_API_DATABASE_CONNECTION_URL"] = _with_driver(database_url, "asyncpg")
        data = redact_url(database_url)
    command = (_executable(PREFECT), "server", "start", "--host", HOST, "--port", str(port))
    return _Launch(PREFECT, port, command, _child_environment(extra), data)


def _mlflow_launch(
    root: Path, port: int, database_url: str | None, artifacts_destination: str | None = None
) -> _Launch:
    state = root / STATE_DIR
    artifacts: Path | str
    if artifacts_destination:
        artifacts = artifacts_destination
    else:
        artifacts = state / MLFLOW_ARTIFACTS_DIR
        artifacts.mkdir(parents=True, exist_ok=True)
    store = (
        _with_driver(database_url, None) if database_url else f"sqlite:///{state / MLFLOW_DB_NAME}"
    )
    # The store URI goes through the environment so a password never shows in `ps`.
    extra = {"MLFLOW_BACKEND_STORE_URI": store}
    if JOB_EXECUTION_VARIABLE not in os.environ:
        extra[JOB_EXECUTION_VARIABLE] = "false"
    # One worker: ~12 s to start instead of ~22 s with the default four (STACK.md).
    command = (
        _executable(MLFLOW),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--artifacts-destination",
        str(artifacts),
    )
    data = f"{redact_url(store)}, artifacts in {artifacts}"
    return _Launch(MLFLOW, port, command, _child_environment(extra), data)


def _check_database_urls(prefect_url: str | None, mlflow_url: str | None) -> None:
    problems = []
    for name, url in ((PREFECT, prefect_url), (MLFLOW, mlflow_url)):
        if url and not urlsplit(url).scheme.startswith("postgresql"):
            problems.append(
                f"{DATABASE_FLAGS[name]} {redact_url(url)}: must be a PostgreSQL URL "
                "(postgresql://user:password@host:5432/database); leave it out for SQLite"
            )
    if prefect_url and mlflow_url and _same_database(prefect_url, mlflow_url):
        problems.append(
            "Prefect and MLflow cannot share one database (both keep their schema version "
            "in a table named alembic_version): give each its own database"
        )
    if mlflow_url and not _module_available("psycopg2"):
        problems.append(
            f"{DATABASE_FLAGS[MLFLOW]}: MLflow needs the psycopg2 driver for PostgreSQL: "
            "pip install psycopg2-binary"
        )
    if problems:
        raise StemmaError("cannot start the local servers with these database URLs", problems)


def _check_ports(prefect_port: int, mlflow_port: int) -> None:
    problems = [
        f"{PORT_FLAGS[name]} {port}: must be between 1 and 65535"
        for name, port in ((PREFECT, prefect_port), (MLFLOW, mlflow_port))
        if not 0 < port < 65536
    ]
    if prefect_port == mlflow_port:
        problems.append(f"both servers were given port {prefect_port}: give each its own")
    if problems:
        raise StemmaError("cannot start the local servers on these ports", problems)


def _module_available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _with_driver(url: str, driver: str | None) -> str:
    """``url`` with its scheme set to ``postgresql`` or ``postgresql+<driver>``."""
    parts = urlsplit(url)
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return urlunsplit(parts._replace(scheme=scheme))


def _same_database(first: str, second: str) -> bool:
    a, b = urlsplit(first), urlsplit(second)
    return (a.hostname, a.port, a.path) == (b.hostname, b.port, b.path)


# ---------------------------------------------------------------------------------------
# Processes and their records


def _services_dir(root: Path) -> Path:
    return root / STATE_DIR / SERVICES_DIR


def _state_path(root: Path, name: str) -> Path:
    return _services_dir(root) / f"{name}.json"


def _log_path(root: Path, name: str) -> Path:
    return _services_dir(root) / f"{name}.log"


def _launch(root: Path, launch: _Launch) -> dict:
    log_path = _log_path(root, launch.name)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"--- {started} {' '.join(launch.command)}\n")
        log.flush()
        # A new session detaches the server from the terminal (stemma up returns) and makes
        # it leader of a process group, so stop can signal its workers too.
        process = subprocess.Popen(
            launch.command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(launch.environment),
            cwd=root,
            start_new_session=True,
        )
    record = {
        "name": launch.name,
        "pid": process.pid,
        "port": launch.port,
        "command": list(launch.command),
        "started": started,
        "data": launch.data,
    }
    _state_path(root, launch.name).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _read_live_record(root: Path, name: str) -> dict | None:
    """The record of ``name`` when its process still runs; a stale record is removed."""
    path = _state_path(root, name)
    try:
        record = json.loads(path.read_text())
        pid, command = int(record["pid"]), record["command"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # unreadable: nothing can be trusted in it
        return None
    if _is_alive(pid) and _runs_command(pid, command):
        return record
    path.unlink(missing_ok=True)
    return None


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status when it is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_alive(pid: int, *, group: bool = False) -> bool:
    """Whether process ``pid`` (or any process of the group it leads) still runs."""
    _reap(pid)
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if group:  # only the leader, dead but not yet collected by its parent, may be left
        return _is_alive(pid) or _group_members(pid) > 0
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _runs_command(pid: int, command: Sequence[str]) -> bool:
    """Whether ``pid`` still runs the recorded command, not a later process with its pid."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    return bool(command) and command[0] in arguments.split("\0")


def _group_members(pgid: int) -> int:
    members = 0
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(entry.name) != pgid and int(fields[2]) == pgid and fields[0] != "Z":
            members += 1
    return members


def _terminate(pid: int) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL it if it outlives the grace time."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _is_alive(pid, group=True):
                return
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------
# Health


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Same option the servers set: a port left in TIME_WAIT by a stopped server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _is_healthy(name: str, port: int) -> bool:
    if name == PREFECT:
        url, expected = f"http://{HOST}:{port}/api/health", "true"
    else:
        url, expected = f"http://{HOST}:{port}/health", "OK"
    return check_health(url, timeout_s=HEALTH_REQUEST_TIMEOUT_S, expected=expected) is None


def _wait_until_healthy(root: Path, records: Mapping[str, dict], timeout_s: float) -> None:
    """Poll every server's health until all answer; fail fast when one exits."""
    waiting = dict(records)
    deadline = time.monotonic() + timeout_s
    while waiting:
        for name, record in list(waiting.items()):
            if _is_healthy(name, record["port"]):
                del waiting[name]
            elif not _is_alive(record["pid"]):
                raise StemmaError(
                    f"the {name} server exited while starting; its log says:",
                    _log_tail(root, name),
                )
        if not waiting:
            return
        if time.monotonic() > deadline:
            name = next(iter(waiting))
            raise StemmaError(
                f"the {name} server was not healthy after {timeout_s:g} s; its log says:",
                _log_tail(root, name),
            )
        time.sleep(POLL_INTERVAL_S)


def _log_tail(root: Path, name: str) -> list[str]:
    path = _log_path(root, name)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [f"(no log at {path})"]
    return [*lines[-LOG_TAIL_LINES:], f"(full log: {path})"]


# ---------------------------------------------------------------------------------------
# Reports


def _service_from_record(
    root: Path, name: str, record: Mapping, *, healthy: bool, already_running: bool = False
) -> Service:
    port = int(record["port"])
    return Service(
        name=name,
        host=HOST,
        port=port,
        url=f"http://{HOST}:{port}",
        pid=None if record["pid"] is None else int(record["pid"]),
        healthy=healthy,
        log_path=_log_path(root, name),
        data=str(record.get("data", "")),
        already_running=already_running,
    )


def _stopped_service(root: Path, name: str) -> Service:
    if name == PREFECT:
        port, data = DEFAULT_PREFECT_PORT, str(root / STATE_DIR / PREFECT_HOME_DIR)
    else:
        port, data = DEFAULT_MLFLOW_PORT, f"sqlite:///{root / STATE_DIR / MLFLOW_DB_NAME}"
    return _service_from_record(
        root, name, {"port": port, "pid": None, "data": data}, healthy=False
    )
