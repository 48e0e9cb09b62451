"""The one model runtime: every inference in Stemma runs a network through a :class:`Runtime`.

Two backends: plain PyTorch eager under ``torch.inference_mode`` (any ``nn.Module``), and
ONNX Runtime on the network's exported graph (``network.onnx``, see
:mod:`stemma.components.model.onnx_graph`), with the CUDA execution provider first on a GPU.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stemma.components.errors import StemmaError

#: Backend names a caller may ask for.
BACKENDS = ("auto", "eager", "onnxruntime")
#: Rows run at once on the CPU: small enough for the activations to stay in cache, large
#: enough to amortise each call. On a GPU, larger batches fill the device better.
CPU_BATCH_ROWS = 8_192
GPU_BATCH_ROWS = 65_536

_CUDA_PROVIDER = "CUDAExecutionProvider"
_CPU_PROVIDER = "CPUExecutionProvider"
#: ONNX Runtime's session setting for whether idle intra-op threads spin.
ALLOW_SPINNING = "session.intra_op.allow_spinning"
#: Intra-op threads of ONNX Runtime sessions built from now on (None: torch's count).
_session_threads: int | None = None


class RuntimeBackendError(StemmaError):
    """A runtime cannot be built as asked (unknown backend, no usable ONNX file, no GPU)."""


class OnnxFileError(RuntimeBackendError):
    """A model's ONNX file exists but ONNX Runtime cannot load it, or it does not fit."""


class Runtime(ABC):
    """A network ready to run: ``run(matrix)`` gives its raw outputs.

    Attributes:
        backend: ``"onnxruntime"`` or ``"eager"``.
        reason: why eager was chosen when ONNX Runtime was possible, else None.
        device: ``"cpu"`` or ``"cuda"``.
        width: the number of input columns the network takes.
    """

    backend: str
    reason: str | None
    device: str
    width: int

    @property
    def label(self) -> str:
        """``onnxruntime (cpu)``, or ``eager (cpu): <reason>``, for summaries and logs."""
        text = f"{self.backend} ({self.device})"
        return f"{text}: {self.reason}" if self.reason else text

    def run(self, matrix: np.ndarray) -> np.ndarray:
        """The network's raw outputs for a float32 ``(rows, width)`` matrix, as float32.

        Safe to call from several threads at once.

        Raises:
            ValueError: the matrix is not two-dimensional with ``width`` columns.
        """
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.width:
            raise ValueError(
                f"the network takes a (rows, {self.width}) matrix, got shape {matrix.shape}"
            )
        rows = CPU_BATCH_ROWS if self.device == "cpu" else GPU_BATCH_ROWS
        if len(matrix) <= rows:
            return self._run(matrix)
        return np.concatenate(
            [self._run(matrix[start : start + rows]) for start in range(0, len(matrix), rows)]
        )

    @abstractmethod
    def _run(self, matrix: np.ndarray) -> np.ndarray: ...


