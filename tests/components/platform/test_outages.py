"""Server outages: the wait setting, MLflow's retry budget, health checks and the watch,
against real sockets on loopback."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from stemma.components.errors import SpecError
from stemma.components.platform import lifecycle, outages


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("option", "environ", "expected"),
    [
        (None, {}, outages.DEFAULT_WAIT_S),
        (None, {outages.WAIT_ENV: "45"}, 45.0),
        (7.0, {outages.WAIT_ENV: "45"}, 7.0),
    ],
    ids=["default", "environment", "option-wins"],
)
def test_wait_seconds_comes_from_the_option_then_the_environment(option, environ, expected):
    assert outages.wait_seconds(option, environ) == expected


@pytest.mark.parametrize(
    "raw", ["soon", "0", "-5", "1e9"], ids=["text", "zero", "negative", "huge"]
)
def test_a_bad_wait_names_its_source(raw):
    with pytest.raises(SpecError) as caught:
        outages.wait_seconds(None, {outages.WAIT_ENV: raw})
    assert caught.value.headline.startswith(f"{outages.WAIT_ENV}: must be a number of seconds")


@pytest.mark.parametrize("wait_s", [5, 20, 120, 600], ids=str)
def test_mlflow_retries_outlast_the_wait(wait_s):
    settings = outages.mlflow_retry_environment(wait_s, {})
    retries = int(settings["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = int(settings["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    # urllib3 sleeps factor * 2**(n-1) s before the n-th retry, nothing before the first.
    slept = sum(factor * 2 ** (n - 1) for n in range(2, retries + 1))
    assert slept >= wait_s
    assert retries <= outages.MLFLOW_MAX_RETRIES


def test_mlflow_settings_the_user_chose_are_kept():
    settings = outages.mlflow_retry_environment(
        20, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "9"}
    )
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in settings
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in settings
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" in settings


def test_servers_in_use_hide_passwords_and_leave_file_stores_out():
    servers = outages.servers_in_use(
        {
            "MLFLOW_TRACKING_URI": "https://alice:s3cret@mlflow.example:8443/",
            "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        }
    )
    assert [(s.name, s.url, s.health_url) for s in servers] == [
        ("MLflow", "https://alice:***@mlflow.example:8443", "https://mlflow.example:8443/health"),
        ("Prefect", "http://127.0.0.1:4200/api", "http://127.0.0.1:4200/api/health"),
    ]
    assert outages.servers_in_use({"MLFLOW_TRACKING_URI": "sqlite:///x.db"}) == []


def test_a_server_that_never_answers_fails_after_the_wait_with_one_message():
    port = _closed_port()
    server = outages.servers_in_use({"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})[0]
    said: list[str] = []
    started = time.monotonic()
    with pytest.raises(outages.ServerOutageError) as caught:
        outages.wait_for_servers([server], 1.0, said.append)
    assert time.monotonic() - started < 1.0 + outages.POLL_S + 1
    assert said == [f"Prefect at http://127.0.0.1:{port}/api is not answering; retrying for 1 s"]
    assert (
        caught.value.headline
        == f"Prefect at http://127.0.0.1:{port}/api did not answer for 1 s; stopped"
    )
    assert "nothing was started" in caught.value.render()
    assert caught.value.exit_code == 69


def test_the_watch_reports_once_then_interrupts_the_main_thread():
    port = _closed_port()
    server = outages.servers_in_use({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})[0]
    said: list[str] = []
    with (
        lifecycle.sigterm_as_interrupt(),
        pytest.raises(lifecycle.Terminated),
        outages.ServerWatch([server], wait_s=0.5, report=said.append, poll_s=0.1) as watch,
    ):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.05)
    assert said == [f"MLflow at http://127.0.0.1:{port} is not answering; retrying for 0.5 s"]
    assert watch.expired is not None
    assert watch.expired.headline.endswith("did not answer for 0.5 s; stopped")
    assert not outages.is_down(f"http://127.0.0.1:{port}")  # forgotten once the watch ends


def test_sigterm_becomes_terminated_with_exit_code_143():
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with lifecycle.sigterm_as_interrupt(), pytest.raises(lifecycle.Terminated) as caught:
        threading.Timer(0.1, lifecycle.interrupt_main_thread).start()
        time.sleep(5)
    assert time.monotonic() - started < 2  # the sleep was cut short
    assert lifecycle.interruption_exit_code(caught.value) == 143
    assert lifecycle.interruption_exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


class _EngineSignal(BaseException):
    """Shaped like an orchestrator's termination exception: a BaseException with a signal."""

    def __init__(self) -> None:
        super().__init__("terminated")
        self.signal = signal.SIGTERM


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (KeyboardInterrupt(), True),
        (lifecycle.Terminated(signal.SIGTERM), True),
        (_EngineSignal(), True),
        (SystemExit(1), False),
        (RuntimeError("boom"), False),
    ],
    ids=["ctrl-c", "sigterm", "engine-signal", "system-exit", "error"],
)
def test_is_interruption(error, expected):
    assert lifecycle.is_interruption(error) is expected
