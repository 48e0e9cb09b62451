"""The training loop: determinism, a real kill-and-resume, early stopping, errors, weights."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stemma.components.errors import TrainingError
from stemma.components.model.artifact import load_weights, save_weights, weights_sha256
from stemma.components.model.networks import MLP, NetworkImportError, build_network
from stemma.components.spec import EarlyStoppingSpec, TrainSpec
from stemma.components.training.loop import (
    CHECKPOINT_NAME,
    predict_raw,
    resolve_device,
    train_network,
)

INPUTS = 8
MLP_CONFIG = {"architecture": "mlp", "hidden": [16, 8], "dropout": 0.1}
no_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks behaviour on a machine without CUDA"
)
#: The CUDA paths: skipped where there is no GPU (CI), run on a GPU machine.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _spec(**changes) -> TrainSpec:
    settings = {
        "epochs": 4,
        "batch_size": 64,
        "learning_rate": 0.01,
        "seed": 3,
        "device": "cpu",
        "precision": "fp32",
        "early_stopping": None,
    }
    return TrainSpec(**{**settings, **changes})


def _binary_data(rows: int = 2_000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A learnable problem: the label is a noisy linear function of the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, INPUTS)).astype(np.float32)
    y = (x @ rng.standard_normal(INPUTS) + 0.5 * rng.standard_normal(rows) > 0).astype(np.float32)
    cut = rows * 4 // 5
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _train(network: nn.Module, data: tuple[np.ndarray, ...], spec: TrainSpec, **options):
    return train_network(
        network, *data, train=spec, task=options.pop("task", "binary"), progress=False, **options
    )


def _bce(network: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    logits = torch.from_numpy(predict_raw(network, x))
    return float(
        nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).reshape(-1, 1))
    )


# ---------------------------------------------------------------------------------------
# Determinism and what a run returns


def test_training_is_deterministic_and_leaves_its_inputs_alone() -> None:
    data = _binary_data()
    network = build_network(MLP_CONFIG, INPUTS, seed=1)
    initial = weights_sha256(network)
    rng_state = torch.random.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()

    first = _train(network, data, _spec())
    second = _train(network, data, _spec())
    other_seed = _train(network, data, _spec(seed=4))

    assert weights_sha256(first.network) == weights_sha256(second.network)
    assert [row["val_loss"] for row in first.history] == [row["val_loss"] for row in second.history]
    assert weights_sha256(other_seed.network) != weights_sha256(first.network)
    assert weights_sha256(network) == initial, "the caller's network must not be trained in place"
    assert torch.equal(torch.random.get_rng_state(), rng_state), (
        "the global RNG must be left as it was"
    )
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_training_learns_and_reports_every_epoch() -> None:
    data = _binary_data()
    rows: list[dict] = []
    result = _train(build_network(MLP_CONFIG, INPUTS, seed=1), data, _spec(), on_epoch=rows.append)

    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert rows == result.history
    assert set(result.history[0]) == {
        "epoch",
        "train_loss",
        "val_loss",
        "seconds",
        "samples_per_second",
    }
    assert result.history[-1]["val_loss"] < 0.5 * result.history[0]["val_loss"]
    assert all(row["samples_per_second"] > 0 for row in result.history)
    # Without early stopping the last epoch's weights are kept, and its loss is what we measure.
    assert result.best_epoch == 4 and not result.stopped_early
    assert _bce(result.network, data[2], data[3]) == pytest.approx(
        result.history[-1]["val_loss"], rel=1e-5
    )
    assert (result.device, result.precision, result.resumed_from_epoch) == ("cpu", "fp32", None)
    assert not result.network.training
    assert all(p.device.type == "cpu" for p in result.network.parameters())


def test_regression_minimises_squared_error() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1_500, INPUTS)).astype(np.float32)
    y = (x[:, 0] * 2 - x[:, 1] + 0.1 * rng.standard_normal(1_500)).astype(np.float32)
    y = (y - y.mean()) / y.std()
    data = (x[:1_200], y[:1_200], x[1_200:], y[1_200:])

    result = _train(
        build_network(MLP_CONFIG, INPUTS, seed=1), data, _spec(epochs=6), task="regression"
    )

    predictions = predict_raw(result.network, data[2])[:, 0]
    mse = float(np.mean((predictions - data[3]) ** 2))
    assert mse == pytest.approx(result.history[-1]["val_loss"], rel=1e-4)
    assert mse < 0.1  # the standardised target has variance 1


def test_bf16_autocast_trains_on_the_cpu() -> None:
    result = _train(
        build_network(MLP_CONFIG, INPUTS, seed=1), _binary_data(), _spec(precision="bf16", epochs=2)
    )

    assert result.precision == "bf16"
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


@pytest.mark.parametrize(
    ("progress", "shown"),
    [(True, True), (False, False), (None, False)],
    ids=["on", "off", "auto-not-a-tty"],
)
def test_progress_bar_goes_to_stderr_when_asked(capsys, progress: bool | None, shown: bool) -> None:
    train_network(
        build_network(MLP_CONFIG, INPUTS, seed=1),
        *_binary_data(400),
        train=_spec(epochs=2),
        task="binary",
        progress=progress,
    )

    err = capsys.readouterr().err
    assert ("val_loss=" in err and "2/2" in err) == shown


# ---------------------------------------------------------------------------------------
# Early stopping


def test_early_stopping_stops_and_keeps_the_best_epoch() -> None:
    # Labels independent of the inputs: the network can only memorise, so the validation
    # loss turns up after a few epochs.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, INPUTS)).astype(np.float32)
    y = rng.integers(0, 2, 600).astype(np.float32)
    data = (x[:300], y[:300], x[300:], y[300:])
    network = build_network(
        {"architecture": "mlp", "hidden": [64, 64], "dropout": 0.0}, INPUTS, seed=0
    )
    spec = _spec(epochs=60, batch_size=32, early_stopping=EarlyStoppingSpec(patience=3))

    result = _train(network, data, spec)

    losses = [row["val_loss"] for row in result.history]
    assert result.stopped_early
    assert len(losses) == result.best_epoch + 3 < 60
    assert losses[result.best_epoch - 1] == min(losses)
    kept = _bce(result.network, x[300:], y[300:])
    assert kept == pytest.approx(losses[result.best_epoch - 1], rel=1e-5)
    assert kept != pytest.approx(losses[-1], rel=1e-5)


def test_min_delta_counts_small_improvements_as_none() -> None:
    data = _binary_data()
    spec = _spec(epochs=8, early_stopping=EarlyStoppingSpec(patience=1, min_delta=10.0))

    result = _train(build_network(MLP_CONFIG, INPUTS, seed=1), data, spec)

    # Only the first epoch improves on "no loss yet" by more than 10.
    assert (result.best_epoch, len(result.history), result.stopped_early) == (1, 2, True)


# ---------------------------------------------------------------------------------------
# Checkpoints and resuming

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import numpy as np
    import torch

    torch.set_num_threads(int(sys.argv[2]))
    from stemma.components.model.networks import build_network
    from stemma.components.spec import TrainSpec
    from stemma.components.training.loop import train_network

    folder = Path(sys.argv[1])
    data = np.load(folder / "data.npz")
    spec = TrainSpec.model_validate_json((folder / "train.json").read_text())
    network = build_network(json.loads((folder / "network.json").read_text()), data["x_train"].shape[1], seed=1)
    train_network(
        network, data["x_train"], data["y_train"], data["x_val"], data["y_val"], train=spec, task="binary",
        checkpoint_dir=folder / "checkpoints", on_epoch=lambda row: time.sleep(0.5), progress=False,
    )
    """
)


