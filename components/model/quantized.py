"""The stored format of a quantized variant: its network JSON, weights and runtime.

A variant is stored like an fp32 model (``preprocess.json``, ``network.json``,
``weights.safetensors``) with a network JSON of format :data:`QUANTIZED_NETWORK_FORMAT`
that names the method. torchao variants keep their int8 (or bf16/fp16) weights in
safetensors, rebuilt without unpickling (torchao's reader builds only the tensor classes
on its allow-list) and run eager. ONNX Runtime variants (:data:`ORT_METHODS`) keep the
parent's fp32 weights and their own quantized graph as ``network.onnx``; they run only on
ONNX Runtime (:func:`runtime_backend`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stemma.components.platform.tags import QUANTIZE_METHOD

#: Methods Stemma can build, and what each one does.
METHODS: dict[str, str] = {
    "int8_dynamic": "int8 weights and int8 activations quantized per row at run time (torchao)",
    "int8_weight_only": "int8 weights, fp32 activations (torchao)",
    "bf16": "bfloat16 weights and activations",
    "fp16": "float16 weights and activations",
    "float8_dynamic": "float8 weights and activations (torchao; CUDA GPUs of compute capability 8.9+)",
    "ort_int8_dynamic": "int8 weights, activations quantized at run time (ONNX Runtime)",
    "ort_fp16": "float16 weights and activations, float32 inputs and outputs (ONNX Runtime)",
}
#: Methods that run only on a CUDA GPU; batch scoring runs on the CPU, so they are skipped.
GPU_ONLY_METHODS = frozenset({"float8_dynamic"})
#: Methods whose weights are torchao int8 tensors.
INT8_METHODS = frozenset({"int8_dynamic", "int8_weight_only"})
#: Methods that cast the network, and the dtype they cast it to.
FLOAT_METHODS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Methods whose variant is an ONNX graph run by ONNX Runtime.
ORT_METHODS = frozenset({"ort_int8_dynamic", "ort_fp16"})

#: Layout of a variant's network JSON; plain fp32 models use format 1 (artifact.NETWORK_FORMAT).
QUANTIZED_NETWORK_FORMAT = 2

#: How a variant runs: eager torch, or ONNX Runtime on its own graph. ``compiled`` was
#: written by earlier versions (torch.compile); such a variant now runs eager.
EAGER, COMPILED, ONNXRUNTIME = "eager", "compiled", "onnxruntime"
#: Loggers whose import-time warnings concern GPU users only (see :func:`quiet_torchao`).
QUIET_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")
#: Longest error text kept in a message.
MAX_REASON_CHARS = 300


class QuantizedNetwork(nn.Module):
    """A quantized or cast copy of a network, fed and read in float32 like the original.

    Attributes:
        network: the quantized (int8) or cast (bf16/fp16) network; for an ONNX Runtime
            method, the fp32 network its graph was quantized from.
        method: one of :data:`METHODS`.
        runtime: ``eager``, or ``onnxruntime`` for :data:`ORT_METHODS`.
        onnx_file: the variant's own graph (ONNX Runtime methods), else None.
    """

    def __init__(
        self,
        network: nn.Module,
        method: str,
        runtime: str = EAGER,
        onnx_file: Path | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.method = method
        self.runtime = runtime
        self.onnx_file = onnx_file
        self.input_dtype = FLOAT_METHODS.get(method, torch.float32)
        # A variant only ever infers: in training mode its dropout layers would run.
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.network(x if x.dtype == self.input_dtype else x.to(self.input_dtype))
        return output if output.dtype == torch.float32 else output.float()


class _Silenced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def quiet_torchao() -> Iterator[None]:
    """Keep torchao's import-time chatter off the console for the block.

    torchao logs a warning for each CUDA extension (and Triton) it cannot load on a CPU
    machine and torch warns about enum registrations it makes; none concerns a CPU user.
    Filters on :data:`QUIET_LOGGERS`, removed afterwards; no level is changed.
    """
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    silenced = _Silenced()
    for logger in loggers:
        logger.addFilter(silenced)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(silenced)


def int8_tensor_class() -> type:
    """torchao's int8 tensor class (imported on first use: torchao takes seconds)."""
    with quiet_torchao():
        from torchao.quantization import Int8Tensor
    return Int8Tensor


def brief(error: BaseException) -> str:
    """``Type: message`` on one line, cut to :data:`MAX_REASON_CHARS`."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}"


def package_version(name: str) -> str:
    """The installed version of a distribution, or ``unknown``."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return "unknown"


def save_variant_weights(variant: QuantizedNetwork, path: Path) -> str:
    """Write the variant's weights as safetensors, atomically; returns the file's sha256.

    int8 weights are stored as their int8 data, scales and zero points with torchao's
    description of each tensor in the file's metadata; other weights as they are.
    """
    import safetensors.torch

    from stemma.components.model.artifact import write_weights_file

    with quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(variant.network.state_dict())
    metadata[QUANTIZE_METHOD] = variant.method  # beside torchao's own keys
    payload = safetensors.torch.save(
        {key: value.contiguous() for key, value in tensors.items()}, metadata=metadata
    )
    return write_weights_file(path, payload)


