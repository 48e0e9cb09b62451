"""Every run the flows write, and every model version they register, carries at most twelve
of Stemma's tags, each documented for its flow or version kind in ``platform/tags.py``; the
rest is in lineage records and artifacts of the runs."""

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
#: The versions the runs register, by what happened to them (``tags.VERSION_TAGS`` kinds).
VERSION_KINDS = {
    "first champion, quantized, then replaced": "trained",
    "gate failed": "trained",
    "retrained, shadowed, promoted by the canary": "trained",
    "quantized variant": "variant",
}


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
        quantized = quantize_flow(
            config=config,
            overrides=[
                *PIPELINE,
                "quantize.methods=[int8_weight_only]",
                "quantize.min_speedup=0.01",
                "quantize.max_metric_drop=1.0",
                "quantize.repeats=3",
            ],
        )
        retrained = retrain_flow(
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
    (variant,) = [v["version"] for v in quantized["variants"] if v["version"]]
    numbers = [passed["model_version"], failed["model_version"]]
    numbers += [retrained["model_version"], variant]
    versions = {
        kind: client.get_model_version(NAME, str(number))
        for kind, number in zip(VERSION_KINDS, numbers, strict=True)
    }
    return {
        "client": client,
        "runs": runs,
        "versions": versions,
        "passed": passed,
        "failed": failed,
        "retrained": retrained,
        "canary": canary,
    }


@pytest.mark.parametrize("flow", FLOWS)
def test_each_run_carries_at_most_twelve_documented_tags(store, flow):
    runs = [run for run in store["runs"] if run.data.tags.get(tag_names.FLOW) == flow]
    assert runs, f"no {flow} run was written"
    for run in runs:
        tags = stemma_tags(run.data.tags)
        assert len(tags) <= tag_names.MAX_TAGS, (flow, sorted(tags))
        undocumented = sorted(key for key in tags if not documented(key, flow))
        assert not undocumented, f"{flow} run tags missing from tags.RUN_TAGS: {undocumented}"


@pytest.mark.parametrize("kind", list(VERSION_KINDS))
def test_each_model_version_carries_at_most_twelve_documented_tags(store, kind):
    tags = stemma_tags(store["versions"][kind].tags)
    assert len(tags) <= tag_names.MAX_TAGS, (kind, sorted(tags))
    documented_tags = tag_names.VERSION_TAGS[VERSION_KINDS[kind]]
    undocumented = sorted(key for key in tags if key not in documented_tags)
    assert not undocumented, f"{kind} version tags missing from tags.VERSION_TAGS: {undocumented}"


def test_every_version_kind_was_written(store):
    """The versions above are what their names say: the tags a kind collects are there."""
    versions = {kind: stemma_tags(v.tags) for kind, v in store["versions"].items()}
    first = versions["first champion, quantized, then replaced"]
    assert tag_names.QUANTIZE_SUMMARY in first and tag_names.PROMOTION_LAST in first
    assert versions["gate failed"][tag_names.GATE_DECISION] == "failed"
    retrained = store["versions"]["retrained, shadowed, promoted by the canary"]
    assert retrained.aliases == ["champion"] and tag_names.PROMOTION_LAST in retrained.tags
    assert versions["quantized variant"][tag_names.QUANTIZE_STATUS] == "registered"
    for kind, tags in versions.items():  # runtime.reason only where eager runs the version
        eager = tags[tag_names.RUNTIME_BACKEND] == "eager"
        assert (tag_names.RUNTIME_REASON in tags) == eager, kind
        assert (tag_names.ONNX_SHA256 in tags) != eager, kind


def test_what_left_the_versions_is_on_their_runs(store):
    from stemma.components.lineage.index import RecordIndex
    from stemma.components.lineage.resolve import resolve_reference
    from stemma.components.registry.gate import GateDecision, recorded_decision

    client = store["client"]
    version = store["versions"]["retrained, shadowed, promoted by the canary"]
    # the gate's whole decision: on the training run, read back with the version's tags
    decision = GateDecision.from_tags(
        version.tags, "binary", recorded_decision(client, version.run_id)
    )
    assert (decision.passed, decision.alias) == (True, "challenger") and decision.reasons
    assert decision.champion_version == str(store["passed"]["model_version"])
    # the cause: the training run's parent is the retraining run
    training = client.get_run(version.run_id)
    assert training.data.tags[tag_names.DATA_FILE_MD5]
    retraining = client.get_run(training.data.tags["mlflow.parentRunId"])
    assert retraining.data.tags[tag_names.CAUSE_KIND] == "schedule"
    assert retraining.data.tags[tag_names.MODEL_VERSION] == str(version.version)
    # lineage starts from the version without a stemma.run_id tag
    node = f"models:/{NAME}/{version.version}"
    assert resolve_reference(node, RecordIndex(client), Path.cwd()) == node
    # a variant's numbers are in its quantize run's record
    variant = store["versions"]["quantized variant"]
    record = lineage.read_run_record(client, variant.run_id)
    (numbers,) = [v for v in record.variants if v["version"] == str(variant.version)]
    assert numbers["speedup"] > 0 and numbers["reasons"]


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
