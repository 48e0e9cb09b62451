"""Every run the flows write carries at most twelve of Stemma's tags, each documented for its
flow in ``platform/tags.py``; the rest is in the run's lineage record."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from stemma.components.platform import lineage
from stemma.components.platform import tags as tag_names
from tests.flows.test_shadow import day, production_project

pytestmark = [
    pytest.mark.usefixtures("prefect_api", "mlflow_uri"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

NAME = "tagged"
PIPELINE = [f"pipeline.name={NAME}", f"pipeline.model_name={NAME}", f"pipeline.experiment={NAME}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "evaluate.bootstrap_resamples=200"]
FLOWS = ("train", "score", "monitor", "shadow", "canary", "retrain", "quantize", "promote")


def stemma_tags(tags: dict[str, str]) -> dict[str, str]:
    """A run's or version's tags less MLflow's own (``mlflow.*``)."""
    return {key: value for key, value in tags.items() if not key.startswith("mlflow.")}


def documented(key: str, flow: str) -> bool:
    allowed = (*tag_names.COMMON_RUN_TAGS, *tag_names.RUN_TAGS[flow])
    index = (tag_names.LINEAGE_MADE_NODES, tag_names.LINEAGE_USED_NODES)
    return key in allowed or any(key.startswith(f"{tag}.") for tag in index)


@pytest.fixture(scope="module")
def store(template_project, tmp_path_factory) -> dict:
    """Every flow run on one project: training whose gate passes and one whose gate fails,
    scoring, monitoring, quantization, retraining (training, shadow), then a canary that
    promotes the retrained version."""
    from stemma.flows.canary import canary_flow
    from stemma.flows.monitor import monitor_flow
    from stemma.flows.quantize import quantize_flow
    from stemma.flows.retrain import retrain_flow
    from stemma.flows.score import score_flow
    from stemma.flows.train import train_flow

    root = production_project(template_project, tmp_path_factory.mktemp("tags"))
    config = str(root / "configs" / "credit.yaml")
    labels = str(root / "production" / "credit" / "labels")
    before = Path.cwd()
    os.chdir(root)
    try:
        passed = train_flow(config=config, overrides=[*PIPELINE, *TRAIN])
        failed = train_flow(config=config, overrides=[*PIPELINE, *TRAIN, "gate.minimum=0.999"])
        score_flow(config=config, overrides=PIPELINE, input=day(root, 1), output=str(root / "s"))
        monitor_flow(config=config, overrides=PIPELINE, batch=day(root, 1), labels=labels)
        quantize_flow(
            config=config,
            overrides=[
                *PIPELINE,
                "quantize.methods=[int8_weight_only]",
                "quantize.min_speedup=0.01",
                "quantize.max_metric_drop=1.0",
                "quantize.repeats=3",
            ],
        )
        retrain_flow(
            config=config,
            overrides=[
                *PIPELINE,
                *TRAIN,
                "retrain.min_new_rows=100",
                "gate.margin_over_champion=-0.5",
            ],
        )
        canary = canary_flow(
            config=config,
            overrides=[
                *PIPELINE,
                "evaluate.bootstrap_resamples=200",
                "evaluate.canary.steps=[1.0]",
                "evaluate.canary.guards.min_rows=100",
                "evaluate.canary.guards.min_labelled_rows=100",
                "evaluate.canary.guards.max_score_psi=2.0",
            ],
            batches=[day(root, 3)],
            labels=labels,
        )
    finally:
        os.chdir(before)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    return {"client": client, "runs": runs, "passed": passed, "failed": failed, "canary": canary}


@pytest.mark.parametrize("flow", FLOWS)
def test_each_run_carries_at_most_twelve_documented_tags(store, flow):
    runs = [run for run in store["runs"] if run.data.tags.get(tag_names.FLOW) == flow]
    assert runs, f"no {flow} run was written"
    for run in runs:
        tags = stemma_tags(run.data.tags)
        assert len(tags) <= tag_names.MAX_TAGS, (flow, sorted(tags))
        undocumented = sorted(key for key in tags if not documented(key, flow))
        assert not undocumented, f"{flow} run tags missing from tags.RUN_TAGS: {undocumented}"


def test_both_gate_verdicts_and_the_canary_promotion_were_written(store):
    """The runs above cover a failed gate and a promotion, not only the happy path."""
    assert store["passed"]["gate"]["passed"] and not store["failed"]["gate"]["passed"]
    (step,) = store["canary"]["steps"]
    assert (step["action"], step["outcome"]) == ("promote", "done")


def test_what_left_the_tags_is_in_the_lineage_records(store):
    client = store["client"]
    train = client.get_run(store["passed"]["run_id"])
    record = lineage.read_run_record(client, train.info.run_id)
    data_file = lineage.record_node(record, "data_file")
    validation = lineage.record_node(record, "validation")
    run_node = lineage.record_node(record, "run")
    assert data_file["attributes"]["path"] == "data/credit/train.parquet"
    assert validation["digest"].startswith("sha256:") and validation["attributes"]["success"]
    assert run_node["attributes"]["config"].endswith("credit.yaml")
    # the spec file and the overrides are the run's inputs: params
    assert train.data.params["config.path"].endswith("credit.yaml")
    assert "gate.minimum=0.999" not in train.data.params["config.overrides"]
    assert tag_names.CONFIG_PATH not in train.data.tags

    monitor = next(r for r in store["runs"] if r.data.tags.get(tag_names.FLOW) == "monitor")
    report = lineage.record_node(
        lineage.read_run_record(client, monitor.info.run_id), "drift_report"
    )
    assert (
        report["attributes"]["summary"].startswith("no drift") or report["attributes"]["detected"]
    )
