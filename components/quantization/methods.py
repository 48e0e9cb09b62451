"""Building a variant of an fp32 network by each method Stemma knows.

torchao's methods (``int8_dynamic``, ``int8_weight_only``, ``float8_dynamic``) apply its
``quantize_`` to every ``nn.Linear`` of a copy; ``bf16`` and ``fp16`` cast a copy. ONNX
Runtime's methods start from the fp32 network's exported graph: ``ort_int8_dynamic`` is
``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantized at run
time) after ONNX Runtime's own pre-processing; ``ort_fp16`` converts the graph's float
tensors to float16 with ONNX Runtime's converter, keeping float32 inputs and outputs (Cast
nodes at the edges). Every variant is a deterministic function of the fp32 weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stemma.components.model.onnx_graph import ONNX_FILE
from stemma.components.model.quantized import (
    FLOAT_METHODS,
    GPU_ONLY_METHODS,
    METHODS,
    ONNXRUNTIME,
    ORT_METHODS,
    QuantizedNetwork,
    brief,
    int8_tensor_class,
    quiet_torchao,
)
from stemma.components.platform.files import write_atomically


class VariantUnavailable(Exception):
    """A method that cannot run here (a GPU-only method on a CPU); the variant is skipped."""


class VariantBuildError(Exception):
    """A variant could not be built or run; the message says why (shown, not raised)."""


def unavailable_reason(method: str) -> str | None:
    """Why ``method`` cannot be built and served here, or None when it can."""
    if method in ORT_METHODS:
        try:
            import onnxruntime.quantization
            import onnxruntime.transformers.float16  # noqa: F401
        except ImportError as error:
            return f"{method} needs ONNX Runtime's quantization tools: {brief(error)}"
        return None
    if method not in GPU_ONLY_METHODS:
        return None
    if not torch.cuda.is_available():
        return f"{method} runs only on CUDA GPUs and this machine has none"
    return f"{method} runs only on a GPU, and batch scoring runs on the CPU"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise VariantBuildError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    reason = unavailable_reason(method)
    if reason is not None:
        raise VariantUnavailable(reason)


def _torchao_config(method: str) -> Any:
    with quiet_torchao():
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    if method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if method == "int8_weight_only":
        return Int8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig()


def build_variant(network: nn.Module, method: str) -> QuantizedNetwork:
    """A torchao-quantized or cast copy of ``network`` (which is not modified), in eval mode.

    Raises:
        VariantUnavailable: a GPU-only method on a machine that cannot serve it.
        VariantBuildError: the method is unknown or an ONNX Runtime method (see
            :func:`build_ort_variant`), ``quantize_`` failed, or it found no ``nn.Linear``.
    """
    _check_method(method)
    if method in ORT_METHODS:
        raise VariantBuildError(f"{method} is built from an ONNX graph: use build_ort_variant")
    candidate = copy.deepcopy(network).eval()
    candidate.requires_grad_(False)
    if method in FLOAT_METHODS:
        return QuantizedNetwork(candidate.to(FLOAT_METHODS[method]), method)
    config = _torchao_config(method)
    with quiet_torchao():
        from torchao.quantization import quantize_

        try:
            quantize_(candidate, config)
        except Exception as error:  # torchao raises many kinds for layers it cannot handle
            raise VariantBuildError(f"torchao quantize_ failed: {brief(error)}") from error
    int8 = int8_tensor_class()
    quantized = [name for name, param in candidate.named_parameters() if isinstance(param, int8)]
    if not quantized:
        raise VariantBuildError(
            f"{method} quantized no layer: torchao quantizes nn.Linear layers and "
            f"{type(network).__name__} has none"
        )
    return QuantizedNetwork(candidate, method)


def build_ort_variant(
    network: nn.Module, method: str, fp32_onnx: Path | None, folder: Path
) -> QuantizedNetwork:
    """An ONNX Runtime variant: ``network``'s exported graph quantized or cast to fp16.

    Args:
        network: the fp32 network (copied, not modified): the variant's eager form.
        method: ``ort_int8_dynamic`` or ``ort_fp16``.
        fp32_onnx: the fp32 network's graph; None when it did not export.
        folder: where the variant's ``network.onnx`` is written.

    Raises:
        VariantUnavailable: ONNX Runtime's quantization tools cannot be imported.
        VariantBuildError: the network has no ONNX graph, or the conversion failed.
    """
    _check_method(method)
    if method not in ORT_METHODS:
        raise VariantBuildError(f"{method} is not an ONNX Runtime method: use build_variant")
    if fp32_onnx is None:
        raise VariantBuildError(f"{method} needs the fp32 network's ONNX graph, and it has none")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / ONNX_FILE
    try:
        if method == "ort_int8_dynamic":
            _quantize_dynamic(Path(fp32_onnx), target, folder)
        else:
            _convert_fp16(Path(fp32_onnx), target)
    except Exception as error:  # ONNX Runtime's tools raise many types on a graph they refuse
        raise VariantBuildError(f"{method} conversion failed: {brief(error)}") from error
    fp32 = copy.deepcopy(network).eval().requires_grad_(False)
    return QuantizedNetwork(fp32, method, ONNXRUNTIME, onnx_file=target)


def _quantize_dynamic(source: Path, target: Path, folder: Path) -> None:
    """int8 weights (per tensor, signed) with ONNX Runtime's pre-processing first, as its
    documentation asks (shape inference and graph optimisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "prepared.onnx"
    quant_pre_process(str(source), str(prepared))
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    prepared.unlink(missing_ok=True)


def _convert_fp16(source: Path, target: Path) -> None:
    """float16 weights and activations; the graph still takes and returns float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    write_atomically(target, converted.SerializeToString())
