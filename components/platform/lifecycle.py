"""How a Stemma command ends: SIGTERM taken like Ctrl-C, and a temporary Prefect server that
cannot outlive the command that started it.

SIGTERM (what ``kill``, systemd, Docker and Kubernetes send) stops a command the way Ctrl-C
does: :func:`sigterm_as_interrupt` turns it into :class:`Terminated`, a
``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` path (the training checkpoint
kept, the MLflow run ended KILLED) serves both. The exit code is 128 + the signal, as shells
report it: 130 for Ctrl-C, 143 for SIGTERM.

Prefect's ephemeral mode starts a uvicorn server as a child process and stops it at exit;
when the command is killed (SIGKILL, OOM killer) that server stays behind. Stemma starts the
same server itself (``uvicorn --factory prefect.server.api.server:create_app`` on a socket
it bound to a free loopback port) and, on Linux, asks the kernel to send it SIGKILL when
the command dies (``prctl(PR_SET_PDEATHSIG)``). Other platforms keep Prefect's own
ephemeral server. Prefect itself is never imported here: the server is a child process.

Only the standard library is used; what only the server needs (ctypes, urllib) is imported
when it starts, so that every command's start-up stays light.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stemma.components.errors import StemmaError

#: The exit code of a command stopped by a signal is 128 + its number, as shells report it.
SIGNAL_EXIT_BASE = 128
#: Linux prctl option: the signal the kernel sends a process when its parent dies.
PR_SET_PDEATHSIG = 1
#: What the temporary server gets when its command dies: it holds nothing but a SQLite
#: database, which rolls back an unfinished write on the next open, so nothing is lost.
SERVER_DEATH_SIGNAL = signal.SIGKILL
#: How long :meth:`TemporaryPrefectServer.stop` waits after SIGTERM before SIGKILL.
SERVER_STOP_GRACE_S = 5.0
#: Pause between two health checks while the server starts.
SERVER_POLL_S = 0.1
#: Time limit of one health request to the starting server.
SERVER_HEALTH_TIMEOUT_S = 2.0
#: Last lines of the server's log shown when it fails to start.
SERVER_LOG_TAIL_LINES = 10
#: The server's output, inside PREFECT_HOME.
SERVER_LOG_NAME = "temporary-server.log"
#: What Prefect's ephemeral server leaves out, as public settings (a value the user set
#: wins): no UI, and none of the services that act on deployments, workers or schedules,
#: which a single command's flows do not use.
SERVER_SETTINGS = {
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
}


# ---------------------------------------------------------------------------------------
# Signals


class Terminated(KeyboardInterrupt):
    """The command received a termination signal (SIGTERM); handled like Ctrl-C.

    Attributes:
        signal: the signal's number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signal = signum


def is_interruption(error: BaseException) -> bool:
    """Whether ``error`` means someone stopped the process (Ctrl-C, SIGTERM), not a failure.

    Besides ``KeyboardInterrupt`` (and :class:`Terminated`), an orchestrator may swap
    SIGTERM for its own exception while it runs a flow (Prefect's ``TerminationSignal``);
    such an exception is a ``BaseException`` that carries the signal's number as ``signal``.
    """
    if isinstance(error, KeyboardInterrupt):
        return True
    return not isinstance(error, Exception) and isinstance(getattr(error, "signal", None), int)


def interruption_exit_code(error: BaseException) -> int:
    """128 + the signal that stopped the command: 130 for Ctrl-C, 143 for SIGTERM."""
    signum = getattr(error, "signal", None)
    return SIGNAL_EXIT_BASE + (signum if isinstance(signum, int) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise :class:`Terminated` in the main thread on SIGTERM, for the duration of the block.

    Outside the main thread (where Python cannot install handlers) this does nothing. The
    previous handler comes back when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_main_thread() -> None:
    """Stop the main thread's work as SIGTERM would, from another thread.

    The signal goes to the main thread itself, so a blocking call there (a socket read, a
    retry's sleep) is interrupted at once and the handler in place decides what is raised.
    """
    main = threading.main_thread()
    if hasattr(signal, "pthread_kill") and main.ident is not None:
        signal.pthread_kill(main.ident, signal.SIGTERM)
    else:  # pragma: no cover - platforms without pthread_kill
        import _thread

        _thread.interrupt_main(signal.SIGTERM)


# ---------------------------------------------------------------------------------------
# The temporary Prefect server


def _parent_death_setter() -> object | None:
    """libc's ``prctl``, resolved before any fork (a forked child must not load libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the running program, libc included
        return libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


@dataclass
class TemporaryPrefectServer:
    """A Prefect API server for one command, killed with it.

    Attributes:
        process: the uvicorn process.
        port: its port on 127.0.0.1.
        log_path: where its output goes.
    """

    process: subprocess.Popen
    port: int
    log_path: Path
    _ready: bool = field(default=False, repr=False)

    @property
    def api_url(self) -> str:
        """The value of ``PREFECT_API_URL`` for clients of this server."""
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_ready(self, timeout_s: float) -> None:
        """Return once the server answers ``/api/health``.

        Raises:
            StemmaError: the server exited, or did not answer within ``timeout_s`` (it is
                stopped then), with the last lines of its log.
        """
        if self._ready:
            return
        from stemma.components.platform.outages import check_health

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode} while starting")
            if check_health(f"{self.api_url}/health", timeout_s=SERVER_HEALTH_TIMEOUT_S) is None:
                self._ready = True
                return
            time.sleep(SERVER_POLL_S)
        self.stop()
        self._fail(
            f"did not answer within {timeout_s:g} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`SERVER_STOP_GRACE_S`; idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=SERVER_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _fail(self, what: str) -> None:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-SERVER_LOG_TAIL_LINES:]
        except OSError:
            tail = []
        raise StemmaError(
            f"the temporary Prefect server on 127.0.0.1:{self.port} {what}",
            [
                *tail,
                f"its log: {self.log_path}",
                "or run against a server: `stemma up`, or set PREFECT_API_URL",
            ],
        )


def start_temporary_prefect_server(
    home: Path, environ: Mapping[str, str] | None = None
) -> TemporaryPrefectServer | None:
    """Start a Prefect API server for this process, tied to it; None where it cannot be tied.

    The server binds a socket this process opened on a free port of 127.0.0.1 (no race for
    the port), keeps its database under ``home`` (``PREFECT_HOME``) and logs to
    ``home/temporary-server.log``. It is not waited for: call
    :meth:`TemporaryPrefectServer.wait_until_ready` before the first flow, so that the
    server starts while the command imports its libraries.

    Call it from the main thread: the kernel's parent-death signal follows the thread that
    started the child.

    Args:
        home: Prefect's home folder (created if missing).
        environ: the environment to start it with (default: this process's).

    Returns:
        The server, or None on platforms without ``prctl`` (Prefect then starts its own
        ephemeral server, which a killed command leaves behind).
    """
    prctl = _parent_death_setter()
    if prctl is None:
        return None
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, int(SERVER_DEATH_SIGNAL))  # type: ignore[operator]
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
        environment = {**(os.environ if environ is None else environ), "PREFECT_HOME": str(home)}
        for name, value in SERVER_SETTINGS.items():
            environment.setdefault(name, value)
        environment.pop("PREFECT_API_URL", None)
        log_path = home / SERVER_LOG_NAME
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--fd",
                    str(listener.fileno()),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
                preexec_fn=die_with_parent,
            )
    finally:
        listener.close()  # the server holds its own copy
    return TemporaryPrefectServer(process=process, port=port, log_path=log_path)
