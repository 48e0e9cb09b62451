"""The compare flow end to end: a trained credit model and its quantized variants, compared,
recorded in one MLflow run, and the cheapest served by batch scoring with
``compress.serve: cheapest``; and `stemma run compare` printing the table."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from stemma.components.quantization import registering as q

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "compared"
PIPELINE = [f"pipeline.name={NAME}", f"pipeline.model_name={NAME}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]
#: Every variant that runs passes, whatever the machine's load (the quantize flow's path).
QUANTIZE = [
    "quantize.methods=[int8_weight_only, bf16]",
    "quantize.min_speedup=0.01",
    "quantize.max_metric_drop=1.0",
    "quantize.repeats=3",
    "quantize.warmup=1",
]


@pytest.fixture(scope="module")
def compared(template_project, tmp_path_factory) -> dict:
    """`compared` v1 trained, quantized (two variants), then compared by the flow."""
    from stemma.flows.compare import compare_flow
    from stemma.flows.quantize import quantize_flow
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("compare") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    config = str(root / "configs" / "credit.yaml")
    train_flow(config=config, overrides=[*TRAIN, *PIPELINE])
    quantize_flow(config=config, overrides=[*PIPELINE, *QUANTIZE])
    summary = compare_flow(config=config, overrides=PIPELINE)
    return {"root": root, "config": config, "summary": summary}


def test_the_flow_records_the_table_plot_metrics_description_and_alias(compared, tmp_path):
    summary = compared["summary"]
    client = mlflow.MlflowClient()
    table = summary["table"]
    assert summary["parent_version"] == "1" and len(table) == 3
    assert [row["chain"] for row in table] == ["fp32 (parent)", "int8_weight_only", "bf16"]
    run = client.get_run(summary["run_id"])
    assert run.data.tags["stemma.flow"] == "compare"
    for row in table:
        assert run.data.metrics[f"compare/v{row['version']}.cost_per_million"] == pytest.approx(
            row["cost_per_million"]
        )
    folder = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path))
    )
    logged = pd.read_csv(folder / "compare" / "variants.csv")
    assert [str(v) for v in logged["version"]] == [row["version"] for row in table]
    assert (folder / "compare" / "tradeoff.png").stat().st_size > 10_000
    assert (folder / "compare" / "variants.json").is_file()
    note = run.data.tags["mlflow.note.content"]
    assert "Variants of compared v1" in note and "int8_weight_only" in note
    # the alias names the cheapest passing model, or is absent when the parent is
    aliases = client.get_registered_model(NAME).aliases
    cheapest = min(table, key=lambda row: row["cost_per_million"])
    if cheapest["version"] == "1":
        assert q.cheapest_alias("1") not in aliases and summary["cheapest_alias"] is None
    else:
        assert str(aliases[q.cheapest_alias("1")]) == cheapest["version"]
        assert summary["cheapest_alias"] == cheapest["version"]


def test_batch_scoring_with_serve_cheapest_scores_the_alias(compared):
    from stemma.flows.score import score_flow

    client = mlflow.MlflowClient()
    bf16 = compared["summary"]["table"][2]["version"]
    client.set_registered_model_alias(NAME, q.cheapest_alias("1"), bf16)  # as a comparison would
    scored = score_flow(
        config=compared["config"],
        overrides=[*PIPELINE, "compress.serve=cheapest"],
        output=str(compared["root"] / "out" / "cheapest"),
    )
    assert scored["model_version"] == bf16
    assert f"bf16 variant {NAME} v{bf16} of {NAME} v1" in scored["serving"]


def test_stemma_run_compare_prints_the_table(compared, stemma_exe, prefect_api):
    args = [*stemma_exe, "run", "compare", "configs/credit.yaml", "--model", f"models:/{NAME}/1"]
    for override in PIPELINE:
        args += ["--set", override]
    done = subprocess.run(
        args,
        cwd=compared["root"],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"compared {NAME} v1 with 2 variant(s)" in out
    for column in ("model", "method", "p50 b1 ms", "p50 b64 ms", "p50 b4096 ms", "cost/M USD"):
        assert column in out
    assert "int8_weight_only" in out and "bf16" in out and "fp32 (parent)" in out
    assert "compare/tradeoff.png" in out
