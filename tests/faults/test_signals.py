"""Signals a command gets from outside: SIGTERM is Ctrl-C, and a killed command leaves no
temporary Prefect server behind.

`stemma run train` runs as a user runs it (a real Prefect API, MLflow on SQLite, a DVC
project); the signals are real signals sent to the CLI process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest

from tests.support import build_project, checkpoint_epoch

#: Rows and batch size that make an epoch last long enough to signal the run mid-training.
TRAIN_ROWS = 8_000
OVERRIDES = ["train.epochs=3", "train.early_stopping=null", "train.batch_size=16"]
#: How long to wait for the first epoch's checkpoint.
CHECKPOINT_WAIT_S = 240
#: How long a signalled command may take to stop.
STOP_WAIT_S = 120
#: How long the temporary Prefect server may outlive its killed command.
ORPHAN_WAIT_S = 5


def _train(stemma_exe, project: Path, *overrides: str, env: dict[str, str]) -> subprocess.Popen:
    args = [*stemma_exe, "run", "train", "configs/credit.yaml"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.Popen(
        args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_checkpoint(process: subprocess.Popen, project: Path, epoch: int) -> None:
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while checkpoint_epoch(project) < epoch:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} appeared"
        time.sleep(0.05)


def _runs(pipeline: str) -> list:
    return mlflow.search_runs(
        experiment_names=["credit"],
        filter_string=f"tags.`stemma.pipeline` = '{pipeline}'",
        output_format="list",
    )


def _flow_run_state(flow_run_id: str) -> tuple[str, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.type.value, state.message or ""


@pytest.mark.slow
@pytest.mark.fault_case("fault")
@pytest.mark.usefixtures("mlflow_uri")
def test_sigterm_mid_training_exits_143_and_the_rerun_resumes_to_identical_weights(
    stemma_exe, tmp_path, repo_root, prefect_api, fault_ledger
):
    from stemma.flows.train import train_flow

    project = build_project(tmp_path / "project", repo_root, train_rows=TRAIN_ROWS)
    overrides = [*OVERRIDES, "pipeline.name=sigterm", "pipeline.model_name=sigterm"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    process = _train(stemma_exe, project, *overrides, env=env)
    _wait_for_checkpoint(process, project, 1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=STOP_WAIT_S)
    fault_ledger.lost_rows(0)

    assert process.returncode == 143, err[-3000:]
    assert "terminated: training resumes from its last checkpoint when run again" in err
    assert "Traceback" not in err
    stopped_at = checkpoint_epoch(project)
    assert 1 <= stopped_at < 3
    (run,) = _runs("sigterm")
    assert run.info.status == "KILLED"
    assert run.data.tags["stemma.status"] == "interrupted"
    assert mlflow.MlflowClient().search_model_versions("name='sigterm'") == []
    # Prefect records the stop as a crash by a termination signal, not a failure of the flow.
    state, message = _flow_run_state(run.data.tags["stemma.prefect.flow_run_id"])
    assert state == "CRASHED" and "termination signal" in message

    process = _train(stemma_exe, project, *overrides, env=env)
    try:
        # An uninterrupted run of the same spec and data, in this process while the
        # command resumes.
        reference = train_flow(
            config=str(project / "configs" / "credit.yaml"),
            overrides=[*OVERRIDES, "pipeline.name=sigterm-ref", "pipeline.model_name=sigterm-ref"],
        )
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-3000:]
    assert "resumed an interrupted run from its last checkpoint" in out
    (resumed,) = _runs("sigterm")
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "train/loss")
    assert sorted({metric.step for metric in history}) == [1, 2, 3]
    assert resumed.data.tags["stemma.weights.sha256"] == reference["weights_sha256"]


def _temporary_server(cli: psutil.Process, deadline: float) -> psutil.Process:
    """The CLI's uvicorn child serving Prefect's API, once it answers /api/health."""
    while time.monotonic() < deadline:
        for child in cli.children():
            try:
                if "prefect.server.api.server:create_app" not in " ".join(child.cmdline()):
                    continue
                ports = [c.laddr.port for c in child.net_connections() if c.status == "LISTEN"]
            except psutil.NoSuchProcess:
                continue
            for port in ports:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/health", timeout=2
                    ) as response:
                        if response.status == 200:
                            return child
                except OSError:
                    pass
        time.sleep(0.1)
    raise AssertionError("the command started no temporary Prefect server that answered")


#: The signals a command is stopped by, and the exit each gives.
STOPS = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143}
#: A training that outlasts any test: its command is stopped long before it ends.
LONG_TRAINING = ["train.epochs=1000", "train.early_stopping=null"]


@pytest.fixture(scope="module")
def commands_to_stop(
    stemma_exe, template_project, tmp_path_factory
) -> Iterator[dict[int, tuple[Path, subprocess.Popen]]]:
    """One `stemma run train` per signal with no Prefect server configured, each in a copy
    of the project of its own, all started at once: each starts a temporary Prefect server
    on a fresh Prefect home, whose migrations they wait for side by side."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"}
    }
    started: dict[int, tuple[Path, subprocess.Popen]] = {}
    try:
        for sig in STOPS:
            project = tmp_path_factory.mktemp("stopped") / "project"
            shutil.copytree(template_project, project, symlinks=True)
            process = _train(stemma_exe, project, *LONG_TRAINING, env=env)
            started[sig] = (project, process)
        yield started
    finally:
        for _project, process in started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.slow
@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("sig", list(STOPS), ids=["sigkill", "sigterm"])
def test_a_stopped_command_leaves_no_temporary_prefect_server(commands_to_stop, sig, fault_ledger):
    project, process = commands_to_stop[sig]
    server = _temporary_server(psutil.Process(process.pid), time.monotonic() + 120)
    home = Path(server.environ()["PREFECT_HOME"])
    assert home == project / ".stemma" / "prefect"
    process.send_signal(sig)
    process.communicate(timeout=STOP_WAIT_S)
    fault_ledger.lost_rows(0)
    _gone, alive = psutil.wait_procs([server], timeout=ORPHAN_WAIT_S)
    assert not alive, f"temporary Prefect server {server.pid} outlived its command"
    assert process.returncode == STOPS[sig]
