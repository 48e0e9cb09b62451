"""The compress flow end to end: a trained model, its pruned and distilled variants, the
registry, quantizing a student in turn, and the bad input that must register nothing.

The gate's outcome on real timings depends on the machine's load; here the bars are set
so that it does not (a minimum speed-up of 0.01x: every variant that runs passes), and
the tests check what the flow does with each outcome. The speed-ups themselves are
measured in tests/benchmarks/bench_compression.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from stemma.components.errors import CompressionError, RegistryError, SpecError
from stemma.components.quantization import registering as q
from stemma.components.runtime.loading import load_scoring_model

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "squeeze"
TRAIN = ["train.epochs=3", "train.early_stopping=null", "train.batch_size=256"]
PIPELINE = [f"pipeline.name={NAME}", f"pipeline.model_name={NAME}"]
#: Every variant that runs passes, whatever the machine's load.
ALL_PASS = [
    "compress.min_speedup=0.01",
    "compress.max_metric_drop=1.0",
    "compress.prune.finetune_epochs=1",
    "compress.distill.epochs=2",
    "compress.then_quantize=[distill]",
    "compress.distill.production_batches=[data/credit/batches]",
    "quantize.methods=[int8_weight_only]",
    "quantize.min_speedup=0.01",
    "quantize.max_metric_drop=1.0",
    "quantize.repeats=3",
    "quantize.warmup=1",
]


def run_compress(project: Path, *overrides: str, model: str | None = None) -> dict:
    from stemma.flows.compress import compress_flow

    return compress_flow(
        config=str(project / "configs" / "credit.yaml"),
        overrides=[*PIPELINE, *TRAIN, *overrides],
        model=model,
    )


def versions(name: str = NAME) -> list[str]:
    client = mlflow.MlflowClient()
    found = client.search_model_versions(f"name='{name}'")
    return sorted((str(v.version) for v in found), key=int)


@pytest.fixture(scope="module")
def compressed(template_project, tmp_path_factory) -> dict:
    """`squeeze` v1 trained (@champion), then pruned and distilled with every variant passing,
    and the student quantized in turn."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("compress") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    train_flow(config=str(root / "configs" / "credit.yaml"), overrides=[*TRAIN, *PIPELINE])
    summary = run_compress(root, *ALL_PASS)
    return {"root": root, "summary": summary}


def by_method(summary: dict) -> dict[str, dict]:
    return {variant["method"]: variant for variant in summary["variants"]}


def test_pruned_and_distilled_variants_are_registered_linked_and_load_back(compressed):
    summary = compressed["summary"]
    client = mlflow.MlflowClient()
    variants = by_method(summary)
    assert {m: v["status"] for m, v in variants.items()} == {"prune": "passed", "distill": "passed"}
    parent = client.get_model_version(NAME, "1")
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    for method in ("prune", "distill"):
        number = variants[method]["version"]
        assert aliases[f"v1-{method}"] == number
        version = client.get_model_version(NAME, number)
        assert version.tags[q.METHOD_TAG] == method
        assert version.tags[q.PARENT_VERSION_TAG] == "1"
        assert version.tags[q.STATUS_TAG] == q.STATUS_REGISTERED
        assert version.tags["stemma.data.md5"] == parent.tags["stemma.data.md5"]
        assert version.run_id == summary["run_id"]
        # its description states its latency and cost, as every version's does
        assert "4,096 rows a call: p50" in version.description
        assert "per million predictions on cpu-small (illustrative prices)" in version.description
        # a smaller dense network, loaded through the runtime like any version
        loaded = load_scoring_model(f"models:/{NAME}/{number}", client=client)
        assert variants[method]["parameters"] < summary["parent_parameters"]
        assert sum(p.numel() for p in loaded.network.parameters()) == variants[method]["parameters"]
    pruned = load_scoring_model(f"models:/{NAME}/{variants['prune']['version']}", client=client)
    assert pruned.network_config["hidden"] == [32, 16]  # the spec's [64, 32], half removed
    student = load_scoring_model(f"models:/{NAME}/{variants['distill']['version']}", client=client)
    assert student.network_config["hidden"] == [32, 16]  # half the teacher's widths


def test_the_comparison_times_three_batch_sizes_and_prices_every_variant(compressed):
    summary = compressed["summary"]
    rows = {row["model"]: row for row in summary["table"]}
    assert {"prune", "distill"} <= set(rows)
    assert any(model.startswith("fp32 (") for model in rows)
    for row in rows.values():
        for rows_in_batch in (1, 64, 4096):
            p50, p95, p99 = (row[f"{p}_ms_b{rows_in_batch}"] for p in ("p50", "p95", "p99"))
            assert 0 < p50 <= p95 <= p99
        assert row["cpu_s_per_million"] > 0
    for variant in summary["variants"]:
        assert variant["cost_per_million"] > 0
        assert variant["cost_ratio"] == pytest.approx(
            variant["cost_per_million"] / summary["parent_cost_per_million"]
        )
        assert any("per million predictions" in reason for reason in variant["reasons"])
    assert summary["illustrative_prices"] is True
    client = mlflow.MlflowClient()
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert metrics["compress/prune.passed"] == 1.0
    assert "compress/distill.p50_ms_b64" in metrics


