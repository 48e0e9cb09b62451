"""A password in the tracking URI never lands anywhere Stemma writes.

A real MLflow server (no auth: it ignores the credentials) is named by a URI carrying a
planted secret; `stemma run train`, `stemma run score` and `stemma lineage` with an
OpenLineage export to a receiver on loopback then run as a user would run them. Every byte
of the MLflow store, the project (outputs, `.stemma/`, the Prefect home with its database),
the commands' output and the events the receiver got is searched for the secret.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from stemma.components.platform import services
from tests.support import free_port, run_side_by_side

#: Seconds the MLflow server gets to answer /health (`--workers 1` starts in ~12 s).
SERVER_START_S = 90
#: Seconds each command may take (a fresh Prefect home migrates in ~17 s).
COMMAND_S = 300
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[tuple[int, Path]]:
    """An `mlflow server --workers 1` on 127.0.0.1 with its store in ``tmp_path/mlflow``."""
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_exe), "server", "--workers", "1", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(store / "artifacts")]
    log = (tmp_path / "mlflow-server.log").open("wb")
    server = subprocess.Popen(
        command,
        # without MLflow's job processes, as `stemma up` starts it
        env={**os.environ, services.JOB_EXECUTION_VARIABLE: "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=store,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()}"
                )
            time.sleep(0.5)
        yield port, store
    finally:
        # The server's own process group: uvicorn and its worker.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[int]:
    """An OpenLineage receiver on 127.0.0.1 that keeps every POST body; yields its port."""
    _Receiver.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _files(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                yield path


@pytest.mark.slow
@pytest.mark.fault_case("bad_input")
def test_a_planted_tracking_password_leaks_nowhere(
    project, mlflow_server, receiver, stemma_exe, fault_ledger
):
    port, store = mlflow_server
    secret = f"PLANTED-SECRET-{uuid.uuid4().hex}"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_API_", "MLFLOW_")) and key != "PREFECT_HOME"
    }
    env["MLFLOW_TRACKING_URI"] = f"http://stemma:{secret}@127.0.0.1:{port}"
    # The receiver's URL carries the secret too: Stemma prints where the events went.
    target = f"http://lineage:{secret}@127.0.0.1:{receiver}"
    commands = [
        ["run", "train", "configs/credit.yaml", *(f"--set={item}" for item in TRAIN)],
        ["run", "score", "configs/credit.yaml", "--model", "models:/credit/1"],
        ["lineage", "outputs/credit/scores", "--openlineage", target],
        ["lineage", "models:/credit/1", "--json"],
    ]
    outputs = []
    for command in commands[:2]:
        done = subprocess.run(
            [*stemma_exe, *command],
            cwd=project,
            env=env,
            capture_output=True,
            timeout=COMMAND_S,
        )
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    # The two lineage commands only read what the others wrote: they run side by side.
    lineage = [[*stemma_exe, *command] for command in commands[2:]]
    for done in run_side_by_side(lineage, cwd=project, env=env, timeout_s=COMMAND_S):
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]

    found = []
    for path in _files(store, project):
        if secret.encode() in path.read_bytes():
            found.append(str(path))
    found += [
        f"output of stemma {' '.join(command[:2])}: {line.decode(errors='replace')}"
        for command, output in zip(commands, outputs, strict=True)
        for line in output.splitlines()
        if secret.encode() in line
    ]
    found += [
        f"OpenLineage event {n}" for n, b in enumerate(_Receiver.bodies) if secret.encode() in b
    ]
    fault_ledger.executed(False)
    assert found == []

    # The stores and outputs searched are the real ones, and the URI was shown, masked.
    assert (store / "mlflow.db").stat().st_size > 0 and any(_files(store / "artifacts"))
    assert any((project / ".stemma" / "prefect").glob("*.db"))
    assert any((project / "outputs" / "credit" / "scores").rglob("*.parquet"))
    assert len(_Receiver.bodies) >= 4
    assert f"http://stemma:***@127.0.0.1:{port}".encode() in outputs[0]
    assert b"http://lineage:***@127.0.0.1" in outputs[2]
    assert any(f"http://stemma:***@127.0.0.1:{port}".encode() in b for b in _Receiver.bodies)