def _checkpoint_epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def test_a_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data = _binary_data()
    spec = _spec(epochs=6, early_stopping=EarlyStoppingSpec(patience=10))
    np.savez(tmp_path / "data.npz", x_train=data[0], y_train=data[1], x_val=data[2], y_val=data[3])
    (tmp_path / "train.json").write_text(spec.model_dump_json())
    (tmp_path / "network.json").write_text(json.dumps(MLP_CONFIG))
    (tmp_path / "child.py").write_text(_CHILD)
    checkpoint = tmp_path / "checkpoints" / CHECKPOINT_NAME

    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py"), str(tmp_path), str(torch.get_num_threads())],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while child.poll() is None and time.monotonic() < deadline:
            if checkpoint.exists() and _checkpoint_epoch(checkpoint) >= 2:
                child.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
        _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, (
        f"the child ended on its own: {stderr.decode()[-2000:]}"
    )
    killed_at = _checkpoint_epoch(checkpoint)
    assert 2 <= killed_at < spec.epochs

    network = build_network(MLP_CONFIG, INPUTS, seed=1)
    resumed_rows: list[dict] = []
    resumed = _train(
        network, data, spec, checkpoint_dir=checkpoint.parent, on_epoch=resumed_rows.append
    )
    uninterrupted = _train(network, data, spec)

    assert resumed.resumed_from_epoch == killed_at
    assert [row["epoch"] for row in resumed_rows] == list(range(killed_at + 1, spec.epochs + 1))
    assert weights_sha256(resumed.network) == weights_sha256(uninterrupted.network)
    assert [row["val_loss"] for row in resumed.history] == [
        row["val_loss"] for row in uninterrupted.history
    ]
    assert resumed.best_epoch == uninterrupted.best_epoch


