"""The training flow with `train.distributed`: torchrun runs the loop, the flow does the rest."""

from __future__ import annotations

import subprocess

import mlflow
import psutil
import pytest

from tests.flows.test_train import run_train, versions_of

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

#: How far apart the two runs' test ROC AUC may be.
AUC_TOLERANCE = 0.01


def descendants() -> set[int]:
    """Processes started under this one, but multiprocessing's resource tracker."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_two_processes_train_a_model_as_good_as_one_and_rank_0_alone_logs(project):
    single = run_train(project, "single-process")
    before = descendants()

    summary = run_train(project, "two-processes", "train.distributed.nproc_per_node=2")

    assert descendants() == before, "torchrun and its workers must be gone"
    single_auc, ddp_auc = single["metrics"]["roc_auc"], summary["metrics"]["roc_auc"]
    assert single_auc > 0.8
    assert abs(ddp_auc - single_auc) <= AUC_TOLERANCE, (single_auc, ddp_auc)

    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.distributed.nproc_per_node"] == "2"
    assert run.data.params["train.distributed.backend"] == "auto"
    assert run.data.params["resolved.device"] == "cpu"
    # Each epoch logged once (rank 0's report), one model version, registered once.
    for metric in ("train/loss", "val/loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3]
    (version,) = versions_of("two-processes")
    assert version.run_id == run.info.run_id
    assert version.tags["stemma.weights.sha256"] == summary["weights_sha256"]
    assert summary["gate"]["passed"] and summary["gate"]["alias"] == "champion"
    # A finished run leaves no checkpoint behind.
    assert not list((project / ".stemma" / "checkpoints").glob("two-processes-*"))


def test_cli_refuses_nccl_on_the_cpu_before_starting_anything(stemma_exe, project):
    result = subprocess.run(
        [
            *stemma_exe,
            "run",
            "train",
            "configs/credit.yaml",
            "--set",
            "train.device=cpu",
            "--set",
            "train.distributed.backend=nccl",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "train.distributed.backend: nccl needs CUDA" in result.stderr
    assert "Traceback" not in result.stderr
