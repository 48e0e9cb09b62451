"""Server outages: one clear message, a bounded wait, then a resumable stop.

A command that talks to an MLflow server (an ``http(s)://`` tracking URI) or a Prefect
server (``PREFECT_API_URL``) checks each one's health endpoint before it starts work
(:func:`wait_for_servers`) and keeps checking while it works (:class:`ServerWatch`). A
server that stops answering is reported once on stderr
(``MLflow at http://127.0.0.1:5000 is not answering; retrying for 120 s``); if it is
still down when the wait is over, the command is interrupted the way SIGTERM would
interrupt it, so a training run keeps its checkpoint, and the CLI reports a
:class:`ServerOutageError`.

MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_*``) are set to outlast that wait unless
the user set them (:func:`mlflow_retry_environment`), so the wait, not a retry budget of
several minutes, decides when the command stops.

Only the standard library is used.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from stemma.components.errors import SpecError, StemmaError
from stemma.components.platform.lifecycle import interrupt_main_thread
from stemma.components.platform.redaction import redact_url, without_credentials

#: Environment variable that sets how long a command waits for a server that stopped
#: answering (seconds); the CLI option ``--server-wait`` wins over it.
WAIT_ENV = "STEMMA_SERVER_WAIT_S"
DEFAULT_WAIT_S = 120.0
#: Bounds of the wait, so a typo cannot make a command hang for days.
MIN_WAIT_S = 1.0
MAX_WAIT_S = 86_400.0
#: Pause between two health checks of the watch.
POLL_S = 3.0
#: Failed checks in a row before a server counts as down: one lost request is no outage.
FAILURES_BEFORE_DOWN = 2
#: Time limit of one health request.
HEALTH_TIMEOUT_S = 3.0
#: MLflow's retries outlast the wait by this much, so the wait stops the command first.
MLFLOW_RETRY_MARGIN_S = 30.0
#: MLflow caps its retries at 10 (``_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT``).
MLFLOW_MAX_RETRIES = 10
#: Upper bound of one MLflow request's time limit while a wait is configured.
MLFLOW_REQUEST_TIMEOUT_S = 120


class ServerOutageError(StemmaError):
    """A server the command needs did not answer within the configured wait."""

    exit_code = 69  # EX_UNAVAILABLE in sysexits.h: "a service is unavailable"


@dataclass(frozen=True)
class Server:
    """A server a command talks to.

    Attributes:
        name: ``"MLflow"`` or ``"Prefect"``.
        url: its address as the user configured it, credentials masked.
        health_url: the URL whose answer says it is up.
    """

    name: str
    url: str
    health_url: str


def wait_seconds(option: float | None, environ: Mapping[str, str] | None = None) -> float:
    """The wait for a server that is down: the CLI option, else ``STEMMA_SERVER_WAIT_S``, else 120 s.

    Raises:
        SpecError: the value is not a number between 1 s and a day.
    """
    environ = os.environ if environ is None else environ
    source, raw = (
        ("--server-wait", option) if option is not None else (WAIT_ENV, environ.get(WAIT_ENV))
    )
    if raw is None or raw == "":
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not MIN_WAIT_S <= value <= MAX_WAIT_S:
        raise SpecError(
            f"{source}: must be a number of seconds between {MIN_WAIT_S:g} and {MAX_WAIT_S:g}",
            [f"got {raw!r}"],
        )
    return value


def servers_in_use(environ: Mapping[str, str] | None = None) -> list[Server]:
    """The servers the environment points at: MLflow over HTTP(S), Prefect's API."""
    environ = os.environ if environ is None else environ
    servers = []
    tracking = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if tracking.startswith(("http://", "https://")):
        base = tracking.rstrip("/")
        servers.append(Server("MLflow", redact_url(base), f"{without_credentials(base)}/health"))
    prefect = environ.get("PREFECT_API_URL", "").strip()
    if prefect:
        base = prefect.rstrip("/")
        servers.append(Server("Prefect", redact_url(base), f"{without_credentials(base)}/health"))
    return servers