def test_a_finished_checkpoint_returns_the_same_result_without_training(tmp_path: Path) -> None:
    data = _binary_data(600)
    spec = _spec(epochs=3, early_stopping=EarlyStoppingSpec(patience=1))
    network = build_network(MLP_CONFIG, INPUTS, seed=1)
    first = _train(network, data, spec, checkpoint_dir=tmp_path)

    calls: list[dict] = []
    again = _train(network, data, spec, checkpoint_dir=tmp_path, on_epoch=calls.append)

    assert again.resumed_from_epoch == len(first.history)
    assert calls == []
    assert weights_sha256(again.network) == weights_sha256(first.network)
    assert (again.best_epoch, again.stopped_early, again.history) == (
        first.best_epoch,
        first.stopped_early,
        first.history,
    )


@pytest.mark.parametrize(
    ("network_config", "changes", "message"),
    [
        (
            {"architecture": "mlp", "hidden": [32], "dropout": 0.1},
            {},
            "network of a different shape",
        ),
        (MLP_CONFIG, {"learning_rate": 0.5}, "learning_rate: checkpoint 0.01, now 0.5"),
        (MLP_CONFIG, {"batch_size": 32}, "batch_size: checkpoint 64, now 32"),
    ],
    ids=["other-shape", "other-learning-rate", "other-batch-size"],
)
def test_a_foreign_checkpoint_is_refused(
    tmp_path: Path, network_config: dict, changes: dict, message: str
) -> None:
    data = _binary_data(600)
    _train(
        build_network(MLP_CONFIG, INPUTS, seed=1), data, _spec(epochs=1), checkpoint_dir=tmp_path
    )

    with pytest.raises(TrainingError, match=message) as caught:
        _train(
            build_network(network_config, INPUTS, seed=1),
            data,
            _spec(epochs=2, **changes),
            checkpoint_dir=tmp_path,
        )
    assert f"delete {tmp_path} to start training from scratch" in str(caught.value)


def test_more_epochs_continue_a_finished_checkpoint(tmp_path: Path) -> None:
    data = _binary_data(600)
    network = build_network(MLP_CONFIG, INPUTS, seed=1)
    _train(network, data, _spec(epochs=2), checkpoint_dir=tmp_path)

    extended = _train(network, data, _spec(epochs=4), checkpoint_dir=tmp_path)

    assert extended.resumed_from_epoch == 2
    assert weights_sha256(extended.network) == weights_sha256(
        _train(network, data, _spec(epochs=4)).network
    )


def test_a_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")

    with pytest.raises(TrainingError, match="cannot read the checkpoint"):
        _train(
            build_network(MLP_CONFIG, INPUTS, seed=1),
            _binary_data(600),
            _spec(),
            checkpoint_dir=tmp_path,
        )


# ---------------------------------------------------------------------------------------
# Errors