def variant_document(
    parent_document: Mapping[str, Any], method: str, runtime: str, parent: Mapping[str, str]
) -> dict[str, Any]:
    """The network JSON of a variant: the parent's, with the format and the method.

    Args:
        parent_document: the parent's ``network.json``.
        method: the variant's method.
        runtime: ``eager`` or ``onnxruntime``: how it runs.
        parent: ``version`` and ``weights_sha256`` of the fp32 parent.
    """
    document = {key: value for key, value in parent_document.items() if key != "format"}
    document["format"] = QUANTIZED_NETWORK_FORMAT
    library = "onnxruntime" if method in ORT_METHODS else "torchao"
    document["quantization"] = {
        "method": method,
        "runtime": runtime,
        "parent_version": parent["version"],
        "parent_weights_sha256": parent["weights_sha256"],
        "torch": torch.__version__.split("+", 1)[0],
        library: package_version(library),
    }
    return document


def variant_method(document: Mapping[str, Any]) -> str | None:
    """The method a network JSON names, or None for an fp32 model's."""
    quantization = document.get("quantization")
    method = quantization.get("method") if isinstance(quantization, Mapping) else None
    return method if isinstance(method, str) else None


def runtime_backend(document: Mapping[str, Any], requested: str = "auto") -> str:
    """The runtime backend a model with this network JSON is served by.

    ``onnxruntime`` for an ONNX Runtime variant (its graph is the variant: eager would
    give the fp32 parent's outputs), ``eager`` for a torchao variant, else ``requested``.
    """
    if document.get("format") != QUANTIZED_NETWORK_FORMAT:
        return requested
    return ONNXRUNTIME if variant_method(document) in ORT_METHODS else EAGER


def load_variant_network(
    document: Mapping[str, Any], weights: Path, *, allowed: Collection[str] | None = None
) -> QuantizedNetwork:
    """Rebuild a variant from its network JSON and weights file, without unpickling.

    The network is built from its config (as the fp32 model is), cast for bf16/fp16, and
    its parameters are replaced by the stored tensors: plain tensors, or torchao int8
    tensors rebuilt by torchao's safetensors reader, which builds only the classes on
    its allow-list. Every ``nn.Linear`` weight of an int8 variant must come back as an
    int8 tensor, and the file must name the method the JSON names. An ONNX Runtime
    variant's network is its fp32 parent; its graph is loaded by the runtime.

    Args:
        document: the variant's network JSON.
        weights: its weights file.
        allowed: the architectures the network may name (``build_network``'s
            ``allowed``); None only for a document built from the caller's own spec.

    Raises:
        ValueError: the JSON names no or an unknown method, the file is not a variant's
            weights file, was written for another method, or does not fit the network.
        RegistryError: the network names an architecture outside ``allowed``.
    """
    from stemma.components.model.networks import build_network

    method = variant_method(document)
    if method not in METHODS or method in GPU_ONLY_METHODS:
        raise ValueError(f"network.json names no method Stemma can load (got {method!r})")
    runtime = document["quantization"].get("runtime", EAGER)
    allowed_runtimes = (ONNXRUNTIME,) if method in ORT_METHODS else (EAGER, COMPILED)
    if runtime not in allowed_runtimes:
        raise ValueError(f"network.json names an unknown runtime {runtime!r} for {method}")
    state = _read_variant_state(weights, method)
    network = build_network(
        document["config"], int(document["n_inputs"]), int(document["n_outputs"]), allowed=allowed
    )
    if method in FLOAT_METHODS:
        network = network.to(FLOAT_METHODS[method])
    try:
        network.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise ValueError(f"the weights do not fit the network: {brief(error)}") from error
    network.eval().requires_grad_(False)
    if method in INT8_METHODS:
        int8 = int8_tensor_class()
        plain = [
            name
            for name, module in network.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module.weight, int8)
        ]
        if plain:
            raise ValueError(f"layers {', '.join(plain)} are not int8 in a {method} variant")
    return QuantizedNetwork(network, method, ONNXRUNTIME if method in ORT_METHODS else EAGER)


def _read_variant_state(weights: Path, method: str) -> dict[str, Any]:
    """The tensors of a variant's weights file, checked to be written for ``method``."""
    import safetensors.torch

    with safetensors.torch.safe_open(str(weights), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    stored_method = metadata.pop(QUANTIZE_METHOD, None)
    if stored_method != method:
        raise ValueError(
            f"the weights file holds a {stored_method or 'non-variant'} network, "
            f"network.json names {method}"
        )
    with quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import (
            unflatten_tensor_state_dict,
        )

        state, leftover = unflatten_tensor_state_dict(
            safetensors.torch.load_file(str(weights), device="cpu"), metadata
        )
    if leftover:
        raise ValueError(f"the weights file holds tensors no layer takes: {sorted(leftover)}")
    return dict(state)
