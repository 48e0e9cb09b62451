"""ONNX Runtime's variants (int8 dynamic, fp16): built, gated, registered, loaded back.

Two trained models: the worked example's credit MLP (64-32) and a user's own module (a
residual MLP with LayerNorm, tests/components/runtime/networks.py). The speed-up bar is
set low (0.01x) so that the outcome does not depend on the machine's load; the parity
bar is the spec's default (a roc_auc drop of at most 0.005).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.data.tables import split_table
from stemma.components.model import quantized as model_variants
from stemma.components.model.artifact import ONNX_SHA256_TAG, log_pyfunc_model
from stemma.components.model.networks import build_network, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform.tags import GATE_DECISION, WEIGHTS_SHA256
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.quantization import heldout, measure, methods, registering
from stemma.components.quantization import results as outcomes
from stemma.components.runtime.backends import set_threads
from stemma.components.runtime.loading import UntrustedModelError, load_scoring_model
from stemma.components.spec import FeaturesSpec, ModelSpec, QuantizeSpec, SplitSpec, TrainSpec
from stemma.components.training.loop import train_network
from stemma.components.training.metrics import evaluate_scores
from stemma.examples.credit import generate_credit_data
from tests.support import isolated_mlflow

ORT = ["ort_int8_dynamic", "ort_fp16"]
RESIDUAL = "tests.components.runtime.networks:ResidualMLP"
FEATURES = FeaturesSpec(
    numeric=["salary", "commission", "age", "hvalue", "hyears", "loan"],
    categorical=["elevel", "car", "zipcode"],
)
#: The spec's default parity bar; the speed-up bar is out of the way.
GATE = {"max_metric_drop": 0.005, "min_speedup": 0.01, "repeats": 3, "warmup": 1}
MODELS = {"credit-mlp": ModelSpec(hidden=[64, 32], dropout=0.1), "residual": None}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    set_threads(1)


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("credit")
    generate_credit_data(folder, train_rows=6_000, days=1, batch_rows=100)
    frame = pd.read_parquet(folder / "credit" / "train.parquet")
    train, valid, test = split_table(frame, SplitSpec())
    preprocessor = fit_preprocessor(train, FEATURES, task="binary", target="approved")
    return {
        "preprocessor": preprocessor,
        "train": (preprocessor.transform(train), preprocessor.encode_target(train, "approved")),
        "valid": (preprocessor.transform(valid), preprocessor.encode_target(valid, "approved")),
        "test": test,
        "x": preprocessor.transform(test),
        "y": test["approved"].to_numpy(dtype=np.float64),
    }


def model_spec(kind: str) -> ModelSpec:
    return MODELS[kind] or ModelSpec(architecture=RESIDUAL)


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, credit, tmp_path_factory):
    """A trained network of each kind and its ONNX Runtime variants, measured and gated."""
    config = network_config(model_spec(request.param))
    network = build_network(config, credit["preprocessor"].n_inputs, seed=7)
    network = train_network(
        network,
        *credit["train"],
        *credit["valid"],
        train=TrainSpec(epochs=4, early_stopping=None),
        task="binary",
        progress=False,
    ).network.eval()
    comparison, built = compare(
        network,
        credit,
        QuantizeSpec(methods=ORT, **GATE),
        batch_rows=2048,
        workdir=tmp_path_factory.mktemp(request.param),
    )
    return {
        "kind": request.param,
        "config": config,
        "network": network,
        "comparison": comparison,
        "built": built,
    }


def compare(network, credit, settings, *, batch_rows, workdir):
    """``measure.compare_variants`` on the credit data, gated on ROC AUC."""
    return measure.compare_variants(
        network,
        credit["preprocessor"],
        credit["x"],
        credit["y"],
        task="binary",
        metric="roc_auc",
        threshold=0.5,
        settings=settings,
        batch_rows=batch_rows,
        workdir=workdir,
    )


def result_of(comparison: outcomes.Comparison, method: str) -> outcomes.VariantResult:
    (result,) = [v for v in comparison.variants if v.method == method]
    return result


@pytest.mark.parametrize("method", ORT)
def test_an_onnx_runtime_variant_passes_the_parity_gate(trained, method):
    comparison = trained["comparison"]
    assert set(comparison.parent_ms) == {"eager", "onnxruntime"}
    result = result_of(comparison, method)
    assert result.status == outcomes.PASSED, result.reasons
    assert result.runtime == "onnxruntime"
    assert result.metric_drop <= GATE["max_metric_drop"]
    assert result.agreement >= 0.98
    assert result.speedup == pytest.approx(comparison.baseline_ms / result.latency_ms)
    variant = trained["built"][method]
    assert variant.runtime == "onnxruntime" and variant.onnx_file.is_file()
    assert result.size_bytes == variant.onnx_file.stat().st_size


def test_the_graphs_are_what_the_methods_say(trained):
    int8 = onnx.load(str(trained["built"]["ort_int8_dynamic"].onnx_file))
    ops = {node.op_type for node in int8.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops
    fp16 = onnx.load(str(trained["built"]["ort_fp16"].onnx_file))
    kinds = {init.data_type for init in fp16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds
    # the graph still takes and returns float32: the runtime feeds it as it feeds fp32
    for value in (*fp16.graph.input, *fp16.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_a_network_that_does_not_export_fails_its_onnx_runtime_variants(credit, tmp_path):
    from tests.components.runtime.networks import BranchyMLP

    network = BranchyMLP(credit["preprocessor"].n_inputs, 1, hidden=[8], dropout=0.0).eval()
    comparison, built = compare(
        network,
        credit,
        QuantizeSpec(methods=["ort_int8_dynamic", "bf16"], **{**GATE, "max_metric_drop": 1.0}),
        batch_rows=256,
        workdir=tmp_path,
    )
    failed = result_of(comparison, "ort_int8_dynamic")
    assert failed.status == outcomes.FAILED
    assert "no ONNX graph" in failed.reasons[0]
    assert set(comparison.parent_ms) == {"eager"}
    assert any("no ONNX graph" in note for note in comparison.notes)
    assert result_of(comparison, "bf16").status == outcomes.PASSED and set(built) == {"bf16"}


def test_onnx_runtime_methods_are_available_here():
    assert all(methods.unavailable_reason(method) is None for method in ORT)


def test_without_onnx_runtime_quantization_tools_its_methods_are_skipped(
    credit, tmp_path, monkeypatch
):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import fails
    assert "quantization tools" in methods.unavailable_reason("ort_int8_dynamic")
    network = build_network(network_config(ModelSpec(hidden=[8])), credit["x"].shape[1], seed=1)
    comparison, built = compare(
        network.eval(), credit, QuantizeSpec(methods=ORT, **GATE), batch_rows=256, workdir=tmp_path
    )
    assert {v.status for v in comparison.variants} == {outcomes.SKIPPED} and not built
    assert all("quantization tools" in v.reasons[0] for v in comparison.variants)


# ---------------------------------------------------------------------------------------
# Registered and loaded back (a real MLflow store)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    with isolated_mlflow():
        configure_tracking(root)
        yield {"root": root, "experiment": ensure_experiment("ort-variants", root)}


def register_parent(store, trained, credit) -> tuple[str, str]:
    """The trained network logged and registered as v1 of a model of its own."""
    name = f"ort-{trained['kind']}"
    client = MlflowClient()
    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        info, sha256 = log_pyfunc_model(
            preprocessor=credit["preprocessor"],
            network=trained["network"],
            network_config=trained["config"],
            input_example=credit["test"],
            task="binary",
            workdir=store["root"] / name / "fp32",
        )
    client.create_registered_model(name)
    client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run.info.run_id,
        model_id=info.model_id,
        tags={WEIGHTS_SHA256: sha256, GATE_DECISION: "passed"},
    )
    return name, run.info.run_id


def architectures(trained) -> list[str]:
    return [RESIDUAL] if trained["kind"] == "residual" else []


@pytest.fixture(scope="module")
def registered(store, trained, credit):
    """Both ONNX Runtime variants logged and registered, verified by loading them back."""
    name, run_id = register_parent(store, trained, credit)
    client = MlflowClient()
    parent = load_scoring_model(
        f"models:/{name}/1", client=client, architectures=architectures(trained)
    )
    files = heldout.download_model_files(client, name, "1", store["root"] / name / "parent")
    versions = {}
    for method in ORT:
        variant = trained["built"][method]
        expected = measure.variant_runtime(variant, credit["x"].shape[1]).run(credit["x"])
        with mlflow.start_run(experiment_id=store["experiment"]):
            info, _ = registering.log_variant_model(
                variant=variant,
                parent_files=files,
                parent={"version": "1", "weights_sha256": parent.weights_sha256},
                input_example=credit["test"],
                workdir=store["root"] / name / method,
            )

        def verify(number: str, expected: np.ndarray = expected) -> None:
            loaded = load_scoring_model(
                f"models:/{name}/{number}", client=client, architectures=architectures(trained)
            )
            assert loaded.runtime.backend == "onnxruntime"
            assert np.array_equal(loaded.runtime.run(credit["x"]), expected)

        version = registering.register_variant(
            client=client,
            model_name=name,
            parent_version="1",
            method=method,
            model_uri=info.model_uri,
            run_id=run_id,
            tags={registering.METHOD_TAG: method},
            description="test",
            verify=verify,
        )
        versions[method] = str(version.version)
    return {"name": name, "versions": versions}


@pytest.mark.parametrize("method", ORT)
def test_a_registered_onnx_runtime_variant_loads_back_on_its_own_graph(
    registered, trained, credit, method
):
    client, name = MlflowClient(), registered["name"]
    number = registered["versions"][method]
    version = client.get_model_version(name, number)
    assert version.tags[registering.STATUS_TAG] == registering.STATUS_REGISTERED
    graph = trained["built"][method].onnx_file.read_bytes()
    assert version.tags[ONNX_SHA256_TAG] == hashlib.sha256(graph).hexdigest()
    loaded = load_scoring_model(
        f"models:/{name}@{registering.method_alias('1', method)}",
        client=client,
        architectures=architectures(trained),
    )
    assert loaded.runtime.backend == "onnxruntime"
    assert isinstance(loaded.network, model_variants.QuantizedNetwork)
    assert loaded.network.method == method
    # its scores are within the gate's parity of the fp32 model's
    scores = loaded.preprocessor.decode_output(loaded.runtime.run(credit["x"])).reshape(-1)
    value = evaluate_scores("binary", credit["y"], scores, 0.5)["roc_auc"]
    assert trained["comparison"].parent_value - value <= GATE["max_metric_drop"]
    assert value == pytest.approx(result_of(trained["comparison"], method).value)


def test_a_changed_onnx_file_of_a_variant_is_refused(registered, trained):
    from urllib.parse import urlparse

    from stemma.components.runtime.loading import logged_model_id

    client, name = MlflowClient(), registered["name"]
    number = registered["versions"]["ort_int8_dynamic"]
    version = client.get_model_version(name, number)
    location = client.get_logged_model(logged_model_id(version)).artifact_location
    (target,) = Path(urlparse(location).path).rglob("network.onnx")
    original = target.read_bytes()
    target.write_bytes(original[:-8] + b"tampered")
    try:
        with pytest.raises(UntrustedModelError, match=r"network\.onnx"):
            load_scoring_model(
                f"models:/{name}/{number}", client=client, architectures=architectures(trained)
            )
    finally:
        target.write_bytes(original)


def test_the_pyfunc_model_of_an_onnx_runtime_variant_runs_its_graph(registered, trained, credit):
    name = registered["name"]
    number = registered["versions"]["ort_int8_dynamic"]
    model = mlflow.pyfunc.load_model(f"models:/{name}/{number}")
    frame = credit["test"].head(200)
    predicted = model.predict(frame)["score"].to_numpy()
    runtime = measure.variant_runtime(trained["built"]["ort_int8_dynamic"], credit["x"].shape[1])
    x = credit["preprocessor"].transform(frame)
    expected = credit["preprocessor"].decode_output(runtime.run(x)).reshape(-1)
    assert np.allclose(predicted, expected, atol=1e-6)