class EagerRuntime(Runtime):
    """PyTorch eager under ``torch.inference_mode``, for any module."""

    backend = "eager"

    def __init__(self, network: nn.Module, *, width: int, device: str, reason: str | None):
        if network.training or device != "cpu":  # a private copy: the caller's stays as it is
            network = copy.deepcopy(network).eval().to(device)
        self.network = network
        self.width = width
        self.device = device
        self.reason = reason

    def _run(self, matrix: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inputs = torch.from_numpy(matrix).to(self.device)
            return self.network(inputs).float().cpu().numpy()


class OnnxRuntimeBackend(Runtime):
    """ONNX Runtime on the network's exported graph."""

    backend = "onnxruntime"
    reason = None

    def __init__(self, session: Any, *, width: int, device: str):
        self.session = session
        self.width = width
        self.device = device
        self._input = session.get_inputs()[0].name

    def _run(self, matrix: np.ndarray) -> np.ndarray:
        if len(matrix) == 0:  # ONNX Runtime refuses some empty inputs: shape from one row
            return self._run(np.zeros((1, self.width), dtype=np.float32))[:0]
        (outputs, *_) = self.session.run(None, {self._input: matrix})
        return np.asarray(outputs, dtype=np.float32)


def set_threads(count: int | None = None) -> None:
    """Set the intra-op threads of torch and of ONNX Runtime sessions built from now on.

    Call it once per process or worker, before building runtimes; it is never saved and
    restored around a call.

    Args:
        count: threads per inference; None keeps torch's count and gives sessions the same.
    """
    global _session_threads
    if count is not None:
        if count < 1:
            raise ValueError(f"thread count must be positive, got {count}")
        torch.set_num_threads(count)
    _session_threads = count


def session_threads() -> int:
    """The intra-op thread count an ONNX Runtime session gets."""
    return _session_threads or torch.get_num_threads()


def cuda_provider_available() -> bool:
    """Whether this ONNX Runtime build can run on a GPU (``onnxruntime-gpu``)."""
    import onnxruntime

    return _CUDA_PROVIDER in onnxruntime.get_available_providers()


def build_runtime(
    network: nn.Module,
    *,
    width: int,
    onnx_file: Path | None = None,
    device: str = "cpu",
    backend: str = "auto",
    eager_reason: str | None = None,
) -> Runtime:
    """The runtime a network is served by.

    ``auto`` takes ONNX Runtime when ``onnx_file`` is given (and, on ``cuda``, when ONNX
    Runtime has its CUDA execution provider), else eager; ``eager`` and ``onnxruntime``
    force one.

    Args:
        network: the network, used by the eager backend (never modified).
        width: the number of input columns.
        onnx_file: the network's exported graph, already verified by the caller.
        device: ``cpu`` or ``cuda``.
        backend: ``auto``, ``eager`` or ``onnxruntime``.
        eager_reason: why there is no ``onnx_file`` (recorded as the eager runtime's reason).

    Raises:
        RuntimeBackendError: an unknown backend or device, ``cuda`` without a GPU, or
            ``onnxruntime`` without an ONNX file.
        OnnxFileError: the ONNX file cannot be loaded or does not take ``width`` inputs.
    """
    if backend not in BACKENDS:
        raise RuntimeBackendError(
            f"unknown runtime backend {backend!r}", [f"use one of {BACKENDS}"]
        )
    if device not in ("cpu", "cuda"):
        raise RuntimeBackendError(f"unknown device {device!r}", ["use cpu or cuda"])
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeBackendError("device cuda was asked for, but no GPU is available")
    if backend == "onnxruntime" and onnx_file is None:
        raise RuntimeBackendError(
            "the onnxruntime backend was asked for, but the model has no ONNX file",
            [eager_reason or "log the model again to export it, or use the eager backend"],
        )
    if backend == "eager":
        reason = "the eager backend was asked for" if onnx_file is not None else eager_reason
    elif onnx_file is None:
        reason = eager_reason or "no ONNX file"
    elif backend == "auto" and device == "cuda" and not cuda_provider_available():
        reason = "this ONNX Runtime build has no CUDA execution provider"
    else:
        return load_onnx_runtime(Path(onnx_file), width=width, device=device)
    return EagerRuntime(network, width=width, device=device, reason=reason)


def load_onnx_runtime(path: Path, *, width: int, device: str = "cpu") -> OnnxRuntimeBackend:
    """An ONNX Runtime session on ``path`` (CUDA first on ``cuda`` when available).

    Raises:
        OnnxFileError: the file is missing, not a loadable ONNX graph, or does not take
            ``width`` inputs.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = session_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings would reach users' consoles
    # Idle intra-op threads sleep instead of spinning: Stemma runs sessions beside threads
    # of its own (the scoring pipeline's reader, hasher, writer and other workers), whose
    # cores spinning threads would take (measured in NOTES.md, "Batch scoring").
    options.add_session_config_entry(ALLOW_SPINNING, "0")
    on_gpu = device == "cuda" and cuda_provider_available()
    providers = [_CUDA_PROVIDER, _CPU_PROVIDER] if on_gpu else [_CPU_PROVIDER]
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # ONNX Runtime's own error types (InvalidProtobuf, Fail, ...)
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxFileError(
            f"{path.name}: ONNX Runtime cannot load this file",
            [f"{path}: {text}", "restore the file, or log the model again to re-export it"],
        ) from None
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if shape is None or len(shape) != 2 or shape[1] != width:
        raise OnnxFileError(
            f"{path.name}: the graph does not take a (rows, {width}) matrix",
            [f"its inputs: {[(item.name, item.shape) for item in inputs]}"],
        )
    used = "cuda" if _CUDA_PROVIDER in session.get_providers() else "cpu"
    return OnnxRuntimeBackend(session, width=width, device=used)
