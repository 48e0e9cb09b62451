"""Structured pruning: whole hidden units removed from the built-in MLP and from a user's
own module (found by tracing it with torch.fx), the smaller dense network fine-tuned,
stored as a normal model and rebuilt through ``build_network`` without pickle; bad
amounts and networks with nothing to prune are refused before anything changes.

Real tables (scikit-learn's breast cancer, wine and diabetes), real safetensors files, a
real MLflow store on SQLite and a fresh process for the pyfunc entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from torch import nn

from stemma.components.compression import pruning
from stemma.components.compression.pruning import (
    NO_UNSTRUCTURED_NOTE,
    PrunedLayer,
    check_amount,
    prunable_layers,
    prune_network,
)
from stemma.components.errors import CompressionError, TrainingError
from stemma.components.model.artifact import (
    integrity_tags,
    load_weights,
    log_pyfunc_model,
    save_weights,
    weights_sha256,
)
from stemma.components.model.networks import MLP, build_network
from stemma.components.model.onnx_graph import export_onnx
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import FeaturesSpec, PruneSpec, TrainSpec
from stemma.components.training.loop import predict_raw, train_network

TRAIN = TrainSpec(
    epochs=5, batch_size=64, learning_rate=3e-3, seed=3, device="cpu", early_stopping=None
)

USER_NETWORKS = textwrap.dedent(
    """\
    import torch
    import torch.nn.functional as F
    from torch import nn


    class GeluNet(nn.Module):
        def __init__(self, n_inputs, n_outputs, width=32):
            super().__init__()
            self.encode = nn.Linear(n_inputs, width)
            self.hidden = nn.Linear(width, width // 2)
            self.head = nn.Linear(width // 2, n_outputs)

        def forward(self, x):
            h = F.gelu(self.encode(x))
            h = F.dropout(torch.relu(self.hidden(h)), p=0.1, training=self.training)
            return self.head(h)


    class Residual(nn.Module):
        def __init__(self, n_inputs, n_outputs, width=8, tail=False):
            super().__init__()
            self.stem = nn.Linear(n_inputs, width)
            self.inner = nn.Linear(width, width)
            self.tail = nn.Linear(width, width) if tail else None
            self.head = nn.Linear(width, n_outputs)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = h + torch.relu(self.inner(h))  # stem's units also feed the sum
            if self.tail is not None:
                h = F.relu(self.tail(h))
            return self.head(h)


    class Reshaped(nn.Module):
        def __init__(self, n_inputs, n_outputs):
            super().__init__()
            self.first = nn.Linear(n_inputs, 8)
            self.second = nn.Linear(8, n_outputs)

        def forward(self, x):
            h = self.first(x).view(x.shape[0], 2, 4).flatten(1)
            return self.second(torch.relu(h))


    class Branchy(nn.Module):
        def __init__(self, n_inputs, n_outputs):
            super().__init__()
            self.first = nn.Linear(n_inputs, 8)
            self.second = nn.Linear(8, n_outputs)

        def forward(self, x):
            h = torch.relu(self.first(x))
            if h.sum() > 0:
                return self.second(h)
            return -self.second(h)
    """
)


@pytest.fixture
def user_networks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of user networks in tmp_path, importable under a name no other test uses."""
    name = f"pruned_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_NETWORKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """75/25 split, inputs standardised on the training rows."""
    order = np.random.default_rng(0).permutation(len(x))
    cut = len(x) * 3 // 4
    train, val = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    scaled = ((x - mean) / std).astype(np.float32)
    return scaled[train], y[train], scaled[val], y[val]


def table(name: str) -> tuple[str, int, tuple[np.ndarray, ...]]:
    """``(task, n_outputs, (x_train, y_train, x_val, y_val))`` of a scikit-learn table."""
    if name == "breast_cancer":
        x, y = load_breast_cancer(return_X_y=True)
        return "binary", 1, split(x, y.astype(np.float32))
    if name == "wine":
        x, y = load_wine(return_X_y=True)
        return "multiclass", 3, split(x, np.eye(3, dtype=np.float32)[y])
    x, y = load_diabetes(return_X_y=True)
    return "regression", 1, split(x, ((y - y.mean()) / y.std()).astype(np.float32))


def mlp_config(hidden: list[int], dropout: float = 0.0) -> dict:
    return {"architecture": "mlp", "hidden": hidden, "dropout": dropout, "params": {}}


def prune(
    network: nn.Module, config: dict, data: tuple, task: str, **settings
) -> pruning.PruneResult:
    x_train, y_train, x_val, y_val = data
    return prune_network(
        network,
        config,
        settings=PruneSpec(**settings),
        train=TRAIN,
        task=task,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        progress=False,
    )


def rebuilt(result: pruning.PruneResult, n_inputs: int, n_outputs: int, folder: Path) -> nn.Module:
    """The pruned network as a load rebuilds it: config through build_network, then weights."""
    save_weights(result.network, folder / "weights.safetensors")
    config = json.loads(json.dumps(result.config))  # what network.json holds
    network = build_network(config, n_inputs, n_outputs)
    return load_weights(network, folder / "weights.safetensors").eval()


def outputs(network: nn.Module, x: np.ndarray) -> np.ndarray:
    return predict_raw(network, x)


def validation_loss(network: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = torch.from_numpy(outputs(network, x))
    target = torch.from_numpy(y).reshape(logits.shape)
    return float(nn.functional.binary_cross_entropy_with_logits(logits, target))


def test_a_wide_mlp_pruned_by_half_is_much_smaller_rebuilds_and_exports(tmp_path: Path) -> None:
    task, n_outputs, data = table("breast_cancer")
    width = data[0].shape[1]
    config = mlp_config([512, 512, 256])
    network = build_network(config, width, n_outputs, seed=1)
    before = weights_sha256(network)

    result = prune(network, config, data, task, amount=0.5, finetune_epochs=1)

    assert result.parameters_after <= 0.7 * result.parameters_before
    assert result.parameters_after == sum(p.numel() for p in result.network.parameters())
    assert result.config == mlp_config([256, 256, 128])
    assert result.layers == (
        PrunedLayer("layers.0", 512, 256),
        PrunedLayer("layers.3", 512, 256),
        PrunedLayer("layers.6", 256, 128),
    )
    assert NO_UNSTRUCTURED_NOTE in result.notes
    assert [row["step"] for row in result.history] == [1]
    assert not result.network.training
    assert weights_sha256(network) == before  # the network given is untouched
    again = rebuilt(result, width, n_outputs, tmp_path)
    assert isinstance(again, MLP)
    np.testing.assert_array_equal(outputs(again, data[2]), outputs(result.network, data[2]))
    report = export_onnx(result.network, width, tmp_path / "network.onnx")
    assert report.exported, report.reason


#: A hand-made layer: unit 2 has small weights but a large bias; unit 3 a large outgoing
#: weight. By l1 (in x out): 3, 2, 3.1, 2.5 -> units 0 and 2 stay; by l2: 1.73, 2, 3.0, 2.5
#: -> units 2 and 3 stay.
HAND_INCOMING = [[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 0.5]]
HAND_BIAS = [0.0, 0.0, 3.0, 0.0]
HAND_OUTGOING = [[1.0, 1.0, 1.0, 5.0]]


@pytest.mark.parametrize(("criterion", "kept"), [("l1", [0, 2]), ("l2", [2, 3])], ids=["l1", "l2"])
def test_without_fine_tuning_the_highest_scoring_units_stay_in_order(
    criterion: str, kept: list[int]
) -> None:
    network = MLP(3, 1, hidden=[4], dropout=0.0)
    with torch.no_grad():
        network.layers[0].weight.copy_(torch.tensor(HAND_INCOMING))
        network.layers[0].bias.copy_(torch.tensor(HAND_BIAS))
        network.layers[3].weight.copy_(torch.tensor(HAND_OUTGOING))
    x = np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32)
    data = (x, (x[:, 0] > 0).astype(np.float32), x, (x[:, 0] > 0).astype(np.float32))

    result = prune(
        network, mlp_config([4]), data, "binary", amount=0.5, criterion=criterion, finetune_epochs=0
    )

    first, second = result.network.layers[0], result.network.layers[3]
    np.testing.assert_array_equal(
        first.weight.detach().numpy(), np.array(HAND_INCOMING, np.float32)[kept]
    )
    np.testing.assert_array_equal(
        first.bias.detach().numpy(), np.array(HAND_BIAS, np.float32)[kept]
    )
    np.testing.assert_array_equal(
        second.weight.detach().numpy(), np.array(HAND_OUTGOING, np.float32)[:, kept]
    )
    assert second.bias.item() == network.layers[3].bias.item()
    assert result.history == []
    assert "no fine-tuning (prune.finetune_epochs is 0)" in result.notes


def test_a_user_module_with_functional_activations_is_pruned_and_rebuilt(
    user_networks: str, tmp_path: Path
) -> None:
    task, n_outputs, data = table("wine")
    width = data[0].shape[1]
    config = {"architecture": f"{user_networks}:GeluNet", "params": {"width": 32}}
    network = build_network(config, width, n_outputs, seed=2)

    assert prunable_layers(network) == [("encode", "hidden"), ("hidden", "head")]
    result = prune(network, config, data, task, amount=0.5, finetune_epochs=1)

    assert result.config == {
        **config,
        "pruned": {"encode": [16, width], "hidden": [8, 16], "head": [n_outputs, 8]},
    }
    again = rebuilt(result, width, n_outputs, tmp_path)
    assert type(again).__name__ == "GeluNet"
    np.testing.assert_array_equal(outputs(again, data[2]), outputs(result.network, data[2]))
    assert network.encode.out_features == 32  # the network given is untouched
    twice = prune(result.network, result.config, data, task, amount=0.5, finetune_epochs=0)
    assert twice.config["pruned"] == {
        "encode": [8, width],
        "hidden": [4, 8],
        "head": [n_outputs, 4],
    }
    again = rebuilt(twice, width, n_outputs, tmp_path)
    np.testing.assert_array_equal(outputs(again, data[2]), outputs(twice.network, data[2]))


def test_a_pruned_user_module_loads_through_the_runtime_and_in_a_fresh_process(
    user_networks: str, tmp_path: Path, tracking: str
) -> None:
    table_frame = load_breast_cancer(as_frame=True).frame
    columns = ["mean radius", "mean texture", "mean smoothness", "worst concavity"]
    frame = table_frame[columns].rename(columns=lambda c: c.replace(" ", "_"))
    frame["malignant"] = 1 - table_frame["target"]
    features = FeaturesSpec(numeric=[c for c in frame.columns if c != "malignant"])
    preprocessor = fit_preprocessor(frame, features, task="binary", target="malignant")
    x = preprocessor.transform(frame)
    y = frame["malignant"].to_numpy(np.float32)
    architecture = f"{user_networks}:GeluNet"
    config = {"architecture": architecture, "params": {"width": 16}}
    network = build_network(config, x.shape[1], 1, seed=4)
    result = prune(network, config, (x, y, x, y), "binary", amount=0.5, finetune_epochs=1)
    with mlflow.start_run(experiment_id=mlflow.create_experiment(uuid.uuid4().hex)) as run:
        info, _ = log_pyfunc_model(
            preprocessor=preprocessor,
            network=result.network,
            network_config=result.config,
            input_example=frame,
            task="binary",
            workdir=tmp_path / "model",
            project_root=tmp_path,
        )
    client = mlflow.MlflowClient()
    name = f"pruned-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    client.create_model_version(
        name, info.model_uri, run.info.run_id, model_id=info.model_id,
        tags=integrity_tags(client, info.model_id),
    )  # fmt: skip

    loaded = load_scoring_model(f"models:/{name}/1", architectures=[architecture])
    np.testing.assert_allclose(
        loaded.runtime.run(x[:40]), outputs(result.network, x[:40]), rtol=1e-3, atol=1e-4
    )
    frame.head(40).to_parquet(tmp_path / "rows.parquet")
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1], suppress_warnings=True)\n"
        "model.predict(pd.read_parquet(sys.argv[2])).to_parquet(sys.argv[3])\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=tracking, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    done = subprocess.run(
        [sys.executable, "-c", script, info.model_uri, str(tmp_path / "rows.parquet"),
         str(tmp_path / "predicted.parquet")],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pd.read_parquet(tmp_path / "predicted.parquet")
    expected = 1 / (1 + np.exp(-outputs(result.network, x[:40]).ravel()))
    np.testing.assert_allclose(predicted["score"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_residual_pair_is_not_offered_but_a_plain_pair_beside_it_is(user_networks: str) -> None:
    config = {"architecture": f"{user_networks}:Residual", "params": {"tail": True}}
    network = build_network(config, 5, 1, seed=0)

    assert prunable_layers(network) == [("tail", "head")]
    assert [plan.name for plan in check_amount(network, 0.5)] == ["tail"]


@pytest.mark.parametrize("cls", ["Residual", "Reshaped"], ids=["residual", "reshape"])
def test_a_module_with_nothing_to_prune_is_refused(user_networks: str, cls: str) -> None:
    network = build_network({"architecture": f"{user_networks}:{cls}"}, 5, 1, seed=0)

    with pytest.raises(CompressionError, match="no Linear → activation → Linear chain to prune"):
        prunable_layers(network)
    with pytest.raises(CompressionError) as raised:
        check_amount(network, 0.5)
    assert "built-in mlp architecture" in str(raised.value)


def test_a_module_fx_cannot_trace_names_the_trace_problem(user_networks: str) -> None:
    network = build_network({"architecture": f"{user_networks}:Branchy"}, 5, 1, seed=0)

    with pytest.raises(CompressionError) as raised:
        prunable_layers(network)

    message = str(raised.value)
    assert message.startswith("cannot find prunable layers of Branchy: torch.fx cannot trace it")
    assert "control flow" in raised.value.headline
    assert "if x.sum() > 0" in message  # what cannot be traced, for the user to rewrite


@pytest.mark.parametrize(
    ("amount", "layer", "width", "largest"),
    [(1.0, "layers.0", 8, "0.93"), (0.9, "layers.3", 4, "0.87")],
    ids=["all-units", "small-layer-rounds-to-zero"],
)
def test_an_amount_that_empties_a_layer_is_refused_before_any_training(
    amount: float, layer: str, width: int, largest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = []
    monkeypatch.setattr(pruning, "train_network", lambda *a, **k: trained.append(a))
    network = build_network(mlp_config([8, 4]), 6, 1, seed=0)
    before = weights_sha256(network)
    x = np.zeros((8, 6), np.float32)

    with pytest.raises(CompressionError) as raised:
        prune(network, mlp_config([8, 4]), (x, x[:, 0], x, x[:, 0]), "binary", amount=amount)

    error = raised.value
    assert f"leaves no unit in layer {layer} (width {width})" in error.headline
    assert any(
        line.startswith(f"{layer}: width {width}, amount {amount:g} leaves")
        and "= 0 units" in line
        and line.endswith(f"the largest amount that keeps one is {largest}")
        for line in error.details
    ), error.details
    assert error.details[-1] == "set prune.amount to at most 0.87"
    assert trained == []
    assert weights_sha256(network) == before


def test_fine_tuning_recovers_validation_loss_and_is_reproducible() -> None:
    task, n_outputs, data = table("breast_cancer")
    x_train, _, x_val, y_val = data
    config = mlp_config([64, 32], dropout=0.1)
    network = build_network(config, x_train.shape[1], n_outputs, seed=5)
    settings = {"amount": 0.85, "criterion": "l2", "steps": 2}
    network = train_network(network, *data, train=TRAIN, task=task, progress=False).network

    untuned = prune(network, config, data, task, **settings, finetune_epochs=0)
    tuned = prune(network, config, data, task, **settings, finetune_epochs=3)
    twice = prune(network, config, data, task, **settings, finetune_epochs=3)

    assert untuned.config["hidden"] == tuned.config["hidden"] == [10, 5]
    assert validation_loss(tuned.network, x_val, y_val) < validation_loss(
        untuned.network, x_val, y_val
    )
    assert weights_sha256(tuned.network) == weights_sha256(twice.network)
    assert [row["step"] for row in tuned.history] == [1, 1, 1, 2, 2, 2]
    assert "layers.0: 64 → 25 → 10" in tuned.notes


@pytest.mark.parametrize("name", ["wine", "diabetes"], ids=["multiclass", "regression"])
def test_multiclass_and_regression_networks_prune_and_fine_tune(name: str, tmp_path: Path) -> None:
    task, n_outputs, data = table(name)
    config = mlp_config([32, 16])
    network = build_network(config, data[0].shape[1], n_outputs, seed=6)

    result = prune(network, config, data, task, amount=0.5, steps=2, finetune_epochs=2)

    assert result.config["hidden"] == [16, 8]
    assert len(result.history) == 4
    assert all(np.isfinite(row["val_loss"]) for row in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    predicted = outputs(result.network, data[2])
    assert predicted.shape == (len(data[2]), n_outputs)
    again = rebuilt(result, data[0].shape[1], n_outputs, tmp_path)
    np.testing.assert_array_equal(outputs(again, data[2]), predicted)


@pytest.mark.parametrize(
    ("pruned", "message"),
    [
        ({"encoder": [4, 5]}, "pruned names 'encoder', which is no such submodule"),
        ({"encode": [0, 5]}, "pruned shape of 'encode' must be [out_features, in_features]"),
        ({"encode": [4, 5]}, "forward pass on a (2, 5) batch failed"),
    ],
    ids=["no-such-linear", "bad-shape", "shapes-that-do-not-chain"],
)
def test_a_bad_pruned_entry_is_refused_with_its_name(
    user_networks: str, pruned: dict, message: str
) -> None:
    config = {"architecture": f"{user_networks}:GeluNet", "pruned": pruned}

    with pytest.raises(TrainingError) as raised:
        build_network(config, 5, 1)

    assert message in str(raised.value)


def test_a_config_without_pruned_builds_as_before(user_networks: str) -> None:
    config = {"architecture": f"{user_networks}:GeluNet", "params": {"width": 8}}
    narrowed = {**config, "pruned": {"encode": [3, 5], "hidden": [4, 3]}}

    plain = build_network(config, 5, 1, seed=9)
    shrunk = build_network(narrowed, 5, 1, seed=9)

    assert (plain.encode.out_features, plain.hidden.in_features) == (8, 8)
    assert (shrunk.encode.out_features, shrunk.hidden.in_features) == (3, 3)
    torch.manual_seed(9)
    module = sys.modules[user_networks].GeluNet(n_inputs=5, n_outputs=1, width=8)
    assert weights_sha256(plain) == weights_sha256(module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fine_tuning_on_a_gpu_returns_a_cpu_network() -> None:
    task, n_outputs, data = table("breast_cancer")
    config = mlp_config([64, 32])
    network = build_network(config, data[0].shape[1], n_outputs, seed=7).to("cuda")
    gpu = TRAIN.model_copy(update={"device": "cuda"})

    result = prune_network(
        network, config, settings=PruneSpec(amount=0.5, finetune_epochs=2), train=gpu,
        task=task, x_train=data[0], y_train=data[1], x_val=data[2], y_val=data[3],
        progress=False,
    )  # fmt: skip

    assert {p.device.type for p in result.network.parameters()} == {"cpu"}
    assert result.config["hidden"] == [32, 16]
    assert {p.device.type for p in network.parameters()} == {"cuda"}
