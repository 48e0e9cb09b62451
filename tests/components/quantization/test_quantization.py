"""Quantized variants: building, measuring, the gate, storing, loading, registering, serving.

The comparisons run for real (torchao, ONNX Runtime, timing on this machine) through the
model runtime. Their outcomes are made robust by the models chosen: a wide MLP where ONNX
Runtime's int8 dynamic quantization is about twice as fast as the fastest fp32 backend
(against a bar of 1.2x), and a tiny one where no variant can beat fp32 by 20%.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from stemma.components.errors import RegistryError
from stemma.components.model import quantized as model_variants
from stemma.components.model.networks import build_network, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.quantization import heldout, measure, methods, registering, report
from stemma.components.quantization import results as outcomes
from stemma.components.quantization.registering import served_reference
from stemma.components.runtime.backends import set_threads
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import (
    QUANTIZE_METHODS,
    FeaturesSpec,
    ModelSpec,
    QuantizeSpec,
    parse_metric_drop,
)
from stemma.components.training.loop import predict_raw
from tests.support import isolated_mlflow, log_trained_model

COLUMNS = [f"x{i}" for i in range(8)]
FEATURES = FeaturesSpec(numeric=COLUMNS)
#: Wide enough for int8 matrix products to pay; the batch the wide model is timed on.
WIDE = (512, 512)
WIDE_BATCH_ROWS = 2048
#: Small enough that nothing can pay; the batch it is timed on.
TINY = (8,)
TINY_BATCH_ROWS = 256
FAST = {"repeats": 7, "warmup": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run timed on one thread, as the quantize flow sets it once per process."""
    set_threads(1)


def table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({column: rng.normal(size=rows) for column in COLUMNS})
    signal = frame["x0"] + 0.5 * frame["x1"] - 0.25 * frame["x2"]
    frame["y"] = (signal + rng.normal(scale=0.5, size=rows) > 0).astype(np.int64)
    return frame


@pytest.fixture(scope="module")
def data():
    frame = table(2000, seed=0)
    preprocessor = fit_preprocessor(frame, FEATURES, task="binary", target="y")
    return {
        "frame": frame,
        "preprocessor": preprocessor,
        "x": preprocessor.transform(frame),
        "y": frame["y"].to_numpy(dtype=np.float64),
    }


def mlp(hidden: tuple[int, ...], n_inputs: int, seed: int = 1) -> nn.Module:
    config = network_config(ModelSpec(hidden=list(hidden), dropout=0.0))
    return build_network(config, n_inputs, seed=seed).eval()


def compare(data, network, tmp: Path, **settings):
    options = {"methods": ["int8_dynamic"], **FAST, **settings}
    batch_rows = options.pop("batch_rows")
    return measure.compare_variants(
        network,
        data["preprocessor"],
        data["x"],
        data["y"],
        task="binary",
        metric="roc_auc",
        threshold=0.5,
        settings=QuantizeSpec(**options),
        batch_rows=batch_rows,
        workdir=tmp,
    )


@pytest.fixture(scope="module")
def wide(data, tmp_path_factory):
    """int8 dynamic variants of a wide MLP (torchao on eager, ONNX Runtime's on its graph)."""
    network = mlp(WIDE, data["preprocessor"].n_inputs)
    comparison, built = compare(
        data,
        network,
        tmp_path_factory.mktemp("wide"),
        methods=["int8_dynamic", "ort_int8_dynamic", "float8_dynamic"],
        batch_rows=WIDE_BATCH_ROWS,
        max_metric_drop=0.01,
        min_speedup=1.2,
    )
    return {"network": network, "comparison": comparison, "built": built}


@pytest.fixture(scope="module")
def tiny(data, tmp_path_factory):
    network = mlp(TINY, data["preprocessor"].n_inputs)
    comparison, _ = compare(
        data,
        network,
        tmp_path_factory.mktemp("tiny"),
        batch_rows=TINY_BATCH_ROWS,
        max_metric_drop=1.0,
        min_speedup=1.2,
    )
    return comparison


def variant_of(comparison: outcomes.Comparison, method: str) -> outcomes.VariantResult:
    (result,) = [v for v in comparison.variants if v.method == method]
    return result


# ---------------------------------------------------------------------------------------
# Building


