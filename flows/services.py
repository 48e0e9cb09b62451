"""`stemma up`, `stemma down`, `stemma status`: the project's local Prefect and MLflow servers.

Plain functions that call :mod:`stemma.components.platform.services` and return the text the CLI
prints; no flow runs here (the servers must exist before flows can use them).
"""

from __future__ import annotations

from pathlib import Path

from stemma.components.platform.services import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_PREFECT_PORT,
    DEFAULT_START_TIMEOUT_S,
    MLFLOW,
    PREFECT,
    Service,
    environment_for,
    service_status,
    start_services,
    stop_services,
)

_TITLES = {PREFECT: "Prefect UI", MLFLOW: "MLflow UI"}


def run_up(
    root: Path,
    *,
    prefect_port: int = DEFAULT_PREFECT_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    prefect_database_url: str | None = None,
    mlflow_database_url: str | None = None,
    timeout_s: float = DEFAULT_START_TIMEOUT_S,
) -> str:
    """Start both servers (or find them running) and report where they are.

    Returns:
        The report: one line per server (URL, pid, data), then the ``export`` lines that
        point other tools (or another project's commands) at these servers.

    Raises:
        StemmaError: see :func:`stemma.components.platform.services.start_services`.
    """
    services = start_services(
        root,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        prefect_database_url=prefect_database_url,
        mlflow_database_url=mlflow_database_url,
        timeout_s=timeout_s,
    )
    lines = [_describe(service) for service in services]
    lines += [
        "",
        "`stemma run` and `stemma demo` in this project use them without settings (a variable",
        "already set wins); to point other tools or another project at them:",
    ]
    lines += [f"  export {name}={value}" for name, value in environment_for(services).items()]
    lines += ["Stop them with `stemma down`."]
    return "\n".join(lines)


def run_down(root: Path) -> str:
    """Stop both servers; the report says what was stopped, or that nothing ran."""
    stopped = stop_services(root)
    if not stopped:
        return "no Stemma servers are running for this project"
    return "\n".join(f"stopped {line}" for line in stopped)


def run_status(root: Path) -> str:
    """One line per server: running where (URL, pid, health, data) or not running; then a
    warning for each registered model whose champion alias was moved outside Stemma."""
    services = service_status(root)
    lines = [_describe(service) for service in services]
    return "\n".join(lines + champion_warnings(root, services))


def champion_warnings(root: Path, services: list[Service]) -> list[str]:
    """Champion aliases moved outside Stemma, in the store the project's flows use (when it
    exists and answers: an MLflow server `stemma up` started must be healthy)."""
    import os

    from stemma.components.platform import tracking

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    local = root / tracking.STATE_DIR / tracking.LOCAL_DB_NAME
    ours = next((service for service in services if service.name == MLFLOW), None)
    if (not uri and not local.is_file()) or (ours is not None and ours.pid and not ours.healthy):
        return []
    from mlflow import MlflowClient

    from stemma.components.registry.promotion import moved_outside

    client = MlflowClient(tracking_uri=tracking.configure_tracking(root))
    found = (moved_outside(client, model.name) for model in client.search_registered_models())
    return [f"warning: {problem.render()}" for problem in found if problem is not None]


def _describe(service: Service) -> str:
    title = _TITLES[service.name]
    if service.pid is None:
        return f"{title}: not running (log {service.log_path})"
    state = "healthy" if service.healthy else "NOT answering its health check"
    if service.already_running:
        state = f"already running, {state}"
    return (
        f"{title}: {service.url} ({state}, pid {service.pid}); "
        f"data: {service.data}; log: {service.log_path}"
    )
