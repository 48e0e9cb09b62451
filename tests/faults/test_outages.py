"""Servers that do not answer: one clear message, a bounded wait, then a resumable stop.

A real `mlflow server --workers 1` on loopback is killed while `stemma run train` trains
against it, then started again on the same port and store; Prefect and MLflow addresses on
closed ports stand for servers that never came up.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from stemma.components.platform import outages, services
from tests.support import build_project, checkpoint_epoch, free_port

#: Seconds the MLflow server gets to answer /health (`--workers 1` starts in ~12 s).
SERVER_START_S = 90
#: The wait the tests configure: two of the watch's polls, so the message (at the second
#: failed check) comes before the stop; and what a user is promised.
WAIT_S = int(2 * outages.POLL_S)
MESSAGE_WITHIN_S = 15
#: Slack for the interpreter's imports and the stop itself on a busy 2-core machine.
EXIT_SLACK_S = 40
TRAIN_ROWS = 8_000
OVERRIDES = [
    "train.epochs=3",
    "train.early_stopping=null",
    "train.batch_size=16",
    "pipeline.name=outage",
    "pipeline.model_name=outage",
]


class MlflowServer:
    """An `mlflow server --workers 1` on 127.0.0.1 that a test can kill and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.folder / "artifacts")]
        # Without MLflow's job processes, as `stemma up` starts it.
        environment = {**os.environ, services.JOB_EXECUTION_VARIABLE: "false"}
        with (self.folder / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {self.log()}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL to the server's process group (uvicorn and its worker), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Command:
    """A `stemma` process whose stderr lines are read as they come, with their arrival time."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.err: list[str] = []
        self.out = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put((time.monotonic(), line))
            self.err.append(line)

    def wait_for_line(self, text: str, timeout_s: float) -> float:
        """When a stderr line containing ``text`` arrived; fails after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                arrived, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line with {text!r} within {timeout_s} s:\n{''.join(self.err)[-3000:]}"
                ) from None
            if text in line:
                return arrived

    def finish(self, timeout_s: float) -> int:
        assert self.process.stdout is not None
        try:
            self.out = self.process.stdout.read() if self._wait(timeout_s) else ""
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        return self.process.returncode

    def _wait(self, timeout_s: float) -> bool:
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def _stemma(stemma_exe, *args: str) -> list[str]:
    return [*stemma_exe, *args]


def _overrides(values: list[str]) -> list[str]:
    return [item for value in values for item in ("--set", value)]


@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("server", ["mlflow", "prefect"], ids=["mlflow", "prefect"])
def test_a_server_that_never_answers_gives_one_message_and_a_bounded_exit(
    stemma_exe, project, prefect_api, server, fault_ledger
):
    port = free_port()  # nothing listens there
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    if server == "mlflow":
        env["MLFLOW_TRACKING_URI"] = f"http://stemma:planted-secret@127.0.0.1:{port}"
        shown = f"MLflow at http://stemma:***@127.0.0.1:{port}"
    else:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        shown = f"Prefect at http://127.0.0.1:{port}/api"
    wait_s = 4
    started = time.monotonic()
    command = Command(
        _stemma(stemma_exe, "--server-wait", str(wait_s), "run", "train", "configs/credit.yaml"),
        project,
        env,
    )
    code = command.finish(timeout_s=120)
    elapsed = time.monotonic() - started
    fault_ledger.lost_rows(0)

    err = command.stderr
    assert code == outages.ServerOutageError.exit_code, err[-3000:]
    assert err.count(f"{shown} is not answering; retrying for {wait_s} s") == 1, err
    assert f"error: {shown} did not answer for {wait_s} s; stopped" in err
    assert "--server-wait" in err and "Traceback" not in err
    assert "planted-secret" not in err + command.out
    assert elapsed < wait_s + EXIT_SLACK_S
    assert not (project / ".stemma" / "checkpoints").exists()  # stopped before any work


@pytest.mark.slow
@pytest.mark.fault_case("fault")
def test_mlflow_dying_mid_training_stops_in_bounded_time_and_the_rerun_resumes(
    stemma_exe, tmp_path, repo_root, prefect_api, mlflow_server, fault_ledger
):
    project = build_project(tmp_path / "project", repo_root, train_rows=TRAIN_ROWS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_server.url}
    train = ["run", "train", "configs/credit.yaml", *_overrides(OVERRIDES)]
    command = Command(_stemma(stemma_exe, "--server-wait", str(WAIT_S), *train), project, env)
    deadline = time.monotonic() + 240
    while checkpoint_epoch(project) < 1:
        assert command.process.poll() is None, command.stderr[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)

    mlflow_server.kill()
    killed = time.monotonic()
    message = f"MLflow at {mlflow_server.url} is not answering; retrying for {WAIT_S} s"
    assert command.wait_for_line(message, MESSAGE_WITHIN_S) - killed <= MESSAGE_WITHIN_S
    code = command.finish(timeout_s=WAIT_S + EXIT_SLACK_S)
    stopped = time.monotonic()
    fault_ledger.lost_rows(0)

    err = command.stderr
    assert code == outages.ServerOutageError.exit_code, err[-3000:]
    assert stopped - killed <= MESSAGE_WITHIN_S + WAIT_S + EXIT_SLACK_S
    assert f"error: MLflow at {mlflow_server.url} did not answer for {WAIT_S} s; stopped" in err
    assert "Traceback" not in err
    assert err.count(message) == 1
    assert checkpoint_epoch(project) >= 1  # resumable: the checkpoint is kept

    mlflow_server.start()  # same port, same store
    # The default wait: a slow answer of the restarted server on a busy machine is no outage.
    rerun = Command(_stemma(stemma_exe, *train), project, env)
    assert rerun.finish(timeout_s=600) == 0, rerun.stderr[-3000:]
    assert "resumed an interrupted run from its last checkpoint" in rerun.out
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("credit")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`stemma.pipeline` = 'outage'"
    )
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert run.info.status == "FINISHED"
    assert sorted({metric.step for metric in history}) == [1, 2, 3]
