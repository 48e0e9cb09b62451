"""The tracked-run helper against a real MLflow on SQLite in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from stemma.components.errors import StemmaError
from stemma.components.platform import tags
from stemma.components.platform.lineage import (
    MADE_NODES_TAG,
    RECORD_ARTIFACT,
    USED_NODES_TAG,
    Edge,
    LineageRecord,
    Node,
    index_key,
    run_node_id,
)
from stemma.components.platform.tracked_run import tracked_run
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from tests.support import isolated_mlflow


@pytest.fixture
def experiment(tmp_path: Path, empty_store: Path):
    with isolated_mlflow():
        (tmp_path / ".stemma").mkdir()
        shutil.copyfile(empty_store, tmp_path / ".stemma" / "mlflow.db")
        configure_tracking(tmp_path)
        yield ensure_experiment("tracked", tmp_path)


def _run(run_id: str) -> Any:
    return MlflowClient().get_run(run_id)


def test_a_completed_block_ends_finished_with_everything_logged(
    experiment: str, tmp_path: Path
) -> None:
    folder = tmp_path / "plots"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    records: list[tuple[dict, str]] = []

    def write(record: dict) -> None:
        records.append((record, mlflow.active_run().info.run_id))

    with tracked_run(
        "job", experiment_id=experiment, tags={tags.FLOW: "test"}, lineage=write
    ) as run:
        assert mlflow.active_run().info.run_id == run.run_id
        assert _run(run.run_id).data.tags[tags.STATUS] == "running"
        run.log_params({"url": "https://user:secret@host/x", "long": "x" * 7000})
        run.log_metrics({"auc": 0.9, "rows": 3})
        run.log_dict({"a": 1}, "report/report.json")
        run.log_text("a: 1\n", "spec/resolved.yaml")
        digests = run.log_artifacts(folder, "plots")
        run.record_lineage({"nodes": [], "edges": []})

    stored = _run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.info.run_name == "job"
    assert stored.data.tags[tags.STATUS] == "completed"
    assert stored.data.tags[tags.FLOW] == "test"
    assert "secret" not in stored.data.params["url"]
    assert len(stored.data.params["long"]) == 6000
    assert stored.data.metrics == {"auc": 0.9, "rows": 3.0}
    assert sorted(digests) == ["plots/a.txt", "plots/sub/b.txt"]
    listed = {item.path for item in MlflowClient().list_artifacts(run.run_id, "plots")}
    assert listed == {"plots/a.txt", "plots/sub"}
    assert records == [({"nodes": [], "edges": []}, run.run_id)]
    assert mlflow.artifacts.load_text(f"runs:/{run.run_id}/spec/resolved.yaml") == "a: 1\n"
    assert mlflow.artifacts.load_dict(f"runs:/{run.run_id}/report/report.json") == {"a": 1}
    assert mlflow.active_run() is None


def test_an_error_ends_the_run_failed_with_the_reason(experiment: str) -> None:
    with (
        pytest.raises(StemmaError, match="bad input"),
        tracked_run("job", experiment_id=experiment, tags={}) as run,
    ):
        raise StemmaError("bad input")
    stored = _run(run.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags[tags.STATUS] == "failed"
    assert stored.data.tags[tags.ERROR] == "bad input"
    assert run.resumable is False
    assert mlflow.active_run() is None


def test_an_interruption_ends_the_run_killed_and_resumable(experiment: str) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        tracked_run("job", experiment_id=experiment, tags={}) as run,
    ):
        raise KeyboardInterrupt
    stored = _run(run.run_id)
    assert stored.info.status == "KILLED"
    assert stored.data.tags[tags.STATUS] == "interrupted"
    assert run.resumable is True

    with tracked_run(None, experiment_id=None, tags={}, run_id=run.run_id) as resumed:
        assert resumed.resumed
    assert resumed.run_id == run.run_id
    assert _run(run.run_id).info.status == "FINISHED"


def test_a_run_started_inside_another_is_nested(experiment: str) -> None:
    with tracked_run("outer", experiment_id=experiment, tags={}) as outer:
        with tracked_run("inner", experiment_id=experiment, tags={}) as inner:
            pass
        assert mlflow.active_run().info.run_id == outer.run_id
    assert _run(inner.run_id).data.tags["mlflow.parentRunId"] == outer.run_id


def test_a_detached_run_leaves_room_for_other_runs(experiment: str) -> None:
    seen: list[str] = []
    with tracked_run(
        "retrain",
        experiment_id=experiment,
        tags={},
        detached=True,
        lineage=lambda r: seen.append(mlflow.active_run().info.run_id),
    ) as run:
        assert mlflow.active_run() is None
        with tracked_run("train", experiment_id=experiment, tags={}) as inner:
            pass
        run.set_tags({"stemma.train.run_id": inner.run_id})
        run.record_lineage({"schema": "stemma.lineage/1"})
        assert mlflow.active_run() is None
    assert seen == [run.run_id]
    stored = _run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags[tags.STATUS] == "completed"
    # a child all the same: MLflow's runs table nests it under the detached run
    assert _run(inner.run_id).data.tags["mlflow.parentRunId"] == run.run_id
    with tracked_run("after", experiment_id=experiment, tags={}) as after:
        pass
    assert "mlflow.parentRunId" not in _run(after.run_id).data.tags


def test_a_detached_run_inside_an_active_one_is_its_child(experiment: str) -> None:
    with (
        tracked_run("canary", experiment_id=experiment, tags={}) as outer,
        tracked_run("promote", experiment_id=experiment, tags={}, detached=True) as inner,
    ):
        assert mlflow.active_run().info.run_id == outer.run_id
    assert _run(inner.run_id).data.tags["mlflow.parentRunId"] == outer.run_id


def test_a_detached_run_fails_like_an_active_one(experiment: str) -> None:
    with (
        pytest.raises(ValueError),
        tracked_run("retrain", experiment_id=experiment, tags={}, detached=True) as run,
    ):
        raise ValueError("broken")
    stored = _run(run.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags[tags.ERROR] == "ValueError('broken')"
    assert mlflow.active_run() is None

    kwargs = {"experiment_id": None, "tags": {}, "run_id": run.run_id, "detached": True}
    with tracked_run(None, **kwargs) as resumed:
        assert _run(run.run_id).info.status == "RUNNING"
    assert resumed.resumed and _run(run.run_id).info.status == "FINISHED"


def test_without_a_writer_the_record_and_its_index_tags_are_logged(experiment: str) -> None:
    record = LineageRecord(
        flow="test",
        pipeline="p",
        nodes=[Node("run", run_node_id("r1")), Node("data", "data:x", "abc")],
        edges=[Edge("data:x", run_node_id("r1"), "used")],
    )
    with tracked_run("job", experiment_id=experiment, tags={}) as run:
        run.record_lineage(record)
    stored = _run(run.run_id)
    # the record names another run's node: what the edges lead to counts as made
    assert stored.data.tags[MADE_NODES_TAG] == f"|run:{index_key(run_node_id('r1'))}|"
    assert stored.data.tags[USED_NODES_TAG] == f"|data:{index_key('data:x')}|"
    assert not [key for key in stored.data.tags if key.startswith("stemma.lineage.made.")]
    logged = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/{RECORD_ARTIFACT}")
    assert logged == record.to_dict()


def test_a_detached_run_may_use_its_own_client_and_end_as_it_says(experiment: str) -> None:
    client = MlflowClient()
    with tracked_run(
        "promote", experiment_id=experiment, tags={}, detached=True, client=client
    ) as run:
        assert run.client is client
        run.end_status = "FAILED"  # a refusal recorded, not an error
    stored = _run(run.run_id)
    assert stored.info.status == "FAILED"
    assert stored.data.tags[tags.STATUS] == "completed"
