"""Pruning and distillation against their parent: parameters, metric, speed and cost.

Run with `.venv/bin/pytest tests/benchmarks/bench_compression.py -m benchmark -s`.

Two parents trained on the worked example's credit data (20,000 rows): the example's own
MLP (64-32) and a wider one (512-512-256). Each is pruned (half the hidden units by L1
norm, a 3-epoch fine-tune) and distilled (a student at half the hidden widths), exactly as
`stemma run compress` does it, and everything is measured by `measure_candidates`: the
gate metric on the held-out rows, and the standard probe (batches of 1, 64 and 4,096
rows, one thread, interleaved rounds so that load from other processes hits every model
alike) through the model runtime, on the backend each would be served with (ONNX Runtime
on its own export). Cost per million predictions is priced on the illustrative 2-vCPU
machine of the spec's default `cost` section. The cheapest passing variant on the wider
network is then int8-quantized too (ONNX Runtime's dynamic int8) and priced the same way.

Targets: a pruned variant with at least 30% fewer parameters within the metric limit and
at least 1.3x faster than its parent; a student at half the width within the limit; the
cheapest passing variant at no more than 0.7x the fp32 cost on the wider network.
"""

from __future__ import annotations

import pandas as pd
import pytest

from stemma.components.compression.distillation import distill_network, student_config
from stemma.components.compression.pruning import prune_network
from stemma.components.compression.variants import (
    Candidate,
    CompressComparison,
    measure_candidates,
)
from stemma.components.data.tables import split_table
from stemma.components.model.networks import build_network, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.quantization.measure import heldout_labels
from stemma.components.runtime.backends import set_threads
from stemma.components.spec import (
    CompressSpec,
    CostSpec,
    FeaturesSpec,
    ModelSpec,
    PruneSpec,
    SplitSpec,
    TrainSpec,
)
from stemma.components.training.loop import train_network
from stemma.examples.credit import generate_credit_data

pytestmark = pytest.mark.benchmark

TRAIN_ROWS = 20_000
METRIC = "roc_auc"
TRAIN = TrainSpec(epochs=8, batch_size=256, learning_rate=0.001, seed=7, early_stopping=None)
SETTINGS = CompressSpec(prune=PruneSpec(amount=0.5, finetune_epochs=3), min_speedup=1.0)
COST = CostSpec()


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    set_threads(1)
    folder = tmp_path_factory.mktemp("credit")
    generate_credit_data(folder, train_rows=TRAIN_ROWS, days=1, batch_rows=100)
    frame = pd.read_parquet(folder / "credit" / "train.parquet")
    features = FeaturesSpec(
        numeric=["salary", "commission", "age", "hvalue", "hyears", "loan"],
        categorical=["elevel", "car", "zipcode"],
    )
    train, valid, test = split_table(frame, SplitSpec(validation_fraction=0.1))
    preprocessor = fit_preprocessor(train, features, task="binary", target="approved")
    return {
        "preprocessor": preprocessor,
        "x_train": preprocessor.transform(train),
        "y_train": preprocessor.encode_target(train, "approved"),
        "x_val": preprocessor.transform(valid),
        "y_val": preprocessor.encode_target(valid, "approved"),
        "x_test": preprocessor.transform(test),
        "y_test": heldout_labels(preprocessor, test["approved"], "approved"),
    }


def _compare(credit: dict, hidden: list[int], tmp_path) -> tuple[CompressComparison, dict]:
    """Train a parent of these widths, prune and distill it, measure all of it."""
    preprocessor = credit["preprocessor"]
    config = network_config(ModelSpec(hidden=hidden, dropout=0.1))
    parent = build_network(config, preprocessor.n_inputs, 1, seed=TRAIN.seed)
    arrays = {key: credit[key] for key in ("x_train", "y_train", "x_val", "y_val")}
    parent = train_network(parent, **_loop(arrays), train=TRAIN, task="binary").network
    pruned = prune_network(
        parent, config, settings=SETTINGS.prune, train=TRAIN, task="binary", **arrays
    )
    student = student_config(SETTINGS.distill.student, config)
    distilled = distill_network(
        parent,
        student,
        n_inputs=preprocessor.n_inputs,
        n_outputs=1,
        settings=SETTINGS.distill,
        train=TRAIN,
        task="binary",
        **arrays,
    )
    candidates = [
        Candidate("prune", pruned.network, dict(pruned.config)),
        Candidate("distill", distilled.network, dict(distilled.config)),
    ]
    comparison, measured = measure_candidates(
        parent,
        candidates,
        x=credit["x_test"],
        y=credit["y_test"],
        preprocessor=preprocessor,
        task="binary",
        metric=METRIC,
        threshold=0.5,
        settings=SETTINGS,
        machine=COST.machine("scoring"),
        currency=COST.currency,
        workdir=tmp_path,
    )
    _print(f"credit MLP {'-'.join(map(str, hidden))}", comparison)
    return comparison, {"parent": parent, "measured": measured, "student": student}


