"""Latency per version at registration, and the cost of every scoring run, through the real
flows (Prefect API, MLflow on SQLite, the worked example's project)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from stemma.components.platform.describe import NOTE_TAG
from stemma.components.registry import latency
from stemma.components.registry.promotion import promote
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec.compress import PROBE_BATCH_SIZES
from stemma.flows.cli import main
from stemma.flows.cli.summaries import format_score_summary

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "costs"
TRAIN = [
    "train.epochs=2",
    "train.early_stopping=null",
    "train.batch_size=256",
    f"pipeline.name={NAME}",
    f"pipeline.model_name={NAME}",
]
#: A spec's own machine: 8 cores at 0.72 EUR an hour.
OWN_MACHINE = [
    "cost.currency=EUR",
    "cost.machines={box: {price_per_hour: 0.72, cpus: 8, description: eight cores}}",
    "cost.scoring=box",
    "cost.serving=box",
]


@pytest.fixture(scope="module")
def trained(template_project, tmp_path_factory) -> dict:
    """Two versions of `costs`, each trained and probed by `stemma run train`; v2 is then
    promoted to champion."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("costs") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    config = str(root / "configs" / "credit.yaml")
    first = train_flow(config=config, overrides=TRAIN)
    client = mlflow.MlflowClient()
    before = client.get_model_version(NAME, first["model_version"]).description
    second = train_flow(
        config=config, overrides=[*TRAIN, "train.seed=11", "gate.margin_over_champion=-1"]
    )
    return {"root": root, "config": config, "runs": [first, second], "v1_before": before}


def _figures(description: str) -> str:
    return next(b for b in description.split("\n\n") if b.startswith("Latency and cost"))


def test_registered_versions_state_their_latency_and_keep_it_through_promotion(trained, tmp_path):
    client = mlflow.MlflowClient()
    first, second = trained["runs"]
    assert first["latency"]["error"] is None and second["latency"]["error"] is None

    path = client.download_artifacts(first["run_id"], latency.PROBE_ARTIFACT, str(tmp_path))
    probe = json.loads(Path(path).read_text())
    assert [batch["rows"] for batch in probe["batches"]] == list(PROBE_BATCH_SIZES)
    for batch in probe["batches"]:
        assert 0 < batch["p50_ms"] <= batch["p95_ms"] <= batch["p99_ms"]
    assert probe["backend"] == "onnxruntime"
    assert probe["cost"]["illustrative"] is True
    assert probe["cost"]["serving"]["machine"] == "cpu-small"
    metrics = client.get_run(first["run_id"]).data.metrics
    assert metrics["latency/p99_ms_b64"] == pytest.approx(probe["batches"][1]["p99_ms"])
    assert metrics["latency/cost_per_million"] > 0

    figures = _figures(trained["v1_before"])
    assert figures == first["latency"]["figures"]
    assert "p50" in figures and "p95" in figures and "p99" in figures
    assert "USD per million predictions on cpu-small (illustrative prices)" in figures
    assert probe["machine"] in figures

    second_version = second["model_version"]
    assert second["gate"]["alias"] == "challenger"
    promote(client, NAME, second_version, reason="cheaper to serve")

    for run in trained["runs"]:
        described = client.get_model_version(NAME, run["model_version"]).description
        assert _figures(described) == run["latency"]["figures"]
    model = client.get_registered_model(NAME).description
    assert model.startswith(f"**Champion: v{second_version}**")
    assert "Champion's cost: " in model and "per million predictions on cpu-small" in model

    # the second registration logged the plot of both versions
    logged = {item.path for item in client.list_artifacts(second["run_id"], "latency")}
    assert latency.PLOT_ARTIFACT in logged
    assert [d["model"]["version"] for d in latency.version_latencies(client, NAME)] == [
        first["model_version"],
        second_version,
    ]


def test_the_worked_example_network_probes_well_under_two_seconds(trained):
    model = load_scoring_model(f"models:/{NAME}/1")
    x = np.random.default_rng(0).normal(size=(500, model.preprocessor.n_inputs))

    began = time.perf_counter()
    profile = latency.probe_version(model.runtime, x.astype(np.float32))

    assert time.perf_counter() - began < 1.0
    assert len(profile.batches) == len(PROBE_BATCH_SIZES)


def test_scoring_run_logs_its_cpu_time_and_cost_on_the_spec_machine(trained, tmp_path):
    from stemma.flows.score import score_flow

    project = tmp_path / "project"
    shutil.copytree(trained["root"], project, symlinks=True)
    summary = score_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[*TRAIN, *OWN_MACHINE, "score.chunk_rows=500"],
    )

    run = mlflow.MlflowClient().get_run(summary["run_id"])
    metrics = run.data.metrics
    rows = summary["rows"]["input"]
    assert metrics["score/cpu_seconds"] > 0
    assert metrics["score/cpu_s_per_million"] == pytest.approx(
        metrics["score/cpu_seconds"] / rows * 1e6
    )
    assert metrics["score/cost_per_million"] == pytest.approx(
        metrics["score/cpu_s_per_million"] / 8 * 0.72 / 3600
    )
    assert run.data.params["cost.machine"] == "box"
    assert run.data.params["cost.currency"] == "EUR"
    cost = summary["cost"]
    assert cost["line"].startswith("cost: ")
    assert "EUR per million predictions on box" in cost["line"]
    assert "illustrative" not in cost["line"]
    assert cost["line"] in run.data.tags[NOTE_TAG]
    assert f"  {cost['line']}" in format_score_summary(summary).splitlines()


def test_validate_refuses_a_scoring_machine_the_spec_does_not_price(trained, tmp_path, capsys):
    spec = Path(trained["config"]).read_text()
    config = trained["root"] / "configs" / "unpriced.yaml"
    config.write_text(
        spec + "\ncost:\n  machines: {box: {price_per_hour: 0.5, cpus: 4}}\n  scoring: gpu-big\n"
    )

    assert main(["validate", str(config)]) == 2

    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "1 problem" in err
    assert "unpriced.yaml" in err and "cost" in err
    assert "cost.scoring names machine 'gpu-big'" in err and "(it has box)" in err
