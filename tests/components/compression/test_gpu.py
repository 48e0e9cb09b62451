"""The GPU rows of a comparison: fp32 eager and on ONNX Runtime's CUDA provider, fp16 and
bf16 casts, priced on the spec's GPU machine; none, with the reason, without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stemma.components.compression.gpu import FP32_EAGER, gpu_comparison, gpu_machine
from stemma.components.model.networks import MLP
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.quantization.measure import heldout_labels
from stemma.components.spec import CostSpec, FeaturesSpec, MachineSpec, TrainSpec
from stemma.components.training.loop import train_network

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cancer():
    """A small MLP trained on scikit-learn's breast_cancer, and its held-out rows."""
    from sklearn import datasets

    frame = datasets.load_breast_cancer(as_frame=True).frame
    frame.columns = [name.replace(" ", "_") for name in frame.columns]
    features = FeaturesSpec(numeric=[c for c in frame.columns if c != "target"])
    train, test = frame.iloc[:450], frame.iloc[450:]
    preprocessor = fit_preprocessor(train, features, task="binary", target="target")
    x, y = preprocessor.transform(train), preprocessor.encode_target(train, "target")
    network = train_network(
        MLP(preprocessor.n_inputs, 1, (32, 16)),
        x,
        y,
        x,
        y,
        train=TrainSpec(epochs=15, batch_size=64, learning_rate=0.01, seed=3, early_stopping=None),
        task="binary",
        progress=False,
    ).network
    return {
        "network": network,
        "preprocessor": preprocessor,
        "x": preprocessor.transform(test),
        "y": heldout_labels(preprocessor, test["target"], "target"),
    }


def test_the_gpu_machine_is_the_first_kind_with_a_gpu():
    assert gpu_machine(CostSpec())[0] == "gpu"
    cpus_only = CostSpec(
        machines={"small": MachineSpec(price_per_hour=0.2, cpus=4)},
        scoring="small",
        serving="small",
    )
    assert gpu_machine(cpus_only) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_there_are_no_rows_and_a_note_says_why(cancer, tmp_path):
    figures, notes = gpu_comparison(
        cancer["network"],
        cancer["preprocessor"],
        x=cancer["x"],
        y=cancer["y"],
        metric="roc_auc",
        threshold=0.5,
        cost=CostSpec(),
        folder=tmp_path,
    )
    assert figures == []
    assert notes == ["no GPU here: the comparison has CPU rows only"]


@needs_gpu
def test_fp16_bf16_and_the_cuda_provider_join_on_a_gpu(cancer, tmp_path):
    figures, notes = gpu_comparison(
        cancer["network"],
        cancer["preprocessor"],
        x=cancer["x"],
        y=cancer["y"],
        metric="roc_auc",
        threshold=0.5,
        cost=CostSpec(),
        folder=tmp_path,
    )
    by_label = {figure.label: figure for figure in figures}
    assert FP32_EAGER in by_label and "fp16 eager (cuda)" in by_label
    if torch.cuda.is_bf16_supported():
        assert "bf16 eager (cuda)" in by_label
    assert any("onnxruntime" in label for label in by_label) or any("ONNX" in n for n in notes)
    price = CostSpec().machines["gpu"].price_per_hour
    for figure in figures:
        assert figure.profile.device == "cuda"
        for batch in figure.profile.batches:
            assert 0 < batch.p50_ms <= batch.p95_ms <= batch.p99_ms
        assert abs(figure.metric_drop) < 0.02
        assert figure.machine == "gpu"
        expected = figure.profile.wall_seconds_per_million * price / 3600.0
        assert np.isclose(figure.cost_per_million, expected)
