"""`stemma run train` as a user runs it: exit codes, one-screen errors, and resuming a killed run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from tests.support import (
    build_project,
    checkpoint_epoch,
    rewrite_training_table,
    run_side_by_side,
)

pytestmark = pytest.mark.usefixtures("mlflow_uri")

#: Rows and batch size that make one epoch last long enough to kill the run mid-training.
INTERRUPT_TRAIN_ROWS = 20_000
INTERRUPT_OVERRIDES = ["train.epochs=6", "train.early_stopping=null", "train.batch_size=16"]
#: How long to wait for the checkpoint of epoch 2 before giving up.
CHECKPOINT_WAIT_S = 240


def cli_env(prefect_api: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": prefect_api}


def stemma_train(stemma_exe, project: Path, *overrides: str, env):
    args = [*stemma_exe, "run", "train", "configs/credit.yaml"]
    for override in overrides:
        args += ["--set", override]
    return subprocess.Popen(
        args,
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_shell,
    )


def _as_from_a_shell() -> None:
    """The child starts with Ctrl-C and SIGTERM at their defaults, as from a user's shell:
    a child inherits an ignored signal, and a library in the test process may ignore one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def old_applicants(frame):
    frame = frame.copy()
    frame.loc[frame.index[:7], "age"] = 140
    return frame


@pytest.fixture(scope="module")
def failed_checks(
    template_project, tmp_path_factory, stemma_exe, prefect_api, mlflow_uri
) -> dict[bool, subprocess.CompletedProcess]:
    """`stemma run train` on a table with 7 applicants aged 140, quiet and with -v, side by
    side, each in its own copy of the project; the finished commands by ``verbose``."""
    projects, commands = [], []
    for verbose in (False, True):
        project = tmp_path_factory.mktemp("cli-fail") / "project"
        shutil.copytree(template_project, project, symlinks=True)
        rewrite_training_table(project, old_applicants)
        command = [*stemma_exe, *(["-v"] if verbose else []), "run", "train", "configs/credit.yaml"]
        for override in ("pipeline.name=cli-fail", "pipeline.model_name=cli-fail"):
            command += ["--set", override]
        projects.append(project)
        commands.append(command)
    # MLflow creates its tables on a store's first use, which two processes must not do at once.
    mlflow.MlflowClient(mlflow_uri).search_experiments(max_results=1)
    done = run_side_by_side(
        commands, cwd=projects, env=cli_env(prefect_api), timeout_s=300, text=True
    )
    return dict(zip((False, True), done, strict=True))


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_failed_check_exits_3_with_one_screen_and_no_traceback(failed_checks, verbose):
    process = failed_checks[verbose]
    err = process.stderr
    assert process.returncode == 3, err[-3000:]
    assert "Traceback" not in err
    # printed once, by the CLI: Prefect's copies of the error and of the failed states stay
    # in the Prefect server, off the console
    failure = "data/credit/train.parquet: 1 of 8 expectations failed; nothing was trained"
    assert f"error: {failure}" in err and err.count(failure) == 1, err[-3000:]
    assert "Finished in state Failed" not in err
    # Prefect's log lines (flow and task states) only with -v
    assert ("| INFO    | Flow run" in err) is verbose, err[-3000:]
    assert "7 of" in err and "140" in err
    assert mlflow.MlflowClient().search_model_versions("name='cli-fail'") == []


def test_killed_run_resumes_to_identical_weights(stemma_exe, tmp_path, repo_root, prefect_api):
    from stemma.flows.train import train_flow

    project = build_project(tmp_path / "project", repo_root, train_rows=INTERRUPT_TRAIN_ROWS)
    overrides = [*INTERRUPT_OVERRIDES, "pipeline.name=resume", "pipeline.model_name=resume"]
    env = cli_env(prefect_api)

    process = stemma_train(stemma_exe, project, *overrides, env=env)
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while checkpoint_epoch(project) < 2:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of epoch 2 appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = checkpoint_epoch(project)
    assert 2 <= killed_at < 6

    (interrupted,) = mlflow.search_runs(
        experiment_names=["credit"],
        filter_string="tags.`stemma.pipeline` = 'resume'",
        output_format="list",
    )
    assert interrupted.info.status == "RUNNING"  # killed: nobody could mark it

    process = stemma_train(stemma_exe, project, *overrides, env=env)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "gate: PASSED, alias 'champion'" in out

    (resumed,) = mlflow.search_runs(
        experiment_names=["credit"],
        filter_string="tags.`stemma.pipeline` = 'resume'",
        output_format="list",
    )
    assert resumed.info.run_id == interrupted.info.run_id  # the same MLflow run, resumed
    assert resumed.info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]
    assert not list((project / ".stemma" / "checkpoints").glob("*/checkpoint.pt"))

    reference = train_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[
            *INTERRUPT_OVERRIDES,
            "pipeline.name=resume-reference",
            "pipeline.model_name=resume-reference",
        ],
    )
    assert resumed.data.tags["stemma.weights.sha256"] == reference["weights_sha256"]


def test_ctrl_c_exits_130_and_keeps_the_checkpoint(stemma_exe, tmp_path, repo_root, prefect_api):
    project = build_project(tmp_path / "project", repo_root, train_rows=INTERRUPT_TRAIN_ROWS)
    # Many epochs: on a busy machine the test may see the first checkpoint late, and the
    # signal must still find the training running (it stops at once when it does).
    overrides = [
        *INTERRUPT_OVERRIDES,
        "train.epochs=60",
        "pipeline.name=ctrl-c",
        "pipeline.model_name=ctrl-c",
    ]
    process = stemma_train(stemma_exe, project, *overrides, env=cli_env(prefect_api))
    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while checkpoint_epoch(project) < 1:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    disposition = signal.getsignal(signal.SIGINT)
    assert process.returncode == 130, f"test's own SIGINT: {disposition}\n{err[-3000:]}"
    assert "interrupted: training resumes from its last checkpoint when run again" in err
    assert "Traceback" not in err
    assert checkpoint_epoch(project) >= 1
    (run,) = mlflow.search_runs(
        experiment_names=["credit"],
        filter_string="tags.`stemma.pipeline` = 'ctrl-c'",
        output_format="list",
    )
    assert run.info.status == "KILLED"
    assert run.data.tags["stemma.status"] == "interrupted"
    assert mlflow.MlflowClient().search_model_versions("name='ctrl-c'") == []
