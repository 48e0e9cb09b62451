"""What one command sets up and tears down: the environment of an embedded run, the
temporary Prefect server, the server watch, and a quiet console."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stemma.components.errors import StemmaError

#: Loggers the console hears only above these levels (without --debug), while a command runs:
#: urllib3 logs each of MLflow's retries (the server watch says it once, in a sentence);
#: GX announces each temporary docs folder at INFO (the flow reports what matters).
QUIET_LOGGERS = {"urllib3.connectionpool": logging.ERROR, "great_expectations": logging.WARNING}
#: How Prefect's log lines of a failed task or flow run begin (the CLI reports the error).
FAILED_STATES = ("Finished in state Failed", "Finished in state Crashed")
#: Settings of Prefect's console handler and of MLflow's loggers, at WARNING unless -v.
CONSOLE_LEVELS = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "MLFLOW_LOGGING_LEVEL")


class Session:
    """What one command started and must stop: a temporary Prefect server, a server watch."""

    def __init__(self) -> None:
        self.cleanup = contextlib.ExitStack()
        self.prefect_server: Any = None  # lifecycle.TemporaryPrefectServer, once started
        self.watch: Any = None  # outages.ServerWatch, once watching
        self.servers: list[Any] = []  # outages.Server: what the command talks to
        self.wait_s = 0.0  # how long a server may be down before the command stops
        #: Whether MLflow, like Prefect, goes to the server `stemma up` runs (when it runs).
        self.mlflow_from_services = True

    def outage(self, error: BaseException | None = None) -> StemmaError | None:
        """The outage that stopped the command: the watch's verdict, or a server it finds
        down when ``error`` (a failed request, most likely) ended the command."""
        if self.watch is None:
            return None
        if self.watch.expired is not None:
            return self.watch.expired
        down = self.watch.down()
        if error is not None and down:
            from stemma.components.platform.outages import outage_error

            return outage_error(down[0], self.watch.wait_s, str(error)[:200], waited=False)
        return None


@contextlib.contextmanager
def quiet_console(debug: bool, *, verbose: bool = False) -> Iterator[None]:
    """For the command's duration (not with ``--debug``): no warnings, and the
    :data:`QUIET_LOGGERS` at their levels; everything is restored when it ends.

    Without ``verbose``, Prefect's console handler and MLflow's loggers print warnings and
    errors only (set before either library configures its logging, so for this process and
    the ones it starts). The Prefect server still receives every log line of a flow run:
    its UI shows them all.
    """
    if debug:
        yield
        return
    saved = {variable: os.environ.get(variable) for variable in CONSOLE_LEVELS}
    if not verbose:
        for variable in CONSOLE_LEVELS:
            os.environ.setdefault(variable, "WARNING")
    try:
        with warnings.catch_warnings(), logger_levels(QUIET_LOGGERS):
            warnings.simplefilter("ignore")
            yield
    finally:  # the next command in this process decides for itself
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


@contextlib.contextmanager
def logger_levels(levels: Mapping[str, int]) -> Iterator[None]:
    """The loggers at (at least) these levels for the block; their own levels after it."""
    loggers = {name: logging.getLogger(name) for name in levels}
    saved = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(max(levels[name], logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(saved[name])


def check_servers(args: argparse.Namespace, *, prefect: bool = True) -> None:
    """Before any work: check that the servers the command uses answer (waiting up to
    --server-wait for one that does not) and bound MLflow's HTTP retries to that wait.

    The temporary Prefect server is not checked here: it is still starting, and
    :func:`watch_servers` waits for it.
    """
    from stemma.components.platform import outages

    session: Session = args.session
    session.wait_s = outages.wait_seconds(args.server_wait)
    temporary = session.prefect_server.api_url if session.prefect_server else None
    session.servers = [
        server for server in outages.servers_in_use() if prefect or server.name != "Prefect"
    ]
    outages.wait_for_servers(
        [server for server in session.servers if server.url != temporary], session.wait_s
    )
    for name, value in outages.mlflow_retry_environment(session.wait_s).items():
        os.environ[name] = value


def watch_servers(args: argparse.Namespace) -> None:
    """Before the first request: wait for the temporary Prefect server to start, then watch
    every server the command uses until it ends (see :func:`check_servers`)."""
    from stemma.components.platform import outages

    session: Session = args.session
    if session.prefect_server is not None:
        session.prefect_server.wait_until_ready(
            float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        )
    if session.watch is None:
        session.watch = session.cleanup.enter_context(
            outages.ServerWatch(session.servers, session.wait_s)
        )


def prepare_environment(root: Path, *, debug: bool = False, session: Session | None = None) -> None:
    """Defaults for an embedded run, each overridable from the environment.

    Prefect runs ephemerally with its home under the project (``.stemma/prefect``) unless
    ``PREFECT_API_URL`` points at a server. A fresh ephemeral database takes ~17 s to
    migrate, close to Prefect's 20 s start-up limit, so the limit is raised.

    With a ``session`` (the CLI's), the temporary Prefect server is started here, by Stemma
    rather than by Prefect's first flow, so that it starts while the command imports its
    libraries and dies with the command even when the command is killed (Linux); it is
    stopped when the process exits, after Prefect's own exit handlers have sent their last
    logs. ``PREFECT_API_URL`` then points at it, for this process and its children.
    """
    state = root / ".stemma"
    if session is not None:
        use_running_services(root, mlflow=session.mlflow_from_services)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
        # Prefect's SQLite database cannot be created in a folder that does not exist.
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        if session is not None and session.prefect_server is None and ephemeral_allowed():
            _start_temporary_server(session)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at <tracking URI>" with the URI's password in it; the
    # summaries name the store with its credentials masked instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not debug:  # child processes (Prefect's, torchrun's) stay as quiet as this one
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def use_running_services(root: Path, *, mlflow: bool = True) -> list[str]:
    """Point the command at the servers ``stemma up`` runs for the project at ``root``.

    Each of ``PREFECT_API_URL`` and (with ``mlflow``) ``MLFLOW_TRACKING_URI`` that the
    environment leaves unset is set to the matching server when that server runs and
    answers: its flow runs then show in the Prefect UI (the links Stemma records resolve),
    and no temporary Prefect server is started. A variable already set is left alone.
    Nothing is read when ``stemma up`` never ran here.

    Returns:
        One line per server put to use (printed to stderr), e.g. ``Prefect at http://...``.
    """
    if not (root / ".stemma" / "services").is_dir():
        return []
    from stemma.components.platform.services import MLFLOW, PREFECT, service_status

    variables = {PREFECT: "PREFECT_API_URL", MLFLOW: "MLFLOW_TRACKING_URI"}
    titles = {PREFECT: "Prefect", MLFLOW: "MLflow"}
    wanted = {name for name, variable in variables.items() if not os.environ.get(variable)}
    if not mlflow:
        wanted.discard(MLFLOW)
    if not wanted:
        return []
    used = []
    for service in service_status(root):
        if service.name not in wanted or service.pid is None:
            continue
        if not service.healthy:
            print(
                f"note: the {titles[service.name]} server of `stemma up` ({service.url}) does not "
                "answer; this command does without it",
                file=sys.stderr,
            )
            continue
        os.environ[variables[service.name]] = (
            f"{service.url}/api" if service.name == PREFECT else service.url
        )
        used.append(f"{titles[service.name]} at {service.url}")
    if used:
        print(f"using the servers of `stemma up`: {', '.join(used)}", file=sys.stderr)
    return used


def _start_temporary_server(session: Session) -> None:
    from stemma.components.platform.lifecycle import start_temporary_prefect_server

    server = start_temporary_prefect_server(Path(os.environ["PREFECT_HOME"]))
    if server is None:
        return
    # Registered before Prefect is imported, so it runs after Prefect's own exit handlers
    # (which flush logs and events to this server).
    atexit.register(server.stop)
    session.prefect_server = server
    os.environ["PREFECT_API_URL"] = server.api_url
    # The temporary server has no UI: no "View at" link to a page that is not there.
    os.environ.setdefault("PREFECT_UI_URL", "")


def ephemeral_allowed() -> bool:
    """Whether Prefect would start an ephemeral server here: not turned off, and no API URL
    in the profile of the Prefect home in use."""
    allowed = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    if allowed.strip().lower() in {"0", "false", "no", "off"}:
        return False
    if os.environ.get("PREFECT_PROFILES_PATH") or os.environ.get("PREFECT_PROFILE"):
        return False
    profiles = Path(os.environ["PREFECT_HOME"]) / "profiles.toml"
    return not (profiles.exists() and "PREFECT_API_URL" in profiles.read_text(errors="replace"))


class _DropReportedErrors(logging.Filter):
    """Drops what the CLI reports itself: a logged exception (with its traceback) and the
    failed or crashed state Prefect logs after it (``Finished in state Failed(...)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith(FAILED_STATES))


def quiet_known_errors(debug: bool) -> None:
    """Keep the errors the CLI reports out of Prefect's console logs: it prints each once.

    Prefect logs every failed task and flow with the exception and its traceback, then the
    failed state again. The CLI prints one screen instead: the message of an error Stemma
    raised on purpose (a broken config, a failed check), or one line for anything else with
    ``--debug`` for the traceback. Only terminal handlers are filtered: the Prefect server
    (and its UI) still receives every record. ``--debug`` keeps everything.
    """
    if debug:
        return
    loggers = [
        logging.getLogger(),
        *[
            logger
            for name, logger in logging.root.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and name.startswith("prefect")
        ],
    ]
    for logger in loggers:
        for handler in logger.handlers:
            terminal = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if terminal and not any(isinstance(f, _DropReportedErrors) for f in handler.filters):
                handler.addFilter(_DropReportedErrors())
