"""The quantize flow end to end: a trained model, its variants, the registry and scoring.

The gate's outcome on real timings is tested in tests/components/quantization/test_quantization.py on
models chosen for it; here the bars are set so that the outcome does not depend on the
machine's load (a minimum speed-up of 0.01x: every variant that runs passes; 1000x:
none does), and the tests check what the flow does with each outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from stemma.components.errors import DataError, RegistryError
from stemma.components.quantization import methods
from stemma.components.quantization import registering as q
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.training.loop import predict_raw

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "quant"
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]
PIPELINE = [f"pipeline.name={NAME}", f"pipeline.model_name={NAME}"]
#: Every variant that runs passes: the flow's registration path, whatever the machine's load.
ALL_PASS = [
    "quantize.methods=[int8_weight_only, bf16, float8_dynamic, ort_int8_dynamic]",
    "quantize.min_speedup=0.01",
    "quantize.max_metric_drop=1.0",
    "quantize.repeats=5",
    "quantize.warmup=1",
]


def run_quantize(project: Path, *overrides: str, model: str | None = None) -> dict:
    from stemma.flows.quantize import quantize_flow

    return quantize_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[*PIPELINE, *overrides],
        model=model,
    )


def run_score(project: Path, *overrides: str, output: str) -> dict:
    from stemma.flows.score import score_flow

    return score_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[*PIPELINE, *overrides],
        output=str(project / output),
    )


@pytest.fixture(scope="module")
def quantized(template_project, tmp_path_factory) -> dict:
    """`quant` v1 trained (@champion), then quantized with every variant passing."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("quantize") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(config=str(root / "configs" / "credit.yaml"), overrides=[*TRAIN, *PIPELINE])
    summary = run_quantize(root, *ALL_PASS)
    return {"root": root, "summary": summary}


def by_method(summary: dict) -> dict[str, dict]:
    return {variant["method"]: variant for variant in summary["variants"]}


def aliases() -> dict[str, str]:
    model = mlflow.MlflowClient().get_registered_model(NAME)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_passing_variants_are_registered_with_tags_aliases_and_lineage(quantized, tmp_path):
    summary = quantized["summary"]
    client = mlflow.MlflowClient()
    variants = by_method(summary)
    assert {m: v["status"] for m, v in variants.items()} == {
        "int8_weight_only": "passed",
        "bf16": "passed",
        "float8_dynamic": "skipped",
        "ort_int8_dynamic": "passed",
    }
    assert summary["parent_version"] == "1"
    # the held-out rows are the parent's test split: 20% of the table
    assert summary["rows"] == 800
    parent = client.get_model_version(NAME, "1")
    assert float(parent.tags["stemma.gate.value"]) == pytest.approx(summary["parent_value"])

    for method in ("int8_weight_only", "bf16", "ort_int8_dynamic"):
        number = variants[method]["version"]
        version = client.get_model_version(NAME, number)
        tags = version.tags
        assert tags[q.METHOD_TAG] == method
        assert tags[q.PARENT_VERSION_TAG] == "1"
        assert tags[q.PARENT_WEIGHTS_TAG] == parent.tags["stemma.weights.sha256"]
        assert tags[q.STATUS_TAG] == q.STATUS_REGISTERED
        assert version.run_id == summary["run_id"]  # its numbers are in that run's record
        assert tags["stemma.data.md5"] == parent.tags["stemma.data.md5"]
        assert tags["stemma.weights.sha256"] != parent.tags["stemma.weights.sha256"]
        # like every version, it states its latency and cost, probed at registration
        assert "4,096 rows a call: p50" in version.description
        assert tags["stemma.runtime.backend"] == variants[method]["runtime"]
        # a variant is not a gated model: promotion refuses it
        assert "stemma.gate.decision" not in tags
        assert aliases()[q.method_alias("1", method)] == number

    fastest = min(
        ("int8_weight_only", "bf16", "ort_int8_dynamic"), key=lambda m: variants[m]["latency_ms"]
    )
    assert aliases()["v1-quantized"] == variants[fastest]["version"] == summary["served_version"]
    assert aliases()["champion"] == "1"

    # loaded back through the registry, a variant computes what was measured: the same
    # outputs as the method applied again to the fp32 model
    fp32 = load_scoring_model(f"models:/{NAME}/1")
    loaded = load_scoring_model(f"models:/{NAME}@v1-bf16")
    frame = pd.read_parquet(quantized["root"] / "data/credit/train.parquet").head(500)
    x = fp32.preprocessor.transform(frame)
    rebuilt = methods.build_variant(fp32.network, "bf16")
    assert np.array_equal(predict_raw(loaded.network, x), predict_raw(rebuilt, x))
    # ONNX Runtime's variant loads back on its own graph, within the gate's parity
    ort = load_scoring_model(f"models:/{NAME}@v1-ort-int8-dynamic")
    assert ort.runtime.backend == variants["ort_int8_dynamic"]["runtime"] == "onnxruntime"
    decoded = [m.preprocessor.decode_output(m.runtime.run(x)).reshape(-1) for m in (ort, fp32)]
    assert np.abs(decoded[0] - decoded[1]).max() < 0.05

    # the parent records every decision, with the numbers
    recorded = json.loads(parent.tags[q.SUMMARY_TAG])
    assert recorded["run_id"] == summary["run_id"]
    assert recorded["variants"]["float8_dynamic"]["status"] == "skipped"
    assert recorded["variants"]["bf16"]["speedup"] == pytest.approx(
        variants["bf16"]["speedup"], rel=1e-3
    )