def test_lineage_links_the_parent_to_each_variant(compressed, tmp_path):
    summary = compressed["summary"]
    client = mlflow.MlflowClient()
    path = client.download_artifacts(summary["run_id"], "lineage/record.json", str(tmp_path))
    record = json.loads(Path(path).read_text())
    edges = {(e["source"], e["target"], e["relation"]) for e in record["edges"]}
    variants = by_method(summary)
    assert (
        f"models:/{NAME}/1",
        f"models:/{NAME}/{variants['prune']['version']}",
        "pruned_to",
    ) in edges
    assert (
        f"models:/{NAME}/1",
        f"models:/{NAME}/{variants['distill']['version']}",
        "distilled_to",
    ) in edges
    assert record["decision"]["decision"].startswith("registered")
    # the unlabelled production batches the student also learnt from are inputs of the run
    batches = [n for n in record["nodes"] if n["kind"] == "input"]
    assert {Path(n["attributes"]["path"]).name for n in batches} == {
        "day_01.parquet",
        "day_02.parquet",
    }
    assert all(
        (n["id"], f"mlflow-run:{summary['run_id']}", "distilled_on") in edges for n in batches
    )
    student = client.download_artifacts(summary["run_id"], "compress/distill.json", str(tmp_path))
    rows = json.loads(Path(student).read_text())["rows"]
    assert rows["production"] == 1000 and rows["train"] > 0
    details = client.download_artifacts(summary["run_id"], "compress/prune.json", str(tmp_path))
    pruned = json.loads(Path(details).read_text())
    assert [layer["after"] for layer in pruned["layers"]] == [32, 16]


def test_the_student_is_quantized_in_turn(compressed):
    summary = compressed["summary"]
    (done,) = summary["quantized"]
    student = by_method(summary)["distill"]["version"]
    assert done["method"] == "distill" and done["version"] == student
    (variant,) = [v for v in done["variants"] if v["version"]]
    version = mlflow.MlflowClient().get_model_version(NAME, variant["version"])
    assert version.tags[q.METHOD_TAG] == "int8_weight_only"
    assert version.tags[q.PARENT_VERSION_TAG] == student


def test_a_variant_cannot_be_compressed_again(compressed):
    before = versions()
    student = by_method(compressed["summary"])["distill"]["version"]
    with pytest.raises(CompressionError, match="is itself a variant"):
        run_compress(compressed["root"], *ALL_PASS, model=f"models:/{NAME}/{student}")
    assert versions() == before


def test_a_pruning_that_empties_a_layer_is_refused_before_training(compressed):
    before = versions()
    runs = mlflow.search_runs(search_all_experiments=True)
    with pytest.raises(CompressionError, match="layers") as caught:
        run_compress(compressed["root"], *ALL_PASS, "compress.prune.amount=1.0")
    assert "0 units" in str(caught.value) or "no unit" in str(caught.value)
    assert versions() == before
    assert len(mlflow.search_runs(search_all_experiments=True)) == len(runs)


def test_a_student_that_does_not_import_is_refused_when_the_spec_loads(compressed):
    before = versions()
    with pytest.raises(SpecError, match=r"compress\.distill\.student\.architecture"):
        run_compress(
            compressed["root"],
            *ALL_PASS,
            "compress.distill.student.architecture=nosuch_students:Tiny",
        )
    assert versions() == before


def test_a_version_that_failed_its_gate_is_not_compressed(compressed):
    from stemma.flows.train import train_flow

    root = compressed["root"]
    train_flow(
        config=str(root / "configs" / "credit.yaml"),
        overrides=[*TRAIN, *PIPELINE, "gate.minimum=0.9999"],
    )
    client = mlflow.MlflowClient()
    failed = max(versions(), key=int)
    assert client.get_model_version(NAME, failed).tags["stemma.gate.decision"] == "failed"
    before = versions()
    with pytest.raises(CompressionError, match="did not pass its gate"):
        run_compress(root, *ALL_PASS, model=f"models:/{NAME}/{failed}")
    assert versions() == before


