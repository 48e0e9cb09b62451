"""A training run killed after registering its version gives, on rerun, that one version.

The flow runs in a child process that SIGKILLs itself at a point of the registration
(after the version is created and before the alias; after the alias and before the
profile tag; after the lineage record and before the run is marked completed). The rerun
resumes the same MLflow run, finds the version it registered and completes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest

from tests.support import run_side_by_side

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

FAST = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]

#: Where the child kills itself: code run before `train_flow`, patching one call.
KILL_POINTS = {
    "before-the-alias": """
        from mlflow import MlflowClient
        MlflowClient.set_registered_model_alias = lambda *args, **kwargs: die()
    """,
    "before-the-profile-tag": """
        from stemma.components.monitoring import profile
        profile.tag_model_version = lambda *args, **kwargs: die()
    """,
    "before-the-run-is-completed": """
        from stemma.flows import train
        real_record = train.record_lineage
        def record_then_die(record):
            real_record(record)
            die()
        train.record_lineage = record_then_die
    """,
}

CHILD = """
import os, signal, sys
def die():
    os.kill(os.getpid(), signal.SIGKILL)
{patch}
from stemma.flows.train import train_flow
train_flow(config=sys.argv[1], overrides=sys.argv[2:])
"""


def _overrides(point: str) -> list[str]:
    name = f"killed-{point}"
    return [*FAST, f"pipeline.name={name}", f"pipeline.model_name={name}"]


@pytest.fixture(scope="module")
def killed_children(
    template_project, tmp_path_factory, prefect_api, mlflow_uri
) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Each kill point's child, in a copy of the project of its own, all started at once:
    the project and the finished child by kill point."""
    # MLflow creates its tables on a store's first use, which two processes must not do at once.
    mlflow.MlflowClient(mlflow_uri).search_experiments(max_results=1)
    projects, commands = [], []
    for point, patch in KILL_POINTS.items():
        project = tmp_path_factory.mktemp("killed") / "project"
        shutil.copytree(template_project, project, symlinks=True)
        script = CHILD.format(patch=textwrap.dedent(patch))
        config = str(project / "configs" / "credit.yaml")
        commands.append([sys.executable, "-c", script, config, *_overrides(point)])
        projects.append(project)
    children = run_side_by_side(
        commands,
        cwd=projects,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        timeout_s=300,
        text=True,
    )
    return dict(zip(KILL_POINTS, zip(projects, children, strict=True), strict=True))


@pytest.mark.slow
@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("point", list(KILL_POINTS), ids=list(KILL_POINTS))
def test_a_kill_after_registration_gives_one_completed_version(killed_children, point: str):
    from stemma.components.monitoring.profile import PROFILE_SHA256_TAG
    from stemma.flows.train import train_flow

    project, child = killed_children[point]
    name = f"killed-{point}"
    config = str(project / "configs" / "credit.yaml")
    overrides = _overrides(point)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    client = mlflow.MlflowClient()
    (killed,) = client.search_model_versions(f"name = '{name}'")
    assert client.get_run(killed.run_id).info.status == "RUNNING"  # nobody could end it

    summary = train_flow(config=config, overrides=overrides)

    versions = client.search_model_versions(f"name = '{name}'")
    fault_versions = [v for v in versions if v.run_id == killed.run_id]
    assert summary["resumed"] is True and summary["run_id"] == killed.run_id
    assert len(versions) == 1 and len(fault_versions) == 1, [v.version for v in versions]
    version = client.get_model_version(name, killed.version)
    assert summary["model_version"] == str(version.version)
    assert version.tags.get(PROFILE_SHA256_TAG), version.tags
    assert version.aliases == ["champion"]
    run = client.get_run(killed.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stemma.status"] == "completed"
    assert run.data.tags["stemma.lineage.made-nodes"]
    # the resumed run's decision is the one logged before the version was created, reasons too
    assert summary["gate"]["alias"] == "champion" and summary["gate"]["reasons"]