def test_the_run_holds_the_table_the_plot_and_the_lineage(quantized, tmp_path):
    summary = quantized["summary"]
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stemma.flow"] == "quantize"
    assert run.data.tags["stemma.model.version"] == "1"
    metrics = run.data.metrics
    assert metrics["quantize/bf16.passed"] == 1.0
    assert metrics["quantize/int8_weight_only.speedup"] == pytest.approx(
        by_method(summary)["int8_weight_only"]["speedup"]
    )
    assert {"quantize/fp32.eager_ms", "quantize/fp32.onnxruntime_ms"} <= set(metrics)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.source_type == "dvc"

    artifacts = Path(client.download_artifacts(summary["run_id"], "", str(tmp_path)))
    table = pd.read_csv(artifacts / "quantize/comparison.csv")
    assert set(table["model"]) >= {
        "fp32 (eager)",
        "fp32 (onnxruntime)",
        "int8_weight_only",
        "bf16",
        "ort_int8_dynamic",
    }
    assert (artifacts / "quantize/comparison.json").is_file()  # mlflow.log_table
    assert (artifacts / "quantize/tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((artifacts / "lineage/record.json").read_text())
    edges = {(edge["source"], edge["target"], edge["relation"]) for edge in record["edges"]}
    for method in ("int8_weight_only", "bf16"):
        variant = f"models:/{NAME}/{by_method(summary)[method]['version']}"
        assert (f"models:/{NAME}/1", variant, "quantized_to") in edges
        assert (f"mlflow-run:{summary['run_id']}", variant, "produced") in edges
    rejected_or_skipped = [v for v in record["variants"] if v["status"] == "skipped"]
    assert rejected_or_skipped[0]["method"] == "float8_dynamic"
    # what the variants' versions no longer carry: their numbers and reasons, the commit
    bf16 = next(v for v in record["variants"] if v["method"] == "bf16")
    assert bf16["speedup"] == pytest.approx(by_method(summary)["bf16"]["speedup"])
    assert bf16["reasons"] and bf16["version"] == by_method(summary)["bf16"]["version"]
    run_node = next(node for node in record["nodes"] if node["kind"] == "run")
    assert len(run_node["attributes"]["git_rev"]) == 40


def test_the_summary_prints_as_a_table(quantized):
    from stemma.flows.cli import format_quantize_summary

    text = format_quantize_summary(quantized["summary"])
    lines = text.splitlines()
    assert lines[0].startswith(f"quantized {NAME} v1: roc_auc")
    row = next(line for line in lines if line.strip().startswith("bf16"))
    assert "PASSED" in row and f"v{by_method(quantized['summary'])['bf16']['version']}" in row
    assert any("float8_dynamic" in line and "SKIPPED" in line for line in lines)
    assert f"models:/{NAME}@v1-quantized" in text


def test_scoring_serves_the_variant_only_when_the_spec_says_so(quantized):
    root = quantized["root"]
    fp32 = run_score(root, output="out/fp32")
    assert fp32["model_version"] == "1" and fp32["serving"] is None
    served = run_score(root, "quantize.serve=true", output="out/quantized")
    assert served["model_version"] == quantized["summary"]["served_version"]
    assert "passed its quantization gate" in served["serving"]
    # the variant decides like the fp32 model on (nearly) every row
    a = pd.concat(pd.read_parquet(p) for p in sorted(Path(fp32["output"]).glob("part-*")))
    b = pd.concat(pd.read_parquet(p) for p in sorted(Path(served["output"]).glob("part-*")))
    merged = a.merge(b, on="application_id", suffixes=("_fp32", "_variant"))
    assert len(merged) == served["rows"]["scored"] == fp32["rows"]["scored"]
    assert (merged["prediction_fp32"] == merged["prediction_variant"]).mean() >= 0.98
    assert (merged["score_fp32"] - merged["score_variant"]).abs().max() < 0.05


def test_a_model_that_does_not_exist_or_is_a_variant_is_refused(quantized):
    root = quantized["root"]
    with pytest.raises(RegistryError, match="has no version 99"):
        run_quantize(root, *ALL_PASS, model=f"models:/{NAME}/99")
    with pytest.raises(RegistryError, match="no registered model named 'nobody'"):
        run_quantize(root, *ALL_PASS, model="models:/nobody@champion")
    variant = quantized["summary"]["served_version"]
    with pytest.raises(RegistryError, match="is itself a quantized variant"):
        run_quantize(root, *ALL_PASS, model=f"models:/{NAME}/{variant}")


def test_held_out_rows_cannot_come_from_other_data(quantized, project, rewrite_data):
    """The registry is shared; this project's data differs from what v1 was trained on."""
    rewrite_data(lambda frame: frame.iloc[::-1].reset_index(drop=True))
    with pytest.raises(DataError, match="was trained on data version"):
        run_quantize(project, *ALL_PASS, model=f"models:/{NAME}/1")


def test_an_unknown_method_is_a_spec_error_with_its_line(stemma_exe, project):
    config = project / "configs" / "credit.yaml"
    text = config.read_text()
    config.write_text(text.replace("methods: [int8_dynamic,", "methods: [int4_dynamic,"))
    line = next(
        number
        for number, content in enumerate(config.read_text().splitlines(), start=1)
        if "int4_dynamic" in content
    )
    done = subprocess.run(
        [*stemma_exe, "run", "quantize", "configs/credit.yaml"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (
        f"credit.yaml:{line} quantize.methods[0]: unknown method 'int4_dynamic'; "
        "did you mean 'int8_dynamic'?" in done.stderr
    )


def test_training_quantizes_when_the_spec_enables_it(template_project, tmp_path):
    from stemma.flows.train import train_flow

    root = tmp_path / "project"
    shutil.copytree(template_project, root, symlinks=True)
    summary = train_flow(
        config=str(root / "configs" / "credit.yaml"),
        overrides=[
            *TRAIN,
            "pipeline.name=quant-train",
            "pipeline.model_name=quant-train",
            "quantize.enabled=true",
            "quantize.methods=[bf16]",
            "quantize.min_speedup=0.01",
            "quantize.max_metric_drop=1.0",
            "quantize.repeats=3",
        ],
    )
    (variant,) = summary["quantize"]["variants"]
    assert variant["status"] == "passed"
    assert summary["quantize"]["parent_version"] == summary["model_version"]
    version = mlflow.MlflowClient().get_model_version("quant-train", variant["version"])
    assert version.tags[q.PARENT_VERSION_TAG] == summary["model_version"]

    from stemma.flows.cli import format_train_summary

    assert f"quantize: bf16 passed (v{variant['version']})" in format_train_summary(summary)


# Last: it changes the registry state the tests above read.
def test_rejected_variants_are_recorded_and_scoring_falls_back(quantized, stemma_exe, prefect_api):
    root = quantized["root"]
    client = mlflow.MlflowClient()
    before = {str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")}
    args = [*stemma_exe, "run", "quantize", "configs/credit.yaml"]
    for override in [
        *PIPELINE,
        "quantize.methods=[int8_weight_only, bf16]",
        "quantize.min_speedup=1000",
        "quantize.repeats=3",
    ]:
        args += ["--set", override]
    done = subprocess.run(
        args,
        cwd=root,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "REJECTED" in out and "< min 1000.00x" in out
    assert "no variant passed: batch scoring keeps the fp32 model" in out

    # nothing new registered; the aliases of v1's variants reflect the latest decision
    after = {str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")}
    assert after == before
    assert not {"v1-quantized", "v1-bf16", "v1-int8-weight-only"} & set(aliases())
    recorded = json.loads(client.get_model_version(NAME, "1").tags[q.SUMMARY_TAG])
    assert {v["status"] for v in recorded["variants"].values()} == {"rejected"}
    run = client.get_run(recorded["run_id"])
    assert run.data.metrics["quantize/bf16.passed"] == 0.0
    assert run.data.metrics["quantize/bf16.speedup"] < 1000  # the rejected numbers are kept

    served = run_score(root, "quantize.serve=true", output="out/fallback")
    assert served["model_version"] == "1"
    assert "serving fp32 quant v1: no quantized variant passed its gate" in served["serving"]
    assert "< min 1000.00x" in served["serving"]
