"""Fanned-out scoring, one process: any split into chunk ranges writes score_files' bytes.

The ranges run here one after another (in any order); tests/flows/test_score_dask.py runs
them on a real Dask cluster through Prefect.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError, RegistryError, SpecError
from stemma.components.platform.locks import FolderBusyError
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.scoring import fanout
from stemma.components.scoring.engine import (
    SUCCESS_FILE,
    ChunkRange,
    abandon_scoring,
    finish_scoring,
    input_files,
    load_scoring_model,
    plan_ranges,
    plan_scoring,
    score_files,
)
from stemma.components.scoring.job import score_range
from stemma.components.scoring.output import PROGRESS_FILE
from stemma.components.spec import DaskSpec, load_spec
from tests.components.scoring.test_scoring import (
    ID,
    MODEL,
    folder_bytes,
    register,
    synthetic_frame,
    with_bad_rows,
)
from tests.support import isolated_mlflow

CHUNK_ROWS = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """`credit-score` v1 (@champion) and v2 in a local MLflow store."""
    root = tmp_path_factory.mktemp("fanout-store")
    with isolated_mlflow():
        uri = configure_tracking(root)
        experiment_id = ensure_experiment("fanout", root)
        client = MlflowClient()
        register(client, MODEL, experiment_id, root / "v1", seed=3, alias="champion")
        register(client, MODEL, experiment_id, root / "v2", seed=4)
        yield {"uri": uri}


@pytest.fixture(scope="module")
def champion(store):
    return load_scoring_model(f"models:/{MODEL}@champion")


@pytest.fixture
def batches(tmp_path):
    """Two Parquet files in small row groups (chunks straddle them), with rows to reject."""
    folder = tmp_path / "batches"
    folder.mkdir()
    frames = [
        with_bad_rows(synthetic_frame(150, seed=8)),
        synthetic_frame(70, seed=9, first_id=150),
    ]
    for index, frame in enumerate(frames):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, folder / f"day_{index}.parquet", row_group_size=23)
    return folder


def fan_out(model, files, output, *, chunks_per_range, reverse=False):
    """Plan, score every range (last first when ``reverse``), finish."""
    plan = plan_scoring(model, files, output, id_column=ID, chunk_rows=CHUNK_ROWS)
    ranges = plan_ranges(plan, chunks_per_range)
    results = [score_range(model, plan, item) for item in (ranges[::-1] if reverse else ranges)]
    return finish_scoring(model, plan, results), ranges


@pytest.mark.parametrize("chunks_per_range", [1, 3, 100], ids=["one", "three", "whole-file"])
def test_any_split_into_ranges_writes_the_bytes_of_one_process(
    champion, batches, tmp_path, chunks_per_range
):
    files = input_files(batches)
    single = score_files(
        champion, files, tmp_path / "single", id_column=ID, chunk_rows=CHUNK_ROWS, progress=False
    )

    result, ranges = fan_out(
        champion, files, tmp_path / "fanned", chunks_per_range=chunks_per_range, reverse=True
    )

    assert folder_bytes(tmp_path / "fanned") == folder_bytes(tmp_path / "single")
    assert result.output_digest == single.output_digest
    assert (result.rows_input, result.rows_scored, result.rows_rejected) == (220, 215, 5)
    assert result.parts_written == len(single.manifest["parts"]) == 10 + 5
    expected_ranges = -(-10 // chunks_per_range) + -(-5 // chunks_per_range)
    assert len(ranges) == expected_ranges
    assert ranges[0] == ChunkRange(0, 0, None if chunks_per_range >= 10 else chunks_per_range)


def test_csv_files_are_one_range_each_and_a_range_may_start_inside_one(champion, tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    with_bad_rows(synthetic_frame(60, seed=8)).to_csv(folder / "a.csv", index=False)
    synthetic_frame(20, seed=9, first_id=60).to_csv(folder / "b.csv", index=False)
    files = input_files(folder)
    score_files(
        champion, files, tmp_path / "single", id_column=ID, chunk_rows=CHUNK_ROWS, progress=False
    )

    plan = plan_scoring(champion, files, tmp_path / "fanned", id_column=ID, chunk_rows=CHUNK_ROWS)
    assert plan_ranges(plan, 1) == [ChunkRange(0), ChunkRange(1)]
    # Split by hand: a CSV range that starts at chunk 2 reads past the rows before it.
    results = [
        score_range(champion, plan, item)
        for item in (ChunkRange(0, 2, None), ChunkRange(0, 0, 2), ChunkRange(1))
    ]
    finish_scoring(champion, plan, results)

    assert folder_bytes(tmp_path / "fanned") == folder_bytes(tmp_path / "single")


def test_an_interrupted_fan_out_resumes_from_its_finished_parts(champion, batches, tmp_path):
    files = input_files(batches)
    output = tmp_path / "fanned"
    plan = plan_scoring(champion, files, output, id_column=ID, chunk_rows=CHUNK_ROWS)
    ranges = plan_ranges(plan, 2)
    assert json.loads((output / PROGRESS_FILE).read_text())["fingerprint"] == (
        plan.identity.fingerprint
    )
    finished = [score_range(champion, plan, item) for item in ranges[:3]]  # then the run dies
    written = sorted(p.name for p in output.glob("part-*.parquet"))
    assert len(written) == sum(result.written for result in finished) == 6
    assert not (output / SUCCESS_FILE).exists()
    # The job holds the folder until it ends: a second plan is refused, naming this process.
    with pytest.raises(FolderBusyError, match=f"being written by pid {os.getpid()} on host"):
        plan_scoring(champion, files, output, id_column=ID, chunk_rows=CHUNK_ROWS)
    abandon_scoring(plan)  # the job stops; its parts stay

    again = plan_scoring(champion, files, output, id_column=ID, chunk_rows=CHUNK_ROWS)
    assert sorted(again.done) == written and not again.invalidated
    with pytest.raises(FolderBusyError, match="being written by"):  # the old job's workers stop
        score_range(champion, plan, ranges[3])
    results = [score_range(champion, again, item) for item in plan_ranges(again, 2)]
    resumed = finish_scoring(champion, again, results)

    score_files(
        champion, files, tmp_path / "single", id_column=ID, chunk_rows=CHUNK_ROWS, progress=False
    )
    assert folder_bytes(output) == folder_bytes(tmp_path / "single")
    assert (resumed.parts_skipped, resumed.parts_written) == (6, 15 - 6)

    complete = plan_scoring(champion, files, output, id_column=ID, chunk_rows=CHUNK_ROWS)
    assert complete.complete
    assert finish_scoring(champion, complete, []).already_complete


@pytest.mark.parametrize(
    "ranges",
    [
        [ChunkRange(0, 0, 4), ChunkRange(0, 5, None), ChunkRange(1)],
        [ChunkRange(0), ChunkRange(0), ChunkRange(1)],
        [ChunkRange(0)],
    ],
    ids=["gap", "twice", "missing-file"],
)
def test_the_manifest_is_refused_unless_every_chunk_is_scored_once(
    champion, batches, tmp_path, ranges
):
    plan = plan_scoring(
        champion, input_files(batches), tmp_path / "out", id_column=ID, chunk_rows=CHUNK_ROWS
    )
    results = [score_range(champion, plan, item) for item in ranges]

    with pytest.raises(ValueError, match="do not cover"):
        finish_scoring(champion, plan, results)
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


def test_a_range_refuses_a_model_the_plan_was_not_made_for(store, champion, batches, tmp_path):
    plan = plan_scoring(
        champion, input_files(batches), tmp_path / "out", id_column=ID, chunk_rows=CHUNK_ROWS
    )
    other = load_scoring_model(f"models:/{MODEL}/2")

    with pytest.raises(ValueError, match="another model"):
        score_range(other, plan, ChunkRange(0))
    assert not list((tmp_path / "out").glob("part-*"))


def test_an_error_policy_stops_the_range_naming_file_and_rows(champion, batches, tmp_path):
    plan = plan_scoring(
        champion,
        input_files(batches),
        tmp_path / "out",
        id_column=ID,
        chunk_rows=CHUNK_ROWS,
        invalid_rows="error",
    )

    with pytest.raises(DataError, match=r"day_0\.parquet") as caught:
        score_range(champion, plan, ChunkRange(0))
    assert "row 3: salary is missing" in caught.value.render()


def test_a_worker_loads_the_model_once_and_checks_its_weights(store, champion, batches, tmp_path):
    plan = plan_scoring(
        champion, input_files(batches), tmp_path / "out", id_column=ID, chunk_rows=CHUNK_ROWS
    )
    job = fanout.make_job(champion, plan, tracking_uri=store["uri"], registry_uri=store["uri"])

    first = fanout.worker_model(job)
    assert fanout.worker_model(job) is first
    assert first.weights_sha256 == champion.weights_sha256
    result = fanout.score_job_range(job, ChunkRange(1))
    assert result.rows == 70 and result.written == 5

    tampered = fanout.ScoringJob(
        plan=plan,
        model_uri=job.model_uri,
        weights_sha256="0" * 64,
        tracking_uri=store["uri"],
        registry_uri=store["uri"],
    )
    with pytest.raises(RegistryError, match="other weights"):
        fanout.worker_model(tampered)


def test_task_runner_options_start_a_loopback_cluster_or_join_one():
    local = fanout.task_runner_options(DaskSpec(workers=3, threads_per_worker=2))
    assert local == {
        "cluster_kwargs": {
            "n_workers": 3,
            "processes": True,
            "threads_per_worker": 2,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        }
    }
    remote = fanout.task_runner_options(DaskSpec(address="tcp://10.0.0.5:8786"))
    assert remote == {"address": "tcp://10.0.0.5:8786"}


def test_ranges_of_an_empty_parquet_file_still_count_it(champion, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    frame = synthetic_frame(20, seed=1)
    frame.iloc[:0].to_parquet(folder / "a.parquet", index=False)
    frame.to_parquet(folder / "b.parquet", index=False)
    files = input_files(folder)
    score_files(
        champion, files, tmp_path / "single", id_column=ID, chunk_rows=CHUNK_ROWS, progress=False
    )

    result, ranges = fan_out(champion, files, tmp_path / "fanned", chunks_per_range=1)

    assert ranges[0] == ChunkRange(0, 0, None)
    assert folder_bytes(tmp_path / "fanned") == folder_bytes(tmp_path / "single")
    assert [item["rows"] for item in result.manifest["input"]["files"]] == [0, 20]
    assert np.sum(result.manifest["score_histogram"]["counts"]) == 20


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("score.dask.address=localhost:8786", "must be a Dask scheduler address like"),
        ("score.runner=ray", "score.runner: must be 'local' or 'dask'"),
        ("score.dask.workers=0", "score.dask.workers: must be greater than or equal to 1"),
        ("score.dask.chunks_per_task=0", "score.dask.chunks_per_task: must be greater than"),
    ],
    ids=["address", "runner", "workers", "chunks-per-task"],
)
def test_the_spec_checks_the_dask_settings(repo_root, override, message):
    with pytest.raises(SpecError) as caught:
        load_spec(repo_root / "configs" / "credit.yaml", [override], check_paths=False)
    assert message in caught.value.render()


def test_the_spec_defaults_to_the_local_runner_and_a_two_worker_cluster(repo_root):
    score = load_spec(repo_root / "configs" / "credit.yaml", check_paths=False).spec.score
    assert score.runner == "local"
    assert score.dask == DaskSpec(address=None, workers=2, threads_per_worker=1)