def _loop(arrays: dict) -> dict:
    return {
        "x_train": arrays["x_train"],
        "y_train": arrays["y_train"],
        "x_val": arrays["x_val"],
        "y_val": arrays["y_val"],
    }


def _print(title: str, comparison: CompressComparison) -> None:
    print(
        f"\n{title}: {METRIC} {comparison.parent_value:.4f}, {comparison.parent_parameters:,} "
        f"parameters, fp32 {comparison.baseline_runtime} {comparison.parent_cost_per_million:.4g} "
        f"{comparison.currency}/million (illustrative 2-vCPU price); limit {comparison.metric_drop_limit}"
    )
    print(f"  measured on {comparison.machine}")
    header = (
        f"  {'model':<20}{'status':<10}{'params':>10}{METRIC:>9}{'drop':>9}{'p50 b1':>9}"
        f"{'p50 b64':>9}{'p50 b4096':>11}{'p99 b4096':>11}{'speed-up':>10}{'cost/M':>10}{'x fp32':>8}"
    )
    print(header)
    for row in comparison.table():
        speedup = row.get("speedup")
        cost = row.get("cost_per_million")
        ratio = None if cost is None else cost / comparison.parent_cost_per_million
        print(
            f"  {row['model']:<20}{row['status']:<10}{row['parameters']:>10,}"
            f"{row[METRIC]:>9.4f}{row['metric_drop']:>9.4f}{row['p50_ms_b1']:>9.3f}"
            f"{row['p50_ms_b64']:>9.3f}{row['p50_ms_b4096']:>11.2f}{row['p99_ms_b4096']:>11.2f}"
            f"{'-' if speedup is None else f'{speedup:.2f}x':>10}"
            f"{'-' if cost is None else f'{cost:.4g}':>10}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>8}"
        )


def _by_method(comparison: CompressComparison) -> dict:
    return {result.method: result for result in comparison.candidates}


def test_compression_of_the_worked_example(credit, tmp_path):
    comparison, _ = _compare(credit, [64, 32], tmp_path)
    found = _by_method(comparison)
    pruned, student = found["prune"], found["distill"]
    fewer = 1 - pruned.parameters / comparison.parent_parameters
    print(
        f"  reached: pruned {fewer:.0%} fewer parameters, {pruned.speedup:.2f}x; student "
        f"{student.parameters / comparison.parent_parameters:.0%} of the parameters, drop "
        f"{student.metric_drop:.4f}"
    )
    assert fewer >= 0.30
    limit = SETTINGS.metric_drop(METRIC).limit(comparison.parent_value)
    assert pruned.metric_drop <= limit
    assert student.metric_drop <= limit


def test_compression_of_a_wider_network(credit, tmp_path):
    from stemma.components.quantization.measure import parent_runtimes, variant_runtime
    from stemma.components.quantization.methods import build_ort_variant
    from stemma.components.runtime.probe import probe_runtimes

    comparison, built = _compare(credit, [512, 512, 256], tmp_path / "wide")
    found = _by_method(comparison)
    pruned = found["prune"]
    fewer = 1 - pruned.parameters / comparison.parent_parameters
    limit = SETTINGS.metric_drop(METRIC).limit(comparison.parent_value)
    passing = [result for result in comparison.candidates if result.passed]
    cheapest = min(passing, key=lambda result: result.cost_per_million)
    # ...and the cheapest passing one, quantized in turn (ONNX Runtime's dynamic int8)
    network = built["measured"][cheapest.method].candidate.network
    folder = tmp_path / "int8"
    folder.mkdir()
    _, graph, _ = parent_runtimes(network, credit["x_test"].shape[1], folder)
    variant = build_ort_variant(network, "ort_int8_dynamic", graph, folder / "variant")
    runtime = variant_runtime(variant, credit["x_test"].shape[1])
    fp32 = built["measured"][cheapest.method].runtime
    probed = probe_runtimes({"fp32": fp32, "int8": runtime}, credit["x_test"])
    machine = COST.machine("scoring")
    int8_ratio = probed["int8"].cost_per_million(machine) / probed["fp32"].cost_per_million(machine)
    print(
        f"  reached: pruned {fewer:.0%} fewer parameters, {pruned.speedup:.2f}x faster, drop "
        f"{pruned.metric_drop:.4f} (limit {limit:.4f}); cheapest passing: {cheapest.method} at "
        f"{cheapest.cost_ratio:.2f}x fp32's cost; {cheapest.method} then ort int8: "
        f"{int8_ratio * cheapest.cost_ratio:.2f}x fp32's cost (not gated here)"
    )
    assert fewer >= 0.30
    assert pruned.metric_drop <= limit
    assert pruned.speedup >= 1.3
    assert cheapest.cost_ratio <= 0.7