def check_health(
    url: str, *, timeout_s: float = HEALTH_TIMEOUT_S, expected: str | None = None
) -> str | None:
    """None when the health endpoint ``url`` answers (with the body ``expected``, when
    given), else why not (one line)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if not 200 <= response.status < 300:
                return f"HTTP {response.status}"
            if expected is not None and response.read().decode().strip() != expected:
                return f"not the expected answer {expected!r}"
            return None
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except urllib.error.URLError as error:
        return redact_url(str(error.reason))
    except (OSError, ValueError) as error:  # timeouts, resets, an undecodable answer
        return redact_url(str(error) or type(error).__name__)


def not_answering_message(server: Server, wait_s: float) -> str:
    """The one line a user sees when a server stops answering."""
    return f"{server.name} at {server.url} is not answering; retrying for {wait_s:g} s"


def outage_error(
    server: Server,
    wait_s: float,
    reason: str | None,
    *,
    waited: bool = True,
    started: bool = True,
) -> ServerOutageError:
    """The one-screen error of a server still down after the wait.

    Args:
        server: the server.
        wait_s: the wait that passed.
        reason: the last failure seen (one line), if any.
        waited: False when a request failed before the wait was over.
        started: False when the command stopped before doing any work.
    """
    variable = "MLFLOW_TRACKING_URI" if server.name == "MLflow" else "PREFECT_API_URL"
    headline = (
        f"{server.name} at {server.url} did not answer for {wait_s:g} s; stopped"
        if waited
        else f"{server.name} at {server.url} is not answering; stopped"
    )
    return ServerOutageError(
        headline,
        [
            *([f"last error: {redact_url(reason)}"] if reason else []),
            (
                "a training run keeps its checkpoint: run the same command again once the "
                "server is back, and it resumes"
                if started
                else "nothing was started"
            ),
            f"start the server (`stemma up` starts both on loopback) or check {variable}",
            f"wait longer with --server-wait SECONDS or {WAIT_ENV}",
        ],
    )


def wait_for_servers(
    servers: list[Server],
    wait_s: float,
    report: Callable[[str], None] | None = None,
) -> None:
    """Return once every server answers; report once each that does not, and wait up to ``wait_s``.

    Raises:
        ServerOutageError: a server still did not answer after ``wait_s``.
    """
    report = report or _print_to_stderr
    deadline = time.monotonic() + wait_s
    for server in servers:
        reason = check_health(server.health_url)
        if reason is None:
            continue
        report(not_answering_message(server, wait_s))
        while reason is not None:
            if time.monotonic() >= deadline:
                raise outage_error(server, wait_s, reason, started=False)
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            reason = check_health(server.health_url)
        report(f"{server.name} at {server.url} answers again")


def mlflow_retry_environment(
    wait_s: float, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """MLflow's HTTP retry settings that outlast ``wait_s``, leaving out those the user set.

    MLflow sleeps ``factor * 2**(n-1)`` s before its n-th retry (the first retry at once),
    so ``max_retries`` retries with factor 1 wait about ``2**max_retries`` s in all.

    Returns:
        The variables to set, e.g. ``{"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "8", ...}``.
    """
    environ = os.environ if environ is None else environ
    budget = wait_s + MLFLOW_RETRY_MARGIN_S
    retries = min(MLFLOW_MAX_RETRIES, max(1, math.ceil(math.log2(budget + 2))))
    factor = max(1, math.ceil(budget / (2**retries - 2)))
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(min(MLFLOW_REQUEST_TIMEOUT_S, max(10, wait_s)))),
    }
    return {name: value for name, value in wanted.items() if not environ.get(name)}


#: Health URLs of the servers a running watch currently finds down (read by
#: :func:`is_down`, so code that ends a run does not wait on a server known to be gone).
_DOWN: set[str] = set()
_DOWN_LOCK = threading.Lock()


def is_down(url: str) -> bool:
    """Whether a running :class:`ServerWatch` finds the server at ``url`` down right now."""
    base = without_credentials(url.rstrip("/"))
    with _DOWN_LOCK:
        return any(health.startswith(base) for health in _DOWN)


class ServerWatch:
    """Checks the servers every few seconds while a command works, in a daemon thread.

    A server down for :data:`FAILURES_BEFORE_DOWN` checks in a row is reported once; one
    still down ``wait_s`` after its first failed check makes the watch interrupt the main
    thread (as SIGTERM would) and remember the outage in :attr:`expired`.

    Use it as a context manager; it stops when the block ends.
    """

    def __init__(
        self,
        servers: list[Server],
        wait_s: float,
        report: Callable[[str], None] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.servers = list(servers)
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.expired: ServerOutageError | None = None
        self._report = report or _print_to_stderr
        self._stop = threading.Event()
        self._down_at_exit: list[Server] | None = None
        self._thread = threading.Thread(target=self._run, name="stemma-server-watch", daemon=True)

    def __enter__(self) -> ServerWatch:
        if self.servers:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=HEALTH_TIMEOUT_S + 1)
        self._down_at_exit = self.down()
        with _DOWN_LOCK:
            for server in self.servers:
                _DOWN.discard(server.health_url)

    def down(self) -> list[Server]:
        """The servers this watch finds down right now (once stopped: when it stopped)."""
        if self._down_at_exit is not None:
            return list(self._down_at_exit)
        with _DOWN_LOCK:
            return [server for server in self.servers if server.health_url in _DOWN]

    def _run(self) -> None:
        failures = dict.fromkeys(self.servers, 0)
        since: dict[Server, float] = {}
        while not self._stop.wait(self.poll_s):
            for server in self.servers:
                reason = check_health(server.health_url)
                if self._stop.is_set():
                    return
                if reason is None:
                    if server in since:
                        self._report(f"{server.name} at {server.url} answers again")
                        with _DOWN_LOCK:
                            _DOWN.discard(server.health_url)
                    failures[server] = 0
                    since.pop(server, None)
                    continue
                failures[server] += 1
                if failures[server] == 1:
                    since.setdefault(server, time.monotonic())
                    continue
                if failures[server] == FAILURES_BEFORE_DOWN:
                    with _DOWN_LOCK:
                        _DOWN.add(server.health_url)
                    self._report(not_answering_message(server, self.wait_s))
                if time.monotonic() - since[server] >= self.wait_s:
                    self.expired = outage_error(server, self.wait_s, reason)
                    interrupt_main_thread()
                    return


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
