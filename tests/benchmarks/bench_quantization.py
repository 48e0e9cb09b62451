"""Latency of each quantized variant against the fastest fp32 backend (eager or ONNX Runtime).

Run with `.venv/bin/pytest tests/benchmarks/bench_quantization.py -m benchmark -s`.

Three models: the worked example's credit MLP (64-32, trained for a few epochs on the
example's data), a user's own module (a 128-wide residual MLP with LayerNorm,
tests/components/runtime/networks.py) and a larger MLP (512-512-256, seeded weights).
Each variant is built and timed by `compare_variants`, as `stemma run quantize` does it:
one run of a batch of held-out rows through the model runtime on one thread, in
interleaved rounds so that load from other processes hits every model alike; the median
of the rounds counts. Printed per variant: its backend, its latency and the ratio fp32
latency / variant latency (above 1: the variant is faster) against fp32 eager, fp32 on
ONNX Runtime and the faster of the two (the gate's baseline).
"""

from __future__ import annotations

import numpy as np
import pytest

from stemma.components.data.tables import split_table
from stemma.components.model.networks import build_network, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.quantization.measure import compare_variants
from stemma.components.quantization.results import FAILED, Comparison
from stemma.components.runtime.backends import set_threads
from stemma.components.scoring.pipeline import FORWARD_BATCH_ROWS
from stemma.components.spec import FeaturesSpec, ModelSpec, QuantizeSpec, SplitSpec, TrainSpec
from stemma.components.training.loop import train_network
from stemma.examples.credit import generate_credit_data

METHODS = ["int8_dynamic", "int8_weight_only", "bf16", "fp16", "ort_int8_dynamic", "ort_fp16"]
TRAIN_ROWS = 20_000
ROUNDS = 15
#: The scoring engine's forward batch, and the runtime's largest batch.
BATCHES = (FORWARD_BATCH_ROWS, 65_536)
LARGE_HIDDEN = [512, 512, 256]
LARGE_BATCH = 4096
RESIDUAL = "tests.components.runtime.networks:ResidualMLP"


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    set_threads(1)
    folder = tmp_path_factory.mktemp("credit")
    generate_credit_data(folder, train_rows=TRAIN_ROWS, days=1, batch_rows=100)
    import pandas as pd

    frame = pd.read_parquet(folder / "credit" / "train.parquet")
    features = FeaturesSpec(
        numeric=["salary", "commission", "age", "hvalue", "hyears", "loan"],
        categorical=["elevel", "car", "zipcode"],
    )
    train, valid, test = split_table(frame, SplitSpec())
    preprocessor = fit_preprocessor(train, features, task="binary", target="approved")
    return {
        "preprocessor": preprocessor,
        "x_train": preprocessor.transform(train),
        "y_train": preprocessor.encode_target(train, "approved"),
        "x_valid": preprocessor.transform(valid),
        "y_valid": preprocessor.encode_target(valid, "approved"),
        "x_test": preprocessor.transform(test),
        "y_test": test["approved"].to_numpy(dtype=np.float64),
    }


def _report(title: str, comparison: Comparison) -> dict[str, float]:
    """Print the comparison; returns each variant's speed-up over the baseline."""
    fp32 = comparison.parent_ms
    print(
        f"\n{title} ({comparison.clock}-time ms, baseline fp32 {comparison.baseline_runtime}): "
        + ", ".join(f"fp32 {k} {v:.3f} ms" for k, v in fp32.items())
    )
    print(
        f"  {'variant':<18}{'backend':>12}{'ms':>9}{'vs eager':>10}{'vs ort':>9}"
        f"{'vs fastest':>12}{'drop':>9}  gate"
    )
    for variant in comparison.variants:
        if variant.latency_ms is None:
            print(f"  {variant.method:<18}{variant.status}: {variant.reasons[0]}")
            continue
        ratios = [
            f"{fp32[runtime] / variant.latency_ms:.2f}x" if runtime in fp32 else "-"
            for runtime in ("eager", "onnxruntime")
        ]
        print(
            f"  {variant.method:<18}{variant.runtime:>12}{variant.latency_ms:>9.3f}"
            f"{ratios[0]:>10}{ratios[1]:>9}{variant.speedup or 0.0:>11.2f}x"
            f"{variant.metric_drop:>9.4f}  {variant.status}"
        )
    return {v.method: v.speedup for v in comparison.variants if v.speedup is not None}


def _compare(network, data, batch_rows: int, tmp) -> Comparison:
    comparison, _ = compare_variants(
        network,
        data["preprocessor"],
        data["x_test"],
        data["y_test"],
        task="binary",
        metric="roc_auc",
        threshold=0.5,
        settings=QuantizeSpec(methods=METHODS, repeats=ROUNDS, warmup=3),
        batch_rows=batch_rows,
        workdir=tmp,
    )
    return comparison


def _trained(spec: ModelSpec, data) -> object:
    network = build_network(network_config(spec), data["preprocessor"].n_inputs, seed=7)
    return train_network(
        network,
        data["x_train"],
        data["y_train"],
        data["x_valid"],
        data["y_valid"],
        train=TrainSpec(epochs=5, early_stopping=None),
        task="binary",
        progress=False,
    ).network.eval()


@pytest.mark.benchmark
@pytest.mark.parametrize(
    "spec",
    [ModelSpec(hidden=[64, 32], dropout=0.1), ModelSpec(architecture=RESIDUAL)],
    ids=["credit-mlp", "residual-mlp"],
)
def test_variants_of_trained_models(credit, tmp_path, spec):
    trained = _trained(spec, credit)
    for batch_rows in BATCHES:
        comparison = _compare(trained, credit, batch_rows, tmp_path / str(batch_rows))
        speedups = _report(
            f"{spec.architecture} {spec.hidden}, {batch_rows} rows a run", comparison
        )
        print(f"  ORT int8 dynamic vs fastest fp32: {speedups.get('ort_int8_dynamic', 0):.2f}x")
        assert all(v.status != FAILED for v in comparison.variants)


@pytest.mark.benchmark
def test_variants_of_a_larger_mlp(credit, tmp_path):
    model = ModelSpec(hidden=LARGE_HIDDEN, dropout=0.0)
    network = build_network(network_config(model), credit["preprocessor"].n_inputs, seed=7)
    comparison = _compare(network.eval(), credit, LARGE_BATCH, tmp_path)
    speedups = _report(f"MLP {'-'.join(map(str, LARGE_HIDDEN))}, {LARGE_BATCH} rows", comparison)
    # ONNX Runtime's int8 beats the fastest fp32 backend on a network this wide
    assert speedups["ort_int8_dynamic"] > 1.0
