"""The runtime's backends: eager and ONNX Runtime agree, and a module that cannot export
falls back to eager with its reason."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stemma.components.model import onnx_graph
from stemma.components.model.networks import MLP
from stemma.components.model.onnx_graph import PROBE_ATOL, PROBE_RTOL, export_onnx
from stemma.components.runtime.backends import (
    ALLOW_SPINNING,
    OnnxFileError,
    RuntimeBackendError,
    build_runtime,
    session_threads,
    set_threads,
)
from tests.components.runtime.networks import BranchyMLP, ResidualMLP

WIDTH = 40


def seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    for parameter in module.parameters():  # away from the default init, so that norms matter
        parameter.data.normal_(0.0, 0.3)
    return module.eval()


def inputs(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(np.float32)


NETWORKS = {
    "builtin-mlp": lambda: seeded(MLP(WIDTH, hidden=(64, 32))),
    "residual-layernorm-128": lambda: seeded(ResidualMLP(WIDTH)),
}


@pytest.mark.parametrize("make", NETWORKS.values(), ids=NETWORKS.keys())
def test_eager_and_onnxruntime_agree(make, tmp_path: Path):
    network = make()
    report = export_onnx(network, WIDTH, tmp_path / "network.onnx")
    assert report.exported and report.reason is None and len(report.sha256 or "") == 64

    fast = build_runtime(network, width=WIDTH, onnx_file=tmp_path / "network.onnx")
    eager = build_runtime(network, width=WIDTH)
    assert (fast.backend, fast.reason, fast.device) == ("onnxruntime", None, "cpu")
    assert (eager.backend, eager.device) == ("eager", "cpu")

    matrix = inputs(5_000)
    with torch.inference_mode():
        expected = network(torch.from_numpy(matrix)).numpy()
    np.testing.assert_allclose(eager.run(matrix), expected, rtol=0, atol=0)
    np.testing.assert_allclose(fast.run(matrix), expected, rtol=PROBE_RTOL, atol=PROBE_ATOL)
    assert fast.run(matrix).dtype == np.float32
    assert fast.run(matrix[:0]).shape == eager.run(matrix[:0]).shape == (0, 1)


def test_a_module_that_cannot_export_is_served_by_eager_with_the_reason(tmp_path: Path):
    network = seeded(BranchyMLP(WIDTH))
    report = export_onnx(network, WIDTH, tmp_path / "network.onnx")

    assert not report.exported and report.sha256 is None
    assert report.reason is not None and report.reason.startswith("does not export to ONNX")
    assert "data-dependent" in report.reason
    assert not (tmp_path / "network.onnx").exists()
    runtime = build_runtime(network, width=WIDTH, eager_reason=report.reason)
    assert (runtime.backend, runtime.reason) == ("eager", report.reason)
    assert runtime.label.startswith("eager (cpu): does not export to ONNX")
    matrix = inputs(100)
    with torch.inference_mode():
        np.testing.assert_array_equal(runtime.run(matrix), network(torch.from_numpy(matrix)))


def test_a_graph_that_differs_from_eager_is_not_exported(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(onnx_graph, "PROBE_ATOL", -1.0)  # no difference is small enough

    report = export_onnx(seeded(MLP(WIDTH)), WIDTH, tmp_path / "network.onnx")

    assert not report.exported
    assert report.reason and report.reason.startswith("the graph differs from eager")
    assert not (tmp_path / "network.onnx").exists()


def test_export_leaves_the_network_as_it_was(tmp_path: Path, capfd):
    network = MLP(WIDTH).train()
    before = {name: value.clone() for name, value in network.state_dict().items()}

    assert export_onnx(network, WIDTH, tmp_path / "network.onnx").exported
    export_onnx(BranchyMLP(WIDTH), WIDTH, tmp_path / "other.onnx")

    assert network.training
    assert all(torch.equal(before[name], value) for name, value in network.state_dict().items())
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", "the exporter's chatter reached the console"


def test_a_corrupted_onnx_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "network.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf")

    with pytest.raises(OnnxFileError) as raised:
        build_runtime(MLP(WIDTH), width=WIDTH, onnx_file=path)
    assert raised.value.headline == "network.onnx: ONNX Runtime cannot load this file"
    assert str(path) in raised.value.details[0]


def test_an_onnx_file_of_another_width_is_refused(tmp_path: Path):
    export_onnx(MLP(WIDTH + 1), WIDTH + 1, tmp_path / "network.onnx")

    with pytest.raises(OnnxFileError, match=r"does not take a \(rows, 40\) matrix"):
        build_runtime(MLP(WIDTH), width=WIDTH, onnx_file=tmp_path / "network.onnx")


def test_forced_backends(tmp_path: Path):
    network = MLP(WIDTH).eval()
    export_onnx(network, WIDTH, tmp_path / "network.onnx")

    forced = build_runtime(
        network, width=WIDTH, onnx_file=tmp_path / "network.onnx", backend="eager"
    )
    assert (forced.backend, forced.reason) == ("eager", "the eager backend was asked for")
    with pytest.raises(RuntimeBackendError, match="has no ONNX file"):
        build_runtime(network, width=WIDTH, backend="onnxruntime")
    with pytest.raises(RuntimeBackendError, match="unknown runtime backend 'tvm'"):
        build_runtime(network, width=WIDTH, backend="tvm")
    with pytest.raises(ValueError, match=r"takes a \(rows, 40\) matrix"):
        forced.run(np.zeros((3, WIDTH + 2), dtype=np.float32))


def test_the_eager_runtime_does_not_touch_the_callers_network():
    network = MLP(WIDTH, dropout=0.5).train()

    runtime = build_runtime(network, width=WIDTH)

    assert network.training, "the caller's module stays in training mode"
    matrix = inputs(64)
    np.testing.assert_array_equal(runtime.run(matrix), runtime.run(matrix))  # no dropout


def test_runtimes_run_from_many_threads(tmp_path: Path):
    network = seeded(ResidualMLP(WIDTH))
    export_onnx(network, WIDTH, tmp_path / "network.onnx")
    runtimes = [
        build_runtime(network, width=WIDTH),
        build_runtime(network, width=WIDTH, onnx_file=tmp_path / "network.onnx"),
    ]
    matrices = [inputs(1_000, seed) for seed in range(8)]
    expected = [[runtime.run(matrix) for matrix in matrices] for runtime in runtimes]
    results: dict[tuple[int, int], np.ndarray] = {}

    def work(which: int, index: int) -> None:
        results[which, index] = runtimes[which].run(matrices[index])

    threads = [
        threading.Thread(target=work, args=(which, index))
        for which in range(2)
        for index in range(len(matrices))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (which, index), found in results.items():
        np.testing.assert_array_equal(found, expected[which][index])


def test_set_threads_sets_torch_and_new_sessions(tmp_path: Path):
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert session_threads() == 1
        export_onnx(MLP(WIDTH), WIDTH, tmp_path / "network.onnx")
        runtime = build_runtime(MLP(WIDTH), width=WIDTH, onnx_file=tmp_path / "network.onnx")
        assert runtime.run(inputs(10)).shape == (10, 1)
        options = runtime.session.get_session_options()
        assert options.intra_op_num_threads == 1
        # idle threads sleep: spinning ones would take the cores of Stemma's own threads
        assert options.get_session_config_entry(ALLOW_SPINNING) == "0"
        with pytest.raises(ValueError, match="must be positive"):
            set_threads(0)
    finally:
        set_threads(before)
    assert torch.get_num_threads() == before == session_threads()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeBackendError, match="no GPU is available"):
        build_runtime(MLP(WIDTH), width=WIDTH, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_runtime_matches_the_cpu(tmp_path: Path):
    network = seeded(ResidualMLP(WIDTH))
    export_onnx(network, WIDTH, tmp_path / "network.onnx")
    runtime = build_runtime(
        network, width=WIDTH, onnx_file=tmp_path / "network.onnx", device="cuda"
    )
    matrix = inputs(2_000)

    assert runtime.device == "cuda"
    assert next(network.parameters()).device.type == "cpu", "the caller's network stays put"
    np.testing.assert_allclose(
        runtime.run(matrix), build_runtime(network, width=WIDTH).run(matrix), rtol=1e-3, atol=1e-3
    )