NOISY_STUDENT = '''
import torch
from torch import nn


class Noisy(nn.Module):
    """A student whose every forward pass adds fresh noise: no two runs give the same outputs."""

    def __init__(self, n_inputs, n_outputs):
        super().__init__()
        self.linear = nn.Linear(n_inputs, n_outputs)

    def forward(self, x):
        return self.linear(x) + torch.rand(x.shape[0], 1) * 1e-3
'''


def test_a_variant_whose_reloaded_outputs_differ_is_not_registered(compressed, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(compressed["root"], root, symlinks=True)
    (root / "noisy_students.py").write_text(NOISY_STUDENT, encoding="utf-8")
    before = versions()
    with pytest.raises(RegistryError, match="does not give the outputs that were measured"):
        run_compress(
            root,
            "compress.methods=[distill]",
            "compress.min_speedup=0.01",
            "compress.max_metric_drop=1.0",
            "compress.distill.epochs=1",
            "compress.distill.student.architecture=noisy_students:Noisy",
            model=f"models:/{NAME}/1",
        )
    assert versions() == before


def test_the_printed_summary_is_a_table_of_every_variant(compressed):
    from stemma.flows.cli.compression import format_compress_summary

    text = format_compress_summary(compressed["summary"])
    lines = text.splitlines()
    assert lines[0].startswith(f"compressed {NAME} v1: roc_auc")
    assert "illustrative prices" in lines[0]
    rows = [line.split() for line in lines if line.strip().startswith(("prune", "distill"))]
    assert [row[0] for row in rows] == ["prune", "distill"]
    assert all(row[1] == "PASSED" for row in rows)
    assert "quantized distill" in text
    compared = compressed["summary"]["compared"]
    if compared["cheapest_alias"]:
        assert f"(alias v1-cheapest); MLflow run {compared['run_id']}" in text
    assert np.all([row[-1].startswith("v") for row in rows])


def test_every_variant_is_compared_and_the_cheapest_aliased(compressed):
    summary = compressed["summary"]
    compared = summary["compared"]
    models = {row["chain"]: row for row in compared["table"]}
    # the parent, its pruned and distilled variants, and the student's int8 variant
    assert set(models) == {
        "fp32 (parent)",
        "prune",
        "distill",
        "distill → int8_weight_only",
    }
    cheapest = min(
        (row for row in compared["table"] if row["status"] in ("parent", "passed")),
        key=lambda row: row["cost_per_million"],
    )
    assert compared["cheapest"].startswith(cheapest["model"])
    aliases = mlflow.MlflowClient().get_registered_model(NAME).aliases
    if cheapest["chain"] != "fp32 (parent)":
        assert str(aliases["v1-cheapest"]) == cheapest["version"]


def test_the_compress_run_carries_only_its_documented_tags(compressed):
    from stemma.components.platform import tags as tag_names

    run = mlflow.MlflowClient().get_run(compressed["summary"]["run_id"])
    allowed = {*tag_names.COMMON_RUN_TAGS, *tag_names.RUN_TAGS["compress"]}
    own = {
        key
        for key in run.data.tags
        if key.startswith("stemma.")
        and not key.startswith(tag_names.LINEAGE_MADE_NODES)
        and not key.startswith(tag_names.LINEAGE_USED_NODES)
    }
    assert own <= allowed, sorted(own - allowed)
    assert run.data.tags[tag_names.MODEL_VERSION] == "1"
    assert "mlflow.note.content" in run.data.tags  # the description says what was decided
    assert "registered prune" in run.data.tags["mlflow.note.content"]


HALF_REGISTER = """
import sys
import mlflow
from stemma.components.quantization import registering as q

name, source = sys.argv[1], sys.argv[2]
made = mlflow.MlflowClient().create_model_version(name, source, tags={
    q.METHOD_TAG: "prune", q.PARENT_VERSION_TAG: "1",
    q.STATUS_TAG: q.STATUS_REGISTERING, q.OWNER_TAG: q.owner_id(),
})
print(made.version)
"""


def test_a_version_a_killed_run_left_half_registered_is_removed_by_the_next(compressed):
    import subprocess
    import sys

    client = mlflow.MlflowClient()
    source = client.get_model_version(NAME, "1").source
    # a process that ends between creating the version and finishing it, as a kill leaves it
    done = subprocess.run(
        [sys.executable, "-c", HALF_REGISTER, NAME, source],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    half = done.stdout.strip().splitlines()[-1]
    assert half in versions()
    assert half not in {str(v) for v in client.get_registered_model(NAME).aliases.values()}
    again = run_compress(compressed["root"], *ALL_PASS)
    assert half not in versions()  # never aliased, so never served, and now gone
    # the rerun made the same weights: the variants the first run registered stand
    first = by_method(compressed["summary"])
    assert {m: v["version"] for m, v in by_method(again).items()} == {
        m: v["version"] for m, v in first.items()
    }