def test_the_spec_and_the_component_know_the_same_methods():
    assert tuple(model_variants.METHODS) == QUANTIZE_METHODS


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only"])
def test_int8_methods_quantize_every_linear_layer_of_a_copy(data, method):
    network = mlp((16, 8), data["preprocessor"].n_inputs)
    before = {name: p.clone() for name, p in network.state_dict().items()}
    variant = methods.build_variant(network, method)
    int8 = model_variants.int8_tensor_class()
    layers = [m for m in variant.network.modules() if isinstance(m, nn.Linear)]
    assert layers and all(isinstance(layer.weight, int8) for layer in layers)
    # the parent is untouched, and the variant is a deterministic function of it
    assert all(torch.equal(before[name], p) for name, p in network.state_dict().items())
    again = methods.build_variant(network, method)
    x = torch.from_numpy(data["x"][:64])
    with torch.inference_mode():
        assert torch.equal(variant(x), again(x))
        assert variant(x).dtype == torch.float32


@pytest.mark.parametrize("method,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float_methods_cast_the_weights_and_take_float32(data, method, dtype):
    variant = methods.build_variant(mlp((16,), data["preprocessor"].n_inputs), method)
    assert {p.dtype for p in variant.parameters()} == {dtype}
    with torch.inference_mode():
        output = variant(torch.from_numpy(data["x"][:8]))
    assert output.dtype == torch.float32


@pytest.mark.parametrize("method", ["int8_weight_only", "bf16"])
def test_a_variant_stays_in_eval_mode_so_its_dropout_never_runs(data, method):
    config = network_config(ModelSpec(hidden=[16], dropout=0.5))
    network = build_network(config, data["preprocessor"].n_inputs, seed=1).eval()
    variant = methods.build_variant(network, method)
    scored = predict_raw(variant, data["x"])  # restores the mode the module had
    assert not variant.training and not any(m.training for m in variant.modules())
    x = torch.from_numpy(data["x"])
    with torch.inference_mode():
        assert np.array_equal(variant(x).numpy(), scored)
        assert torch.equal(variant(x), variant(x))


class MatrixNet(nn.Module):
    """A custom architecture with no nn.Linear: torchao has nothing to quantize."""

    def __init__(self, n_inputs: int, n_outputs: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.linspace(-1, 1, n_inputs * n_outputs).reshape(n_inputs, n_outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_variant_that_cannot_be_built_is_reported_not_raised(data, tmp_path):
    network = MatrixNet(data["preprocessor"].n_inputs).eval()
    with pytest.raises(methods.VariantBuildError, match="MatrixNet has none"):
        methods.build_variant(network, "int8_weight_only")
    comparison, built = compare(
        data,
        network,
        tmp_path,
        methods=["int8_weight_only", "bf16", "float8_dynamic"],
        batch_rows=64,
        max_metric_drop=1.0,
        min_speedup=0.01,
    )
    failed = variant_of(comparison, "int8_weight_only")
    assert failed.status == outcomes.FAILED and "quantized no layer" in failed.reasons[0]
    assert failed.latency_ms is None and "int8_weight_only" not in built
    # the other variants are measured as usual
    assert variant_of(comparison, "bf16").status == outcomes.PASSED
    assert variant_of(comparison, "float8_dynamic").status == outcomes.SKIPPED
    assert set(built) == {"bf16"}


# ---------------------------------------------------------------------------------------
# The gate


@pytest.mark.parametrize(
    "higher,parent,value,speedup,limit,passed,fragment",
    [
        (True, 0.90, 0.899, 1.5, "0.005", True, "speed-up 1.50x >= min 1.20x"),
        (True, 0.90, 0.88, 1.5, "0.005", False,
         "roc_auc fell 0.0200 (2.22%), limit 0.005 = 0.56%: over"),
        (True, 0.90, 0.90, 1.1, "0.005", False, "speed-up 1.10x < min 1.20x"),
        (False, 0.30, 0.302, 2.0, "0.005", True, "roc_auc rose 0.0020 (0.67%), limit 0.005"),
        (False, 0.30, 0.31, 2.0, "0.005", False, "rose 0.0100 (3.33%), limit 0.005 = 1.67%: over"),
        (False, 65.1, 65.1136, 2.0, "2%", True,
         "roc_auc rose 0.0136 (0.02%), limit 2% = 1.3020: within"),
        (False, 65.1, 65.1136, 2.0, "0.005", False, "limit 0.005 = 0.01%: over"),
        (False, 65.1, 67.0, 2.0, "2%", False, "rose 1.9000 (2.92%), limit 2% = 1.3020: over"),
        (True, 0.90, float("nan"), 2.0, "0.005", False, "cannot decide"),
        (True, 0.90, 0.90, float("inf"), "0.005", False, "cannot decide: speed-up"),
    ],
    ids=["pass", "drop", "slow", "loss-pass", "loss-drop", "relative-pass", "absolute-of-65",
         "relative-drop", "nan-metric", "inf-speedup"],
)  # fmt: skip
def test_decide_variant_needs_both_bars_and_fails_closed(
    higher, parent, value, speedup, limit, passed, fragment
):
    decided, drop, reasons = outcomes.decide_variant(
        metric="roc_auc",
        higher_is_better=higher,
        parent_value=parent,
        value=value,
        speedup=speedup,
        max_metric_drop=parse_metric_drop(limit),
        min_speedup=1.2,
    )
    assert decided is passed
    if value == value:  # a drop is positive when the variant is worse, whichever direction
        assert drop == pytest.approx(parent - value if higher else value - parent)
    assert any(fragment in reason for reason in reasons), reasons
    assert len(reasons) == 2  # both checks are reported, passed or not


def test_int8_pays_on_a_wide_network_on_onnx_runtime(wide):
    comparison = wide["comparison"]
    result = variant_of(comparison, "ort_int8_dynamic")
    assert result.status == outcomes.PASSED, result.reasons
    # ONNX Runtime's int8 runs on its own graph; torchao's int8 runs eager
    assert result.runtime == model_variants.ONNXRUNTIME
    assert variant_of(comparison, "int8_dynamic").runtime == model_variants.EAGER
    assert result.speedup >= 1.2
    assert result.speedup == pytest.approx(comparison.baseline_ms / result.latency_ms)
    # one thread: timed by CPU time, which other processes on the machine cannot inflate
    assert comparison.clock == "cpu" and comparison.threads == 1
    # the baseline is the fastest fp32 backend, both measured in the same process
    assert set(comparison.parent_ms) == {model_variants.EAGER, model_variants.ONNXRUNTIME}
    assert comparison.baseline_ms == min(comparison.parent_ms.values())
    assert 0.95 <= result.agreement <= 1.0
    assert abs(result.metric_drop) <= 0.01
    assert result.mean_abs_diff < 0.05
    assert result.rows_per_second == pytest.approx(WIDE_BATCH_ROWS / result.latency_ms * 1000)
    # int8 weights are about a quarter of the fp32 file
    assert result.size_bytes < 0.4 * comparison.parent_size_bytes
    skipped = variant_of(comparison, "float8_dynamic")
    assert skipped.status == outcomes.SKIPPED and "CUDA" in skipped.reasons[0]


def test_latency_is_cpu_time_on_one_thread_and_wall_time_on_more():
    import time

    assert measure.latency_clock(1) == ("cpu", time.process_time)
    assert measure.latency_clock(2) == ("wall", time.perf_counter)


def test_int8_does_not_pay_on_a_tiny_network(tiny):
    result = variant_of(tiny, "int8_dynamic")
    assert result.status == outcomes.REJECTED
    assert result.speedup < 1.2
    assert any("speed-up" in reason and "< min 1.20x" in reason for reason in result.reasons)
    # the rejected variant's numbers are kept
    assert result.latency_ms is not None and result.metric_drop is not None


def test_the_comparison_table_and_metrics_hold_every_model(wide, tmp_path):
    comparison = wide["comparison"]
    rows = comparison.table()
    assert [row["model"] for row in rows] == [
        *(f"fp32 ({runtime})" for runtime in comparison.parent_ms),
        "int8_dynamic",
        "ort_int8_dynamic",
        "float8_dynamic",
    ]
    assert sum(row["status"] == "baseline" for row in rows) == 1
    metrics = comparison.metrics()
    assert metrics["ort_int8_dynamic.passed"] == 1.0
    assert metrics["ort_int8_dynamic.speedup"] == pytest.approx(
        variant_of(comparison, "ort_int8_dynamic").speedup
    )
    assert "float8_dynamic.speedup" not in metrics
    plot = report.plot_tradeoff(comparison, tmp_path / "plot.png", title="wide")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------
# Storing and loading


def document_for(network_hidden: tuple[int, ...], n_inputs: int, method: str) -> dict:
    parent = {
        "format": 1,
        "task": "binary",
        "config": network_config(ModelSpec(hidden=list(network_hidden), dropout=0.0)),
        "n_inputs": n_inputs,
        "n_outputs": 1,
        "threshold": 0.5,
    }
    return model_variants.variant_document(
        parent, method, model_variants.EAGER, {"version": "1", "weights_sha256": "x"}
    )


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only", "bf16", "fp16"])
def test_a_saved_variant_loads_back_with_identical_outputs(data, tmp_path, method):
    n_inputs = data["preprocessor"].n_inputs
    variant = methods.build_variant(mlp((64, 32), n_inputs), method)
    path = tmp_path / "weights.safetensors"
    model_variants.save_variant_weights(variant, path)
    loaded = model_variants.load_variant_network(document_for((64, 32), n_inputs, method), path)
    assert loaded.method == method
    assert np.array_equal(predict_raw(loaded, data["x"]), predict_raw(variant, data["x"]))
    # the file is plain safetensors: no pickle anywhere
    assert b"pickle" not in path.read_bytes()[:4096]


def test_loading_refuses_a_file_of_another_method_or_an_unlisted_class(data, tmp_path):
    n_inputs = data["preprocessor"].n_inputs
    variant = methods.build_variant(mlp((16,), n_inputs), "int8_weight_only")
    path = tmp_path / "weights.safetensors"
    model_variants.save_variant_weights(variant, path)
    with pytest.raises(
        ValueError, match=r"holds a int8_weight_only network, network\.json names bf16"
    ):
        model_variants.load_variant_network(document_for((16,), n_inputs, "bf16"), path)

    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    with safetensors.torch.safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    described = json.loads(metadata["layers.0.weight"])
    described["_type"] = "builtins.eval"  # not a tensor class torchao's reader allows
    metadata["layers.0.weight"] = json.dumps(described)
    tampered = tmp_path / "tampered.safetensors"
    safetensors.torch.save_file(tensors, str(tampered), metadata=metadata)
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        model_variants.load_variant_network(
            document_for((16,), n_inputs, "int8_weight_only"), tampered
        )


def test_an_onnx_runtime_variant_serves_any_batch_size_from_several_threads(data, wide):
    """The scoring engine's path: one runtime, called from worker threads."""
    from concurrent.futures import ThreadPoolExecutor

    variant = wide["built"]["ort_int8_dynamic"]
    runtime = measure.variant_runtime(variant, data["preprocessor"].n_inputs)
    assert runtime.backend == "onnxruntime"  # its own graph, not the fp32 network eager
    x = data["x"]
    sizes = [1000, 7, 1, 1000, 333]
    expected = [runtime.run(x[:rows]) for rows in sizes]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(pool.map(lambda rows: runtime.run(x[:rows]), sizes))
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == want.shape
        assert np.allclose(got, want, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Registering and serving (a real MLflow store)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A local MLflow store holding one logged fp32 model, for the whole module."""
    root = tmp_path_factory.mktemp("store")
    with isolated_mlflow():
        configure_tracking(root)
        experiment_id = ensure_experiment("quantize", root)
        _, _, info, sha256, run_id = log_trained_model(
            table(300, seed=3),
            FEATURES,
            task="binary",
            target="y",
            experiment_id=experiment_id,
            workdir=root / "model",
        )
        yield {"info": info, "sha256": sha256, "run_id": run_id, "root": root}


@pytest.fixture
def store(logged, request):
    """A registered model of its own (named after the test) whose v1 is that fp32 model,
    gated and @champion."""
    name = "q-" + request.node.name.removeprefix("test_")[:60]
    client = MlflowClient()
    client.create_registered_model(name)
    info = logged["info"]
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=logged["run_id"],
        model_id=info.model_id,
        tags={WEIGHTS_TAG: logged["sha256"], "stemma.gate.decision": "passed"},
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return {**logged, "client": client, "uri": info.model_uri, "name": name}


def register(store, *, client=None, verify=lambda number: None, method="int8_dynamic"):
    return registering.register_variant(
        client=client or store["client"],
        model_name=store["name"],
        parent_version="1",
        method=method,
        model_uri=store["uri"],
        run_id=store["run_id"],
        tags={registering.METHOD_TAG: method, registering.PARENT_VERSION_TAG: "1"},
        description="test variant",
        verify=verify,
    )


def versions(store) -> list[str]:
    found = store["client"].search_model_versions(f"name = '{store['name']}'")
    return sorted(str(v.version) for v in found)


def aliases(store) -> dict[str, str]:
    registered = store["client"].get_registered_model(store["name"])
    return {k: str(v) for k, v in registered.aliases.items()}


def test_a_registered_variant_is_tagged_aliased_and_finished(store):
    version = register(store)
    assert version.tags[registering.STATUS_TAG] == registering.STATUS_REGISTERED
    assert registering.OWNER_TAG not in version.tags
    assert version.tags[registering.METHOD_TAG] == "int8_dynamic"
    assert aliases(store) == {"champion": "1", "v1-int8-dynamic": "2"}


class InterruptedClient(MlflowClient):
    """A real client whose alias call is interrupted, as Ctrl-C would at that moment."""

    def set_registered_model_alias(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_an_interrupted_registration_leaves_no_half_registered_version(store):
    with pytest.raises(KeyboardInterrupt):
        register(store, client=InterruptedClient())
    assert versions(store) == ["1"]
    assert aliases(store) == {"champion": "1"}


def test_a_variant_that_fails_verification_is_not_registered(store):
    def verify(number: str) -> None:
        raise RegistryError(f"v{number} does not give the measured outputs")

    with pytest.raises(RegistryError, match="v2 does not give the measured outputs"):
        register(store, verify=verify)
    assert versions(store) == ["1"]


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import mlflow
    from mlflow import MlflowClient
    from stemma.components.quantization import registering as q
    mlflow.set_tracking_uri(sys.argv[1])
    mlflow.set_registry_uri(sys.argv[1])
    q.register_variant(
        client=MlflowClient(), model_name=sys.argv[2], parent_version="1", method="bf16",
        model_uri=sys.argv[3], run_id=sys.argv[4], tags={q.METHOD_TAG: "bf16"},
        description="killed", verify=lambda number: os.kill(os.getpid(), signal.SIGKILL),
    )
    """
)


def test_a_variant_left_by_a_killed_process_is_never_served_and_is_removed(store):
    client, name = store["client"], store["name"]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED,
            mlflow.get_tracking_uri(),
            name,
            store["uri"],
            store["run_id"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    (left,) = [v for v in client.search_model_versions(f"name = '{name}'") if str(v.version) != "1"]
    assert left.tags[registering.STATUS_TAG] == registering.STATUS_REGISTERING
    assert aliases(store) == {"champion": "1"}  # nothing points at it
    serve = QuantizeSpec(serve=True)
    reference, note = served_reference(serve, f"models:/{name}@champion", client=client)
    assert reference == f"models:/{name}@champion" and "has not been quantized" in note

    assert registering.remove_abandoned_variants(client, name) == [str(left.version)]
    assert versions(store) == ["1"]
    # a registering version of a live process is left alone (it may be finishing)
    live = client.create_model_version(
        name,
        source=store["uri"],
        run_id=store["run_id"],
        tags={
            registering.STATUS_TAG: registering.STATUS_REGISTERING,
            registering.OWNER_TAG: registering.owner_id(),
        },
    )
    assert registering.remove_abandoned_variants(client, name) == []
    stale = live.creation_timestamp / 1000 + registering.STALE_REGISTRATION_SECONDS + 1
    assert registering.remove_abandoned_variants(client, name, now=stale) == [str(live.version)]


def test_served_reference_follows_the_spec_and_the_aliases(store):
    client, name = store["client"], store["name"]
    champion = f"models:/{name}@champion"
    assert served_reference(None, champion, client=client) == (champion, None)
    assert served_reference(QuantizeSpec(), champion, client=client) == (champion, None)
    serve = QuantizeSpec(serve=True)

    # quantized, nothing passed: fp32, with the numbers of the rejections
    summary = {
        "variants": {
            "int8_dynamic": {
                "status": "rejected",
                "reasons": ["roc_auc drop 0.0001 <= max 0.0050", "speed-up 0.80x < min 1.20x"],
            }
        }
    }
    client.set_model_version_tag(name, "1", registering.SUMMARY_TAG, json.dumps(summary))
    reference, note = served_reference(serve, champion, client=client)
    assert reference == champion
    assert f"serving fp32 {name} v1" in note and "speed-up 0.80x < min 1.20x" in note

    # a variant passed: its alias is served, unless a model was named on the command line
    register(store, method="bf16")
    client.set_registered_model_alias(name, registering.served_alias("1"), "2")
    reference, note = served_reference(serve, champion, client=client)
    assert reference == f"models:/{name}@v1-quantized"
    assert f"bf16 variant {name} v2 of {name} v1" in note
    assert served_reference(serve, champion, explicit=True, client=client) == (champion, None)
    # by version number too
    assert served_reference(serve, f"models:/{name}/1", client=client)[0] == (
        f"models:/{name}@v1-quantized"
    )


def test_a_logged_variant_loads_through_the_registry_and_pyfunc_without_pickle(store, data):
    """The model-from-code file and the scoring loader both rebuild a variant."""
    client, name = store["client"], store["name"]
    frame = table(300, seed=3)
    fp32 = load_scoring_model(f"models:/{name}/1", client=client)
    variant = methods.build_variant(fp32.network, "int8_weight_only")
    files = heldout.download_model_files(client, name, "1", store["root"] / "parent")
    with mlflow.start_run(experiment_id=ensure_experiment("quantize", store["root"])):
        info, sha256 = registering.log_variant_model(
            variant=variant,
            parent_files=files,
            parent={"version": "1", "weights_sha256": fp32.weights_sha256},
            input_example=frame[COLUMNS],
            workdir=store["root"] / "variant",
        )
    version = client.create_model_version(
        name, source=info.model_uri, model_id=info.model_id, tags={WEIGHTS_TAG: sha256}
    )
    loaded = load_scoring_model(f"models:/{name}/{version.version}", client=client)
    assert isinstance(loaded.network, model_variants.QuantizedNetwork)
    x = fp32.preprocessor.transform(frame)
    assert np.array_equal(predict_raw(loaded.network, x), predict_raw(variant, x))

    script = textwrap.dedent(
        """
        import io, sys, mlflow, pandas as pd
        mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1])
        model = mlflow.pyfunc.load_model(sys.argv[2], suppress_warnings=True)
        frame = pd.read_json(io.StringIO(sys.argv[3]), orient="split")
        print(model.predict(frame).to_json(orient="split"))
        """
    )
    example = frame[COLUMNS].head(20)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            mlflow.get_tracking_uri(),
            f"models:/{name}/{version.version}",
            example.to_json(orient="split"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = pd.read_json(io.StringIO(done.stdout.strip().splitlines()[-1]), orient="split")
    expected = fp32.preprocessor.decode_output(
        predict_raw(variant, fp32.preprocessor.transform(example))
    )
    assert np.allclose(predicted["score"].to_numpy(), np.asarray(expected).reshape(-1))


def test_the_default_parent_is_the_newest_fp32_version_that_passed_its_gate(store):
    client, name = store["client"], store["name"]
    info = store["info"]

    def add(tags):
        return client.create_model_version(
            name, source=info.model_uri, run_id=store["run_id"], model_id=info.model_id, tags=tags
        ).version

    gated = add({"stemma.gate.decision": "passed"})
    add({"stemma.gate.decision": "failed"})
    add({"stemma.gate.decision": "passed", registering.METHOD_TAG: "bf16"})  # a variant
    assert heldout.default_parent_reference(client, name) == f"models:/{name}/{gated}"
    with pytest.raises(RegistryError, match="no registered model named 'nothing-here'"):
        heldout.default_parent_reference(client, "nothing-here")


def test_held_out_rows_must_score_what_the_gate_recorded():
    from types import SimpleNamespace

    from stemma.components.errors import DataError

    parent = SimpleNamespace(
        name="credit",
        version="3",
        tags={"stemma.gate.metric": "roc_auc", "stemma.gate.value": "0.9123"},
    )
    heldout.check_parent_value(parent, "roc_auc", 0.9123)
    with pytest.raises(DataError, match="rows differ from those it was gated on"):
        heldout.check_parent_value(parent, "roc_auc", 0.9124)
    heldout.check_parent_value(parent, "pr_auc", 0.5)  # another metric: nothing to compare
