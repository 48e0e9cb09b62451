"""Faults of batch scoring with real processes and signals: kills at every stage, two
scorings racing for one folder, parts changed behind the manifest's back, stale locks, the
MLflow run of a killed scoring, and empty inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from stemma.components.errors import DataError
from stemma.components.platform import locks
from stemma.components.platform.locks import LOCK_FILE, FolderBusyError
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.scoring.engine import (
    SUCCESS_FILE,
    abandon_scoring,
    finish_scoring,
    input_files,
    load_scoring_model,
    plan_ranges,
    plan_scoring,
    score_files,
)
from stemma.components.scoring.job import score_range
from tests.components.scoring.test_scoring import ID, MODEL, folder_bytes, register, synthetic_frame
from tests.support import isolated_mlflow

#: Rows of the big input, and rows per chunk: ~150 parts, so a scoring lasts long enough
#: to be stopped at a chosen point.
BIG_ROWS = 300_000
BIG_CHUNK_ROWS = 2_000
#: How long a child may take to reach a point (it imports torch and MLflow first).
REACH_SECONDS = 120
POLL_SECONDS = 0.002
#: A scoring's owner line, as the refusal names it.
HOLDER = r"being written by pid {pid} on host \S+ since \d\d:\d\d:\d\d \(heartbeat \d+ s ago\)"

# A scoring in a child process. With a hold point it stops there (it touches the marker
# and sleeps) so that the parent can kill it exactly at that point.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from stemma.components.scoring import engine as scoring
    from stemma.components.scoring import output as scoring_output

    reference, source, output, chunk_rows, hold, marker = sys.argv[1:7]

    def reached():
        Path(marker).touch()
        time.sleep(600)

    if hold.startswith("part-"):
        wanted, calls = int(hold.removeprefix("part-")), []
        write_part = scoring_output.write_part
        def holding_write_part(path, payload, rows):
            if path.parent.name != scoring.REJECTS_DIR:
                calls.append(path)
                if len(calls) == wanted:
                    reached()
            return write_part(path, payload, rows)
        scoring_output.write_part = holding_write_part
    elif hold in ("before-success", "during-publish"):
        write_atomically = scoring_output.write_atomically
        def holding_write(path, data, **kwargs):
            if path.name == scoring.SUCCESS_FILE:
                if hold == "during-publish":  # half the manifest is in its temporary file
                    temporary = path.with_name(f"{scoring.TEMP_PREFIX}{__import__('os').getpid()}-{path.name}")
                    temporary.write_bytes(bytes(data)[: len(data) // 2])
                reached()
            return write_atomically(path, data, **kwargs)
        scoring_output.write_atomically = holding_write

    model = scoring.load_scoring_model(reference)
    result = scoring.score_files(model, [Path(source)], Path(output), id_column="application_id",
                                 chunk_rows=int(chunk_rows), threads=1, progress=False)
    print(result.summary())
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-store")
    with isolated_mlflow():
        uri = configure_tracking(root)
        experiment_id = ensure_experiment("scoring-faults", root)
        register(MlflowClient(), MODEL, experiment_id, root / "v1", seed=3, alias="champion")
        yield {"root": root, "uri": uri}


@pytest.fixture(scope="module")
def champion(store):
    return load_scoring_model(f"models:/{MODEL}@champion")


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "batch.parquet"
    synthetic_frame(BIG_ROWS, seed=5).to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def clean_output(champion, big_input, tmp_path_factory) -> Path:
    """The big input scored without interruption: what every faulted run must end as."""
    output = tmp_path_factory.mktemp("clean") / "scores"
    score_files(
        champion, [big_input], output, id_column=ID, chunk_rows=BIG_CHUNK_ROWS, progress=False
    )
    return output


def start_child(store, source: Path, output: Path, chunk_rows: int, hold: str, marker: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_REGISTRY_URI": store["uri"]}
    command = [sys.executable, "-c", CHILD, f"models:/{MODEL}@champion", str(source)]
    command += [str(output), str(chunk_rows), hold, str(marker)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, child: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + REACH_SECONDS
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"the child ended before {what}: {child.stderr.read()[-3000:]!r}")
        assert time.monotonic() < deadline, f"the child never reached {what}"
        time.sleep(POLL_SECONDS)


def pause(child: subprocess.Popen) -> None:
    """SIGSTOP the child and wait until every one of its threads is stopped.

    The signal is delivered asynchronously: a listing taken right after `send_signal` can
    still race a writer thread finishing its part.
    """
    child.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{child.pid}/task")

    def all_stopped() -> bool:
        states = []
        for task in tasks.iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_for(all_stopped, child, "a full stop")


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()


def rows_lost(output: Path, source: Path) -> int:
    """Ids missing from the scored and rejects parts, plus ids found more than once."""
    if source.suffix == ".csv":
        expected = set(pd.read_csv(source)[ID].tolist())
    else:
        expected = set(pq.read_table(source, columns=[ID]).column(0).to_pylist())
    found: list[int] = []
    for part in sorted(output.glob("part-*.parquet")) + sorted(output.glob("rejects/part-*")):
        found += pq.read_table(part, columns=[ID]).column(0).to_pylist()
    return len(expected - set(found)) + (len(found) - len(set(found)))


def part_fingerprints(output: Path) -> set[str]:
    return {
        pq.read_schema(part).metadata[b"stemma.fingerprint"].decode()
        for part in output.glob("part-*.parquet")
    }


# ---------------------------------------------------------------------------------------
# Kills


@pytest.mark.slow
@pytest.mark.fault_case("fault")
@pytest.mark.parametrize(
    "hold",
    ["part-1", "part-60", "before-success", "during-publish"],
    ids=["before-first-part", "mid-parts", "after-last-part", "during-publish"],
)
def test_a_scoring_killed_at_any_point_resumes_to_the_bytes_of_an_uninterrupted_one(
    store, champion, big_input, clean_output, tmp_path, fault_ledger, hold
):
    output, marker = tmp_path / "scores", tmp_path / "reached"
    child = start_child(store, big_input, output, BIG_CHUNK_ROWS, hold, marker)
    try:
        wait_for(marker.exists, child, hold)
        child.send_signal(signal.SIGKILL)
    finally:
        stop(child)
    assert not (output / SUCCESS_FILE).exists()
    assert locks.read_owner(output).pid == child.pid  # left behind, stale

    resumed = score_files(
        champion, [big_input], output, id_column=ID, chunk_rows=BIG_CHUNK_ROWS, progress=False
    )

    fault_ledger.lost_rows(rows_lost(output, big_input))
    assert folder_bytes(output) == folder_bytes(clean_output)
    assert rows_lost(output, big_input) == 0
    assert not resumed.already_complete
    assert resumed.rows_scored == BIG_ROWS
    if hold == "part-1":
        assert resumed.parts_skipped == 0
    elif hold == "part-60":
        assert resumed.parts_skipped == 59
    else:
        assert resumed.parts_skipped == BIG_ROWS // BIG_CHUNK_ROWS
    assert not (output / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------
# Two scorings, one folder


@pytest.mark.slow
@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("second_chunk_rows", [BIG_CHUNK_ROWS, 5_000], ids=["same", "other-chunks"])
def test_a_second_scoring_is_refused_while_the_first_is_paused(
    store, champion, big_input, clean_output, tmp_path, fault_ledger, second_chunk_rows
):
    output, marker = tmp_path / "scores", tmp_path / "never"
    first = start_child(store, big_input, output, BIG_CHUNK_ROWS, "none", marker)
    try:
        wait_for(lambda: len(list(output.glob("part-*.parquet"))) >= 10, first, "10 parts")
        pause(first)
        before = sorted(path.name for path in output.iterdir())

        with pytest.raises(FolderBusyError, match=HOLDER.format(pid=first.pid)):
            score_files(
                champion,
                [big_input],
                output,
                id_column=ID,
                chunk_rows=second_chunk_rows,
                progress=False,
            )
        # Nothing of the paused scoring was touched: its temporaries included.
        assert sorted(path.name for path in output.iterdir()) == before
        assert locks.read_owner(output).pid == first.pid

        first.send_signal(signal.SIGCONT)
        _, errors = first.communicate(timeout=REACH_SECONDS)
        assert first.returncode == 0, errors.decode()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
        stop(first)

    fault_ledger.lost_rows(rows_lost(output, big_input))
    assert folder_bytes(output) == folder_bytes(clean_output)
    assert rows_lost(output, big_input) == 0
    manifest = json.loads((output / SUCCESS_FILE).read_text())
    assert part_fingerprints(output) == {manifest["fingerprint"]}

    # Once the folder is free, the second scoring runs: never a manifest over mixed parts.
    second = score_files(
        champion, [big_input], output, id_column=ID, chunk_rows=second_chunk_rows, progress=False
    )
    assert second.already_complete == (second_chunk_rows == BIG_CHUNK_ROWS)
    assert part_fingerprints(output) == {second.manifest["fingerprint"]}
    assert len(second.manifest["parts"]) == -(-BIG_ROWS // second_chunk_rows)
    assert rows_lost(output, big_input) == 0


@pytest.mark.fault_case("fault")
def test_a_fanned_out_job_holds_the_folder_until_it_ends(champion, tmp_path, fault_ledger):
    source = tmp_path / "in.parquet"
    synthetic_frame(6_000, seed=2).to_parquet(source, index=False)
    output = tmp_path / "scores"
    plan = plan_scoring(champion, [source], output, id_column=ID, chunk_rows=1_000)
    try:
        with pytest.raises(FolderBusyError, match=HOLDER.format(pid=os.getpid())):
            score_files(champion, [source], output, id_column=ID, chunk_rows=500, progress=False)
        results = [score_range(champion, plan, item) for item in plan_ranges(plan, 2)]
        result = finish_scoring(champion, plan, results)
    finally:
        abandon_scoring(plan)
    fault_ledger.lost_rows(rows_lost(output, source))
    assert result.rows_scored == 6_000 and rows_lost(output, source) == 0
    assert not (output / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------
# Parts that changed after they were written


def damage(path: Path, how: str) -> None:
    if how == "changed":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "deleted":
        path.unlink()
    elif how == "swapped":  # a valid part of the same scoring, in another part's place
        shutil.copy(path.with_name("part-00000-00000.parquet"), path)


@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("how", ["changed", "truncated", "deleted", "swapped"])
def test_a_part_damaged_after_success_is_scored_again_not_trusted(
    champion, tmp_path, fault_ledger, how
):
    source = tmp_path / "in.parquet"
    synthetic_frame(10_000, seed=3).to_parquet(source, index=False)
    output = tmp_path / "scores"
    score_files(champion, [source], output, id_column=ID, chunk_rows=2_000, progress=False)
    pristine = folder_bytes(output)
    damage(output / "part-00000-00003.parquet", how)

    again = score_files(champion, [source], output, id_column=ID, chunk_rows=2_000, progress=False)

    fault_ledger.lost_rows(rows_lost(output, source))
    assert not again.already_complete
    assert (again.parts_written, again.parts_skipped) == (1, 4)
    assert folder_bytes(output) == pristine
    assert rows_lost(output, source) == 0


@pytest.mark.fault_case("fault")
def test_no_manifest_is_written_over_a_part_that_changed_after_it_was_written(
    champion, tmp_path, fault_ledger
):
    source = tmp_path / "in.parquet"
    synthetic_frame(6_000, seed=4).to_parquet(source, index=False)
    output = tmp_path / "scores"
    plan = plan_scoring(champion, [source], output, id_column=ID, chunk_rows=1_000)
    results = [score_range(champion, plan, item) for item in plan_ranges(plan, 3)]
    damage(output / "part-00000-00004.parquet", "changed")

    with pytest.raises(DataError, match=r"1 part read back from disk differ") as caught:
        finish_scoring(champion, plan, results)
    assert "part-00000-00004.parquet: sha256" in caught.value.render()
    assert not (output / SUCCESS_FILE).exists()
    assert not (output / "part-00000-00004.parquet").exists()

    repaired = score_files(
        champion, [source], output, id_column=ID, chunk_rows=1_000, progress=False
    )
    fault_ledger.lost_rows(rows_lost(output, source))
    assert (repaired.parts_written, repaired.parts_skipped) == (1, 5)
    assert rows_lost(output, source) == 0


# ---------------------------------------------------------------------------------------
# Stale and live locks


def write_record(folder: Path, *, host: str, pid: int, started: float, heartbeat: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "host": host,
        "pid": pid,
        "process_started": started,
        "command": "python score.py",
        "purpose": "scoring with credit-score v1",
        "started_at": heartbeat,
        "heartbeat": heartbeat,
        "token": uuid.uuid4().hex,
    }
    (folder / LOCK_FILE).write_text(json.dumps(record))


@pytest.fixture
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("owner", ["dead-pid", "silent-other-host"])
def test_a_stale_lock_is_taken_over_with_a_note(
    champion, tmp_path, fault_ledger, caplog, dead_pid, owner
):
    source = tmp_path / "in.parquet"
    synthetic_frame(3_000, seed=6).to_parquet(source, index=False)
    output = tmp_path / "scores"
    now = time.time()
    if owner == "dead-pid":
        write_record(output, host=socket.gethostname(), pid=dead_pid, started=now, heartbeat=now)
        reason = f"pid {dead_pid} on host {socket.gethostname()} no longer runs"
    else:
        old = now - locks.STALE_AFTER_SECONDS - 5
        write_record(output, host="elsewhere.invalid", pid=os.getpid(), started=old, heartbeat=old)
        reason = "its heartbeat from host elsewhere.invalid is"

    with caplog.at_level("WARNING", logger="stemma.components.platform.locks"):
        result = score_files(
            champion, [source], output, id_column=ID, chunk_rows=1_000, progress=False
        )

    fault_ledger.lost_rows(rows_lost(output, source))
    assert result.rows_scored == 3_000 and rows_lost(output, source) == 0
    assert re.search(
        rf"took over the lock of {re.escape(str(output))} .*{re.escape(reason)}", caplog.text
    )
    assert not (output / LOCK_FILE).exists()


@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("heartbeat_age", [0, 3_600], ids=["fresh", "old-heartbeat"])
def test_a_lock_whose_owner_lives_is_never_taken_over(
    champion, tmp_path, fault_ledger, heartbeat_age
):
    source = tmp_path / "in.parquet"
    synthetic_frame(1_000, seed=7).to_parquet(source, index=False)
    output = tmp_path / "scores"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(owner.pid).create_time()
        beat = time.time() - heartbeat_age
        write_record(
            output, host=socket.gethostname(), pid=owner.pid, started=started, heartbeat=beat
        )
        record = (output / LOCK_FILE).read_bytes()

        with pytest.raises(FolderBusyError, match=HOLDER.format(pid=owner.pid)) as caught:
            score_files(champion, [source], output, id_column=ID, chunk_rows=500, progress=False)
        assert "it runs: python score.py" in caught.value.render()
        assert (output / LOCK_FILE).read_bytes() == record
        assert not list(output.glob("part-*"))
        fault_ledger.lost_rows(0)
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.fault_case("fault")
def test_a_waiting_scoring_runs_once_the_holder_lets_go(champion, tmp_path, fault_ledger):
    source = tmp_path / "in.parquet"
    synthetic_frame(2_000, seed=8).to_parquet(source, index=False)
    output = tmp_path / "scores"
    holder = locks.FolderLock(output, purpose="test").acquire()
    release = threading.Timer(1.0, holder.release)
    release.start()
    try:
        result = score_files(
            champion,
            [source],
            output,
            id_column=ID,
            chunk_rows=1_000,
            progress=False,
            lock_wait_seconds=30,
        )
    finally:
        release.join()
        holder.release()
    fault_ledger.lost_rows(rows_lost(output, source))
    assert result.rows_scored == 2_000 and rows_lost(output, source) == 0


# ---------------------------------------------------------------------------------------
# Empty inputs


@pytest.mark.fault_case("bad_input")
def test_a_zero_byte_file_is_refused_naming_it(champion, tmp_path, fault_ledger):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.parquet"):
        score_files(champion, input_files(folder), tmp_path / "out", id_column=ID, chunk_rows=100)
    fault_ledger.lost_rows(0)
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


@pytest.mark.fault_case("bad_input")
@pytest.mark.parametrize("kind", ["header-only-csv", "zero-row-parquet"])
def test_an_input_without_rows_gives_an_empty_output_that_says_zero_rows(
    champion, tmp_path, fault_ledger, kind
):
    """A batch with no rows is not an error (a quiet day): the output is complete and empty."""
    frame = synthetic_frame(1, seed=9).iloc[:0]
    source = tmp_path / ("in.csv" if kind == "header-only-csv" else "in.parquet")
    if kind == "header-only-csv":
        frame.to_csv(source, index=False)
    else:
        frame.to_parquet(source, index=False)

    result = score_files(champion, [source], tmp_path / "out", id_column=ID, chunk_rows=100)

    fault_ledger.lost_rows(rows_lost(tmp_path / "out", source))
    assert (result.rows_input, result.rows_scored, result.rows_rejected) == (0, 0, 0)
    assert result.manifest["rows"] == {"input": 0, "scored": 0, "rejected": 0}
    assert "scored 0 rows (0 rejected)" in result.summary()
    # No part: the manifest alone says the input had no rows, and names the columns.
    assert result.manifest["parts"] == [] and not list((tmp_path / "out").glob("part-*"))
    assert result.manifest["columns"][0] == ID


# ---------------------------------------------------------------------------------------
# The MLflow run of a killed scoring

FLOW_CHILD = textwrap.dedent(
    """
    import sys
    from stemma.flows.score import score_flow
    score_flow(config=sys.argv[1], input=sys.argv[2], output=sys.argv[3], overrides=sys.argv[4:])
    """
)
FLOW_OVERRIDES = ["pipeline.name=faults", "pipeline.model_name=faults"]


@pytest.fixture(scope="module")
def trained_project(prefect_api, mlflow_uri, template_project, tmp_path_factory) -> Path:
    """A project whose model `faults` has a champion, and a batch of BIG_ROWS rows."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("faults") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(
        config=str(root / "configs" / "credit.yaml"),
        overrides=[
            *FLOW_OVERRIDES,
            "train.epochs=2",
            "train.early_stopping=null",
            "train.batch_size=256",
        ],
    )
    batches = sorted((root / "data/credit/batches").glob("*.parquet"))
    day = pd.concat([pd.read_parquet(path) for path in batches], ignore_index=True)
    big = pd.concat([day] * -(-BIG_ROWS // len(day)), ignore_index=True).iloc[:BIG_ROWS]
    big["application_id"] = range(BIG_ROWS)
    big.to_parquet(root / "big.parquet", index=False)
    return root


@pytest.mark.slow
@pytest.mark.fault_case("fault")
@pytest.mark.parametrize("rerun", ["same-scoring", "other-scoring"])
def test_the_mlflow_run_of_a_killed_scoring_is_resumed_or_marked_killed(
    prefect_api, trained_project, tmp_path, fault_ledger, rerun
):
    from stemma.flows.score import OWNER_TAG, score_flow

    config = str(trained_project / "configs" / "credit.yaml")
    source, output = trained_project / "big.parquet", trained_project / "outputs" / rerun
    overrides = [*FLOW_OVERRIDES, f"score.chunk_rows={BIG_CHUNK_ROWS}"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    command = [sys.executable, "-c", FLOW_CHILD, config, str(source), str(output), *overrides]
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(output.glob("part-*.parquet"))) >= 10, child, "10 parts")
        child.send_signal(signal.SIGKILL)
    finally:
        stop(child)
    client = MlflowClient()
    (orphan,) = [
        run
        for run in client.search_runs(
            [experiment.experiment_id for experiment in client.search_experiments()],
            filter_string="tags.`stemma.flow` = 'score' and attributes.status = 'RUNNING'",
        )
        if json.loads(run.data.tags[OWNER_TAG])["pid"] == child.pid
    ]

    again = overrides if rerun == "same-scoring" else [*overrides[:-1], "score.chunk_rows=7000"]
    summary = score_flow(config=config, input=str(source), output=str(output), overrides=again)

    fault_ledger.lost_rows(rows_lost(output, source))
    assert rows_lost(output, source) == 0 and summary["rows"]["scored"] == BIG_ROWS
    before = client.get_run(orphan.info.run_id)
    after = client.get_run(summary["run_id"])
    assert after.info.status == "FINISHED"
    if rerun == "same-scoring":
        assert summary["run_id"] == orphan.info.run_id
        assert after.data.tags["stemma.score.resumes"] == "1"
        assert summary["resumed_parts"] >= 9
    else:
        assert summary["run_id"] != orphan.info.run_id
        assert before.info.status == "KILLED"
        assert f"pid {child.pid}" in before.data.tags["stemma.error"]
        assert "stopped before the scoring finished" in before.data.tags["stemma.error"]
    mine = [
        run
        for run in client.search_runs(
            [before.info.experiment_id], filter_string="attributes.status = 'RUNNING'"
        )
        if run.data.tags.get(OWNER_TAG, "").startswith("{")
        and json.loads(run.data.tags[OWNER_TAG])["pid"] == child.pid
    ]
    assert mine == []
