"""Empty and too-small batches: no rows is not drift, and an unreadable batch is named.

A batch with no rows (a header-only CSV, a Parquet file with a schema and no row groups)
used to read as drift in every feature and sent ``stemma.drift.detected``, which starts a
retraining where the monitor is deployed. A zero-byte file is no batch at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.components.errors import DataError

pytestmark = [pytest.mark.usefixtures("prefect_api", "mlflow_uri"), pytest.mark.slow]

PIPELINE = "emptybatch"
NAMES = [f"pipeline.name={PIPELINE}", f"pipeline.model_name={PIPELINE}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]


@pytest.fixture(scope="module")
def trained(template_project, tmp_path_factory) -> Path:
    """A project whose model has a champion with a reference profile."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("empty-batches") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(config=str(root / "configs" / "credit.yaml"), overrides=[*TRAIN, *NAMES])
    return root


def a_day(project: Path) -> pd.DataFrame:
    """The template's first production day, as the batches the monitor reads."""
    folder = project / "data" / "credit" / "batches"
    return pd.read_parquet(sorted(folder.glob("*.parquet"))[0])


def monitor(project: Path, batch: Path, *overrides: str) -> dict:
    from stemma.flows.monitor import monitor_flow

    return monitor_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[*NAMES, *overrides],
        batch=str(batch),
    )


def write_header_only_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.head(0).to_csv(path, index=False)


def write_zero_row_parquet(frame: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(frame.head(0), preserve_index=False), path)


EMPTY = {
    "header-only-csv": ("batch.csv", write_header_only_csv),
    "zero-row-parquet": ("batch.parquet", write_zero_row_parquet),
}


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize("case", list(EMPTY), ids=list(EMPTY))
def test_a_batch_with_no_rows_is_not_drift_and_sends_no_event(trained, case):
    name, write = EMPTY[case]
    batch = trained / "landing" / case / name
    batch.parent.mkdir(parents=True)
    write(a_day(trained), batch)

    summary = monitor(trained, batch)

    assert summary["rows"] == 0
    assert summary["drift_detected"] is False
    assert summary["event_id"] is None
    assert "no rows" in summary["summary"] and "not assessed" in summary["summary"]
    tags = mlflow.MlflowClient().get_run(summary["run_id"]).data.tags
    assert tags["stemma.drift.detected"] == "false"
    assert "stemma.drift.event_id" not in tags


@pytest.mark.fault_case("bad_input")
def test_a_batch_under_min_rows_is_not_assessed(trained):
    batch = trained / "landing" / "small.parquet"
    batch.parent.mkdir(exist_ok=True)
    a_day(trained).head(33).to_parquet(batch, index=False)

    summary = monitor(trained, batch, "monitor.min_rows=100")

    assert summary["rows"] == 33
    assert summary["drift_detected"] is False
    assert summary["event_id"] is None
    assert "fewer than monitor.min_rows (100)" in summary["summary"]


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize("suffix", [".csv", ".parquet"], ids=["csv", "parquet"])
def test_a_zero_byte_batch_is_a_clear_error_naming_the_file(trained, suffix):
    batch = trained / "landing" / f"empty{suffix}"
    batch.parent.mkdir(exist_ok=True)
    batch.write_bytes(b"")

    with pytest.raises(DataError) as raised:
        monitor(trained, batch)

    assert batch.name in raised.value.render()
