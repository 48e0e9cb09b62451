"""The network alone: ONNX Runtime against eager torch at 65,536-row batches.

Run with `.venv/bin/python -m pytest tests/benchmarks/bench_runtime.py -m benchmark -s`.

Two networks with seeded weights: a credit-like MLP (40 inputs, hidden 64 and 32, one
output) and the tests' residual MLP with LayerNorm (128 wide). Each round hands the same
65,536-row batch to plain eager torch (``network(batch)`` under ``inference_mode``), to
the runtime's ONNX Runtime backend and to its eager backend (both of which split it into
cache-sized pieces), on the same thread count (``STEMMA_BENCH_THREADS``, default 1: one
scoring worker), in an order that rotates so that load from other processes hits all
alike. Printed: the median time of each and the median of the per-round ratios (above 1:
ONNX Runtime is faster); the target is against plain eager torch.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from stemma.components.model.networks import MLP
from stemma.components.model.onnx_graph import export_onnx
from stemma.components.runtime.backends import build_runtime, set_threads
from tests.components.runtime.networks import ResidualMLP

pytestmark = pytest.mark.benchmark

ROWS = 65_536
WIDTH = 40
ROUNDS = 15
CALLS_PER_ROUND = 3
#: What the issue asks of ONNX Runtime against eager, per network.
TARGETS = {"credit-mlp-40-64-32-1": 1.3, "residual-layernorm-128": 1.5}
NETWORKS: dict[str, Callable[[], torch.nn.Module]] = {
    "credit-mlp-40-64-32-1": lambda: MLP(WIDTH, hidden=(64, 32), dropout=0.1),
    "residual-layernorm-128": lambda: ResidualMLP(WIDTH),
}


def timed(run: Callable[[np.ndarray], object], matrix: np.ndarray) -> float:
    """The median seconds of a few calls."""
    seconds = []
    for _ in range(CALLS_PER_ROUND):
        start = time.perf_counter()
        run(matrix)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def plain_eager(network: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(matrix: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(matrix)).numpy()

    return run


@pytest.mark.parametrize("name", NETWORKS, ids=NETWORKS)
def test_onnxruntime_against_eager(name: str, tmp_path: Path):
    set_threads(int(os.environ.get("STEMMA_BENCH_THREADS", "1")))
    torch.manual_seed(0)
    network = NETWORKS[name]().eval()
    report = export_onnx(network, WIDTH, tmp_path / "network.onnx")
    assert report.exported, report.reason
    eager = build_runtime(network, width=WIDTH)
    fast = build_runtime(network, width=WIDTH, onnx_file=tmp_path / "network.onnx")
    matrix = np.random.default_rng(1).standard_normal((ROWS, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(fast.run(matrix), eager.run(matrix), rtol=1e-3, atol=1e-4)

    runners = {"torch": plain_eager(network), "onnxruntime": fast.run, "eager runtime": eager.run}
    seconds: dict[str, list[float]] = {key: [] for key in runners}
    for round_number in range(ROUNDS):
        order = list(runners)
        order = order[round_number % 3 :] + order[: round_number % 3]
        for key in order:
            seconds[key].append(timed(runners[key], matrix))
    ratios = [
        torch_s / fast_s
        for torch_s, fast_s in zip(seconds["torch"], seconds["onnxruntime"], strict=True)
    ]
    runtime_ratios = [
        eager_s / fast_s
        for eager_s, fast_s in zip(seconds["eager runtime"], seconds["onnxruntime"], strict=True)
    ]
    ratio = statistics.median(ratios)
    times = ", ".join(
        f"{key} {statistics.median(value) * 1e3:.2f} ms" for key, value in seconds.items()
    )
    print(
        f"\n{name}: {ROWS} rows, {torch.get_num_threads()} thread(s), {ROUNDS} rounds: {times}; "
        f"onnxruntime / torch {ratio:.2f}x (target >= {TARGETS[name]}x, rounds "
        f"{min(ratios):.2f}-{max(ratios):.2f}); onnxruntime / eager runtime "
        f"{statistics.median(runtime_ratios):.2f}x"
    )
