"""The retraining run's lineage record: the batches it read, and the drift report behind it."""

from __future__ import annotations

from stemma.components.platform.lineage import build_retrain_record, input_node_id, run_node_id

DAY = "logs/endpoint/predictions/2025-06-01"


def _record(cause: dict[str, str], inputs: dict[str, str] | None):
    return build_retrain_record(
        pipeline="credit",
        run_id="retrain-run",
        cause=cause,
        previous_data_md5="old.dir",
        data_md5="new.dir",
        data_pointer="data.dvc",
        train_run_id="train-run",
        model_name="credit",
        model_version="2",
        shadow_run_id=None,
        decision="not_promoted",
        sources={"2025-06-01": 500},
        inputs=inputs,
    )


def test_each_batch_read_is_an_input_of_the_run_and_the_judged_day_is_one_node():
    cause = {"kind": "drift_report", "run_id": "monitor-run", "batch": DAY, "batch_digest": "d1"}
    inputs = {DAY: "d1", "logs/endpoint/predictions/2025-06-02": "d2"}
    record = _record(cause, inputs)
    run = run_node_id("retrain-run")
    judged, other = input_node_id(DAY, "d1"), input_node_id(*list(inputs.items())[1])
    ids = [node.id for node in record.nodes]
    assert ids.count(judged) == 1 and ids.count(other) == 1
    edges = {(edge.source, edge.target, edge.relation) for edge in record.edges}
    # the day the drift report judged is the day the run read: report and run meet on it
    assert (judged, run_node_id("monitor-run"), "monitored_in") in edges
    assert (run_node_id("monitor-run"), run, "caused") in edges
    assert {(judged, run, "input_of"), (other, run, "input_of")} <= edges
    (second,) = [node for node in record.nodes if node.id == other]
    assert second.digest == "md5:d2" and second.attributes == {
        "path": "logs/endpoint/predictions/2025-06-02",
        "role": "batch",
    }


def test_a_record_without_inputs_is_as_before():
    record = _record({"kind": "schedule"}, None)
    assert not [node for node in record.nodes if node.kind == "input"]
