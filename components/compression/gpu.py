"""The GPU's rows of a comparison: what a version would cost and how fast it would be on a
GPU, with fp16 and bf16 and ONNX Runtime's CUDA execution provider.

With a CUDA GPU present, the parent is run and probed on it as fp32 eager, as fp32 on
ONNX Runtime's CUDA execution provider (when this ONNX Runtime build has it), and cast to
fp16 and bf16 (bf16 where the GPU supports it), each through the model runtime, on the
same held-out rows and the same probe as the CPU rows; the metric and its drop show what
the cast costs in quality, and the price is that of the spec's first machine kind with a
GPU (wall-clock time: the GPU is held while it runs). These casts are not registered:
``stemma run quantize`` builds and gates ``fp16``/``bf16`` variants for serving. Without a
GPU there are no rows, and a note says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stemma.components.model.preprocessing import Preprocessor
from stemma.components.model.quantized import FLOAT_METHODS, QuantizedNetwork, brief
from stemma.components.quantization.measure import parent_runtimes, scores
from stemma.components.runtime.backends import (
    Runtime,
    build_runtime,
    cuda_provider_available,
    load_onnx_runtime,
)
from stemma.components.runtime.probe import LatencyProfile, probe_runtimes
from stemma.components.spec import METRIC_DIRECTIONS
from stemma.components.spec.compress import CostSpec, MachineSpec

#: Label of the fp32 network run eager on the GPU.
FP32_EAGER = "fp32 eager (cuda)"
#: Label of the fp32 graph on ONNX Runtime's CUDA execution provider.
FP32_ORT = "fp32 onnxruntime (cuda)"


@dataclass(frozen=True)
class GpuFigures:
    """One way of running the parent on the GPU, and its figures."""

    label: str
    backend: str
    value: float
    metric_drop: float
    profile: LatencyProfile
    machine: str | None
    cost_per_million: float | None

    def row(self, metric: str) -> dict[str, object]:
        """The figures as one row of the comparison's table."""
        row: dict[str, object] = {
            "model": self.label,
            "backend": self.backend,
            metric: self.value,
            "metric_drop": self.metric_drop,
        }
        row.update(self.profile.percentiles())
        row.update(
            rows_per_s=self.profile.rows_per_s,
            machine=self.machine,
            cost_per_million=self.cost_per_million,
        )
        return row


def gpu_machine(cost: CostSpec) -> tuple[str, MachineSpec] | None:
    """The spec's first machine kind with a GPU (by name), or None."""
    for name, machine in sorted(cost.machines.items()):
        if machine.gpu:
            return name, machine
    return None


def gpu_runtimes(
    network: nn.Module, width: int, folder: Path
) -> tuple[dict[str, Runtime], list[str]]:
    """The parent on the GPU: fp32 eager, fp32 on ONNX Runtime's CUDA provider, and fp16
    and bf16 casts run eager; with a note for each that cannot run here."""
    notes: list[str] = []
    runtimes: dict[str, Runtime] = {
        FP32_EAGER: build_runtime(network, width=width, device="cuda", backend="eager")
    }
    folder.mkdir(parents=True, exist_ok=True)
    _, graph, reason = parent_runtimes(network, width, folder)
    if graph is None:
        notes.append(f"no ONNX Runtime row on the GPU: {reason}")
    elif not cuda_provider_available():
        notes.append("no ONNX Runtime row on the GPU: this build has no CUDA execution provider")
    else:
        runtimes[FP32_ORT] = load_onnx_runtime(graph, width=width, device="cuda")
    for method, dtype in FLOAT_METHODS.items():
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            notes.append("no bf16 row: this GPU does not support bfloat16")
            continue
        cast = QuantizedNetwork(copy.deepcopy(network).to(dtype), method)
        runtimes[f"{method} eager (cuda)"] = build_runtime(
            cast, width=width, device="cuda", backend="eager"
        )
    return runtimes, notes


def gpu_comparison(
    network: nn.Module,
    preprocessor: Preprocessor,
    *,
    x: np.ndarray,
    y: np.ndarray,
    metric: str,
    threshold: float,
    cost: CostSpec,
    folder: Path,
) -> tuple[list[GpuFigures], list[str]]:
    """The parent's GPU rows (see the module docstring), or none and why.

    Returns:
        The figures of every way that ran, and notes on those that could not.
    """
    from stemma.components.training.metrics import evaluate_scores

    if not torch.cuda.is_available():
        return [], ["no GPU here: the comparison has CPU rows only"]
    task = preprocessor.task
    try:
        runtimes, notes = gpu_runtimes(network, x.shape[1], folder)
        probed = probe_runtimes(runtimes, x)
    except Exception as error:  # a broken CUDA setup must not lose the CPU comparison
        return [], [f"the GPU rows could not be measured: {brief(error)}"]
    priced = gpu_machine(cost)
    if priced is None:
        notes.append("no machine kind in cost.machines has gpu: true; the GPU rows are not priced")
    values = {
        label: float(evaluate_scores(task, y, scores(runtime, x, preprocessor), threshold)[metric])
        for label, runtime in runtimes.items()
    }
    reference = values[FP32_EAGER]
    higher = METRIC_DIRECTIONS[task][metric]
    figures = [
        GpuFigures(
            label=label,
            backend=runtime.backend,
            value=values[label],
            metric_drop=(reference - values[label]) if higher else (values[label] - reference),
            profile=probed[label],
            machine=priced[0] if priced else None,
            cost_per_million=probed[label].cost_per_million(priced[1]) if priced else None,
        )
        for label, runtime in runtimes.items()
    ]
    return figures, notes
