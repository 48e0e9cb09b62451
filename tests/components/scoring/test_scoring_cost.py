"""A scoring's CPU time and its cost per million predictions: counted in this process, in
worker processes of a fan-out (once each, however many ranges they ran at once), priced on
the spec's machine."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.scoring import fanout
from stemma.components.scoring.cost import scoring_cost
from stemma.components.scoring.engine import (
    ChunkRange,
    finish_scoring,
    input_files,
    load_scoring_model,
    plan_ranges,
    plan_scoring,
    score_files,
)
from stemma.components.scoring.job import RangeResult, process_key, worker_cpu_seconds
from stemma.components.spec.compress import CostSpec, MachineSpec
from tests.components.scoring.test_scoring import ID, register, synthetic_frame
from tests.support import isolated_mlflow

NAME = "cost-regression"
#: A CPU machine and a GPU machine of the spec's own.
MACHINES = CostSpec(
    currency="EUR",
    machines={
        "cpu4": MachineSpec(price_per_hour=0.4, cpus=4),
        "gpu1": MachineSpec(price_per_hour=3.0, cpus=8, gpu=True),
    },
    scoring="cpu4",
    serving="gpu1",
)


def _range(clock: tuple[str, float, float] | None) -> RangeResult:
    return RangeResult(
        chunk_range=ChunkRange(0),
        parts={},
        rejects={},
        rows=0,
        counts=np.zeros(1, dtype=np.int64),
        latencies=[],
        rows_scored_now=0,
        written=0,
        skipped=0,
        cpu_clock=clock,
    )


# fmt: off
CLOCKS = [
    ("one-range", [("w1", 2.0, 5.0)], 3.0),
    ("overlapping-ranges-of-one-worker-count-once", [("w1", 10.0, 14.0), ("w1", 12.0, 15.0)], 5.0),
    ("nested-range", [("w1", 10.0, 20.0), ("w1", 12.0, 15.0)], 10.0),
    ("two-workers-add-up", [("w1", 0.0, 3.0), ("w2", 0.0, 3.0)], 6.0),
    ("ranges-of-the-caller-are-its-own", [("here", 0.0, 100.0), ("w1", 1.0, 2.0)], 1.0),
    ("no-reading", [None], 0.0),
]
# fmt: on


@pytest.mark.parametrize("clocks,expected", [c[1:] for c in CLOCKS], ids=[c[0] for c in CLOCKS])
def test_worker_cpu_seconds_counts_each_process_second_once(clocks, expected):
    assert worker_cpu_seconds([_range(clock) for clock in clocks], "here") == expected


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """A regression model `cost-regression` v1 and a 400-row batch in 4 row groups."""
    root = tmp_path_factory.mktemp("cost-store")
    with isolated_mlflow():
        uri = configure_tracking(root)
        register(
            MlflowClient(),
            NAME,
            ensure_experiment("cost", root),
            root / "v1",
            seed=3,
            task="regression",
        )
        folder = root / "batches"
        folder.mkdir()
        table = pa.Table.from_pandas(synthetic_frame(400, seed=5), preserve_index=False)
        pq.write_table(table, folder / "day.parquet", row_group_size=100)
        yield {"uri": uri, "model": load_scoring_model(f"models:/{NAME}/1"), "batches": folder}


def test_cost_is_the_cpu_time_per_million_rows_priced_on_the_machine(regression, tmp_path):
    files = input_files(regression["batches"])
    result = score_files(
        regression["model"], files, tmp_path / "out", id_column=ID, chunk_rows=100, progress=False
    )

    cost = scoring_cost(result, MACHINES)
    on_gpu = scoring_cost(result, MACHINES.model_copy(update={"scoring": "gpu1"}))

    assert result.rows_scored_now == 400 and result.cpu_seconds > 0
    assert cost.cpu_seconds_per_million == pytest.approx(result.cpu_seconds / 400 * 1e6)
    assert cost.cost_per_million == pytest.approx(cost.cpu_seconds_per_million / 4 * 0.4 / 3600)
    # a GPU machine is held for the wall-clock time, whatever the CPU does
    assert on_gpu.cost_per_million == pytest.approx(result.seconds / 400 * 1e6 * 3.0 / 3600)
    assert set(cost.metrics()) == {"cpu_seconds", "cpu_s_per_million", "cost_per_million"}
    assert cost.params() == {"cost.machine": "cpu4", "cost.currency": "EUR"}
    assert "EUR per million predictions on cpu4" in cost.line

    again = score_files(
        regression["model"], files, tmp_path / "out", id_column=ID, chunk_rows=100, progress=False
    )
    nothing = scoring_cost(again, CostSpec())
    assert again.already_complete and nothing.cost_per_million is None
    assert set(nothing.metrics()) == {"cpu_seconds"}
    assert "none to price" in nothing.line
    assert nothing.params()["cost.machine"] == "cpu-small (illustrative prices)"


def _score_elsewhere(job: fanout.ScoringJob, chunk_range: ChunkRange) -> RangeResult:
    return fanout.score_job_range(job, chunk_range)


def test_a_fan_out_counts_the_cpu_its_worker_processes_spent(regression, tmp_path):
    model = regression["model"]
    plan = plan_scoring(
        model, input_files(regression["batches"]), tmp_path / "out", id_column=ID, chunk_rows=100
    )
    job = fanout.make_job(
        model, plan, tracking_uri=regression["uri"], registry_uri=regression["uri"]
    )
    ranges = plan_ranges(plan, chunks_per_range=2)
    # a fresh process, as a Dask worker is: it loads the model itself and scores its ranges
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        results = pool.starmap(_score_elsewhere, [(job, chunk_range) for chunk_range in ranges])

    result = finish_scoring(model, plan, results)

    elsewhere = worker_cpu_seconds(results, process_key())
    assert {r.cpu_clock[0] for r in results} != {process_key()}
    assert elsewhere > 0
    assert result.cpu_seconds > elsewhere
    assert result.rows_scored_now == 400
