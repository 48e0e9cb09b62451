"""Batch scoring fanned out on a local Dask cluster: the same bytes as one process.

Every cluster here is what `score.dask` starts by default (2 worker processes, 1 thread
each, on 127.0.0.1) and is closed when its flow ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.components.errors import DataError
from stemma.components.scoring.output import PROGRESS_FILE, SUCCESS_FILE
from tests.components.scoring.test_scoring import folder_bytes
from tests.flows.test_score import TRAIN

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = ["pipeline.name=fanout", "pipeline.model_name=fanout"]
DASK = ["score.runner=dask", "score.dask.workers=2", "score.dask.threads_per_worker=1"]


@pytest.fixture(scope="module")
def trained_project(template_project, tmp_path_factory) -> Path:
    """A project whose model `fanout` has a champion, and a larger batch folder to score."""
    import shutil

    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("fanout") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(config=str(root / "configs" / "credit.yaml"), overrides=[*TRAIN, *NAME])
    days = sorted((root / "data/credit/batches").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(path) for path in days], ignore_index=True)
    incoming = root / "incoming"
    incoming.mkdir()
    for copy in range(3):  # 3 files x 4,000 rows, each in row groups that chunks straddle
        rows = pd.concat([frame] * 4, ignore_index=True)
        rows["application_id"] = range(copy * len(rows), (copy + 1) * len(rows))
        if copy == 1:
            rows["salary"] = rows["salary"].astype("float64")
            rows.loc[rows.index[::397], "salary"] = float("nan")  # rejects in several chunks
        table = pa.Table.from_pandas(rows, preserve_index=False)
        pq.write_table(table, incoming / f"batch_{copy}.parquet", row_group_size=700)
    return root


@pytest.fixture(scope="module")
def dask_address() -> str:
    """A running cluster, as `score.dask.address` names one: its workers stay warm."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def project(trained_project, tmp_path) -> Path:
    import shutil

    target = tmp_path / "project"
    shutil.copytree(trained_project, target, symlinks=True)
    return target


def run_score(project: Path, *overrides: str, **parameters) -> dict:
    from stemma.flows.score import score_flow

    return score_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[*NAME, *overrides],
        input=str(project / "incoming"),
        **parameters,
    )


def child_processes() -> dict[int, str]:
    """This process's descendants, but multiprocessing's resource tracker (it lives as long
    as this process, once anything started a process the way Dask's nannies do)."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "multiprocessing.resource_tracker" not in line:
            found[child.pid] = line
    return found


def test_dask_fan_out_writes_the_bytes_of_a_single_process(project):
    settings = ["score.chunk_rows=500", "score.dask.chunks_per_task=3"]
    local = run_score(project, *settings, output=str(project / "local"))
    before = child_processes()

    fanned = run_score(project, *settings, *DASK, output=str(project / "dask"))

    # The cluster the run started (scheduler in this process, 2 worker processes) is closed.
    left = {pid: line for pid, line in child_processes().items() if pid not in before}
    assert not left, f"processes left running: {left}"

    assert folder_bytes(project / "dask") == folder_bytes(project / "local")
    assert fanned["output_digest"] == local["output_digest"]
    assert fanned["rows"] == local["rows"] == {"input": 12_000, "scored": 11_989, "rejected": 11}
    manifest = json.loads((project / "dask" / SUCCESS_FILE).read_text())
    assert len(manifest["parts"]) == 24 and len(manifest["rejects"]) == 8  # 8 chunks a file
    run = mlflow.MlflowClient().get_run(fanned["run_id"])
    record = mlflow.artifacts.load_dict(f"runs:/{fanned['run_id']}/lineage/record.json")
    predictions = next(node for node in record["nodes"] if node["kind"] == "predictions")
    assert predictions["attributes"]["runner"] == "dask"
    assert run.data.tags["stemma.output.sha256"] == local["output_digest"]
    assert run.data.metrics["score/parts_written"] == 24

    again = run_score(project, *settings, *DASK, output=str(project / "dask"))
    assert again["already_complete"] and again["output_digest"] == local["output_digest"]


def test_a_killed_fan_out_resumes_from_its_finished_parts(
    stemma_exe, project, prefect_api, dask_address
):
    settings = ["score.chunk_rows=200", "score.dask.chunks_per_task=10"]
    output = project / "dask"
    command = [*stemma_exe, "run", "score", "configs/credit.yaml", "--input", "incoming"]
    command += ["--output", str(output), "--runner", "dask", "--workers", "2"]
    for item in [*NAME, *settings]:
        command += ["--set", item]
    child = subprocess.Popen(
        command,
        cwd=project,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the CLI, its cluster and its workers: one group to kill
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(output.glob("part-*.parquet"))) < 6 and child.poll() is None:
            assert time.monotonic() < deadline, "the fan-out wrote no parts"
            time.sleep(0.005)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-3000:]
    time.sleep(0.5)  # let the kernel reap the workers' last writes
    finished = sorted(output.glob("part-*.parquet"))
    assert 6 <= len(finished) < 60 and not (output / SUCCESS_FILE).exists()
    assert (output / PROGRESS_FILE).is_file()

    running = [*settings, "score.runner=dask", f"score.dask.address={dask_address}"]
    resumed = run_score(project, *running, output=str(output))
    local = run_score(project, *settings, output=str(project / "local"))

    assert resumed["resumed_parts"] >= len(finished)
    assert not [p for p in output.rglob("*") if p.name.startswith(".tmp-")]
    assert folder_bytes(output) == folder_bytes(project / "local")
    assert resumed["output_digest"] == local["output_digest"]


def test_a_row_error_on_a_worker_stops_the_run_with_the_same_message(project, dask_address):
    strict = ["score.chunk_rows=500", "score.invalid_rows=error", "score.runner=dask"]

    with pytest.raises(DataError) as caught:
        run_score(
            project, *strict, f"score.dask.address={dask_address}", output=str(project / "dask")
        )

    text = caught.value.render()
    assert "batch_1.parquet" in text and "salary is missing" in text
    assert not (project / "dask" / SUCCESS_FILE).exists()
    # The other files' ranges ran to their end: their parts wait for the next run.
    written = sorted(path.name[:10] for path in (project / "dask").glob("part-*.parquet"))
    assert written == ["part-00000"] * 8 + ["part-00002"] * 8


def test_cli_scale_out_flags_are_validated_as_spec_values(stemma_exe, project):
    result = subprocess.run(
        [*stemma_exe, "run", "score", "configs/credit.yaml", "--runner", "dask", "--workers", "0"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "score.dask.workers: must be greater than or equal to 1" in result.stderr
    assert "--set score.dask.workers=0" in result.stderr
    assert "Traceback" not in result.stderr