def test_a_diverging_run_names_the_epoch_and_the_learning_rate() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, INPUTS)).astype(np.float32)
    y = (x.sum(axis=1) * 10).astype(np.float32)
    spec = _spec(optimizer="sgd", learning_rate=10.0)

    with pytest.raises(TrainingError, match=r"diverged at epoch 1") as caught:
        _train(build_network(MLP_CONFIG, INPUTS, seed=1), (x, y, x, y), spec, task="regression")
    assert "lower train.learning_rate (now 10.0)" in caught.value.details


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d[0], d[1], d[2][:0], d[3][:0]), "the validation split has no rows"),
        (
            lambda d: (d[0], d[1][:-1], d[2], d[3]),
            "training inputs have 1600 rows but targets 1599",
        ),
        (
            lambda d: (np.where(np.arange(len(d[0]))[:, None] == 3, np.inf, d[0]), *d[1:]),
            "training inputs hold 8",
        ),
        (lambda d: (d[0], d[1], d[2][:, :4], d[3]), "differ in width: 8 vs 4"),
    ],
    ids=["empty-validation", "length-mismatch", "infinite-inputs", "width-mismatch"],
)
def test_unusable_arrays_are_refused(change, message: str) -> None:
    with pytest.raises(TrainingError, match=message):
        _train(build_network(MLP_CONFIG, INPUTS, seed=1), change(_binary_data()), _spec())


@no_cuda
def test_cuda_requested_without_a_gpu_is_an_error() -> None:
    with pytest.raises(
        TrainingError, match=r"train\.device is cuda, but PyTorch sees no CUDA device"
    ) as caught:
        _train(build_network(MLP_CONFIG, INPUTS, seed=1), _binary_data(200), _spec(device="cuda"))
    assert "set train.device to auto (uses a GPU when there is one) or cpu" in caught.value.details


@no_cuda
@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("auto", "auto", ("cpu", None)),
        ("cpu", "auto", ("cpu", None)),
        ("auto", "fp32", ("cpu", None)),
        ("cpu", "bf16", ("cpu", torch.bfloat16)),
    ],
    ids=["auto", "cpu", "fp32", "bf16-on-cpu"],
)
def test_resolve_device_without_a_gpu(device: str, precision: str, expected: tuple) -> None:
    chosen, dtype = resolve_device(device, precision)
    assert (chosen.type, dtype) == expected


@needs_cuda
@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("auto", "auto", ("cuda", torch.bfloat16)),
        ("cuda", "fp32", ("cuda", None)),
        ("cpu", "auto", ("cpu", None)),
    ],
    ids=["auto", "cuda-fp32", "cpu"],
)
def test_resolve_device_with_a_gpu(device: str, precision: str, expected: tuple) -> None:
    chosen, dtype = resolve_device(device, precision)
    assert (chosen.type, dtype) == expected


@needs_cuda
def test_auto_trains_on_the_gpu_in_bf16_and_returns_a_cpu_network() -> None:
    """``device: auto`` with ``precision: auto`` trains on the GPU under bf16 autocast; the
    network comes back on the CPU in fp32 and learns what CPU training learns."""
    data = _binary_data()
    network = build_network(MLP_CONFIG, INPUTS, seed=1)

    gpu = _train(network, data, _spec(device="auto", precision="auto"))
    cpu = _train(network, data, _spec())

    assert (gpu.device, gpu.precision) == ("cuda", "bf16")
    assert all(
        p.device.type == "cpu" and p.dtype == torch.float32 for p in gpu.network.parameters()
    )
    assert not gpu.network.training
    assert gpu.history[-1]["val_loss"] < gpu.history[0]["val_loss"]
    # bf16 rounds the forward pass differently, and dropout draws its masks from the GPU's
    # generator; the loss it reaches is about the same.
    assert gpu.history[-1]["val_loss"] == pytest.approx(cpu.history[-1]["val_loss"], abs=0.05)
    # The history's loss (bf16 on the GPU) is the returned network's loss (fp32, CPU), to
    # bf16's precision.
    assert _bce(gpu.network, data[2], data[3]) == pytest.approx(
        gpu.history[-1]["val_loss"], rel=0.05
    )
    assert weights_sha256(gpu.network) != weights_sha256(cpu.network)


@needs_cuda
def test_fp32_on_the_gpu_agrees_with_the_cpu() -> None:
    """Without dropout (whose masks come from the device's own generator), fp32 training
    on the GPU follows the CPU's to float rounding: the batch order is drawn on the CPU."""
    data = _binary_data()
    network = build_network({**MLP_CONFIG, "dropout": 0.0}, INPUTS, seed=1)

    gpu = _train(network, data, _spec(device="cuda", precision="fp32"))
    cpu = _train(network, data, _spec())

    assert (gpu.device, gpu.precision) == ("cuda", "fp32")
    assert [row["val_loss"] for row in gpu.history] == pytest.approx(
        [row["val_loss"] for row in cpu.history], rel=1e-4
    )
    for (name, ours), theirs in zip(
        gpu.network.state_dict().items(), cpu.network.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4, msg=name)


@needs_cuda
def test_a_gpu_checkpoint_is_resumed_from(tmp_path: Path) -> None:
    """A checkpoint written by GPU training loads back (onto the GPU) and, finished, gives
    the same network without training again."""
    data = _binary_data()
    network = build_network(MLP_CONFIG, INPUTS, seed=1)
    spec = _spec(device="auto", precision="auto")

    first = _train(network, data, spec, checkpoint_dir=tmp_path)
    calls: list[dict] = []
    again = _train(network, data, spec, checkpoint_dir=tmp_path, on_epoch=calls.append)

    assert calls == [] and again.resumed_from_epoch == 4
    assert weights_sha256(again.network) == weights_sha256(first.network)
    assert again.device == "cuda"


# ---------------------------------------------------------------------------------------
# Custom architectures by import path


@pytest.fixture
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of user networks on sys.path, under a name no other test uses."""
    name = f"user_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Tiny(nn.Module):
                def __init__(self, n_inputs, n_outputs, width=4):
                    super().__init__()
                    self.width = width
                    self.body = nn.Sequential(nn.Linear(n_inputs, width), nn.Tanh(), nn.Linear(width, n_outputs))

                def forward(self, x):
                    return self.body(x)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_custom_architecture_trains_by_import_path(custom_module: str) -> None:
    config = {
        "architecture": f"{custom_module}:Tiny",
        "hidden": [64],
        "dropout": 0.5,
        "params": {"width": 6},
    }
    network = build_network(config, INPUTS, seed=1)

    result = _train(network, _binary_data(), _spec())

    assert type(result.network).__name__ == "Tiny" and result.network.width == 6
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_a_bad_import_path_is_a_network_import_error() -> None:
    with pytest.raises(
        NetworkImportError,
        match=r"model.architecture no_such_package\.nets:Net: cannot import class 'Net' from module",
    ):
        build_network({"architecture": "no_such_package.nets:Net"}, INPUTS)


# ---------------------------------------------------------------------------------------
# Predictions and weights


def test_predict_raw_matches_the_network_in_any_chunk_size() -> None:
    network = MLP(INPUTS, hidden=(8,), dropout=0.5)
    x = np.random.default_rng(0).standard_normal((1_000, INPUTS)).astype(np.float32)

    whole = predict_raw(network, x)
    chunked = predict_raw(network, x, batch_size=7)

    network.eval()
    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()
    assert whole.shape == (1_000, 1) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked, expected, rtol=1e-5, atol=1e-6)
    assert predict_raw(network, x[:0]).shape == (0, 1)


def test_predict_raw_restores_training_mode() -> None:
    network = MLP(INPUTS)
    network.train()
    predict_raw(network, np.zeros((3, INPUTS), dtype=np.float32))
    assert network.training


def test_weights_round_trip_through_safetensors(tmp_path: Path) -> None:
    network = build_network(MLP_CONFIG, INPUTS, seed=1)
    path = tmp_path / "weights" / "model.safetensors"

    digest = save_weights(network, path)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == weights_sha256(network)
    fresh = build_network(MLP_CONFIG, INPUTS, seed=2)
    assert weights_sha256(fresh) != digest
    assert weights_sha256(load_weights(fresh, path)) == digest
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(build_network(MLP_CONFIG, INPUTS), path)

    with pytest.raises(TrainingError, match="the weights do not fit this network"):
        load_weights(MLP(INPUTS, hidden=(4,)), path)
    with pytest.raises(TrainingError, match="no such weights file"):
        load_weights(MLP(INPUTS), tmp_path / "missing.safetensors")


def test_a_network_with_the_wrong_number_of_outputs_is_refused() -> None:
    with pytest.raises(
        TrainingError, match=r"outputs shape \(2, 3\) for 2 rows, but the targets have 1"
    ):
        _train(MLP(INPUTS, n_outputs=3), _binary_data(200), _spec())
