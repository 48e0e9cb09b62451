"""Post-training quantization: variants of a registered fp32 model, measured and gated.

:func:`compare_variants` builds each variant a spec's ``quantize`` section lists (int8
dynamic and int8 weight-only with torchao's ``quantize_``, bf16 and fp16 casts), and
measures it against its fp32 parent in the same process: the gate's metric on the
held-out rows the parent was gated on, how often the two agree on the decision, the mean
absolute difference of their scores, and the latency of one forward pass at the scoring
batch size, eager and compiled with ``torch.compile``, in interleaved rounds so that a
burst of load slows every model alike (with one torch thread, the default, a pass is
timed by the process's CPU time, which other processes cannot inflate). The fp32 parent is timed three ways (eager,
compiled, and on oneDNN as the scoring engine runs it) and a variant's
speed-up is counted against the fastest. :func:`decide_variant` passes a variant only
when its metric drop and its speed-up both clear the spec's bounds, and fails closed on a
number it cannot trust.

A passing variant is stored as plain files: the parent's ``preprocess.json``, a
``network.json`` of format :data:`QUANTIZED_NETWORK_FORMAT` that names the method, and the
variant's own weights in safetensors (int8 data and scales through torchao's safetensors
layout, or bf16/fp16 tensors). :func:`load_variant_network` rebuilds it without unpickling
anything: torchao's reader only builds the tensor classes on its allow-list.
:func:`register_variant` registers it as a version of the parent's registered model with
``stemma.quantize.*`` tags and the alias ``v<parent>-<method>`` (``v7-int8-dynamic``);
the fastest passing variant of a parent also gets ``v<parent>-quantized``, which batch
scoring serves when the spec's ``quantize.serve`` is on (:func:`served_reference`).

torch is imported at the top; torchao only where a variant is built or loaded (it takes
about two seconds to import).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from stemma.components.errors import DataError, RegistryError
from stemma.components.lineage.records import (
    RECORD_SCHEMA,
    Edge,
    Node,
    data_node_id,
    model_node_id,
    run_node_id,
)
from stemma.components.spec import METRIC_DIRECTIONS, DataSpec, QuantizeSpec

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from stemma.components.data.tables import DataVersion
    from stemma.components.model.preprocessing import Preprocessor

_LOG = logging.getLogger(__name__)

#: Methods Stemma can build, what each one does, and whether it needs a CUDA GPU.
METHODS: dict[str, str] = {
    "int8_dynamic": "int8 weights and int8 activations quantized per row at run time (torchao)",
    "int8_weight_only": "int8 weights, fp32 activations (torchao)",
    "bf16": "bfloat16 weights and activations",
    "fp16": "float16 weights and activations",
    "float8_dynamic": "float8 weights and activations (torchao; CUDA GPUs of compute capability 8.9+)",
}
#: Methods that run only on a CUDA GPU; batch scoring runs on the CPU, so they are skipped.
GPU_ONLY_METHODS = frozenset({"float8_dynamic"})
#: Methods whose weights are torchao int8 tensors.
INT8_METHODS = frozenset({"int8_dynamic", "int8_weight_only"})
#: Methods that cast the network, and the dtype they cast it to.
FLOAT_METHODS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Layout of a variant's network JSON; plain fp32 models use format 1 (tracking.NETWORK_FORMAT).
QUANTIZED_NETWORK_FORMAT = 2
#: Key of the safetensors metadata that names the method (beside torchao's own keys).
WEIGHTS_METHOD_KEY = "stemma.quantize.method"

#: Model version tags of a variant.
TAG_PREFIX = "stemma.quantize."
METHOD_TAG = TAG_PREFIX + "method"
PARENT_VERSION_TAG = TAG_PREFIX + "parent_version"
PARENT_WEIGHTS_TAG = TAG_PREFIX + "parent_weights_sha256"
RUNTIME_TAG = TAG_PREFIX + "runtime"
#: ``registering`` from the moment the version exists until it is verified and aliased,
#: then ``registered``. Nothing serves a version that is still ``registering``.
STATUS_TAG = TAG_PREFIX + "status"
STATUS_REGISTERING = "registering"
STATUS_REGISTERED = "registered"
#: ``host:pid`` of the process registering a version, so a later run can tell whether
#: the process that left a ``registering`` version behind is gone.
OWNER_TAG = TAG_PREFIX + "owner"
#: Parent version tag: the latest quantize decision for each method, as JSON.
SUMMARY_TAG = TAG_PREFIX + "summary"
#: A ``registering`` version this old is abandoned whoever owns it (registration takes seconds).
STALE_REGISTRATION_SECONDS = 600

#: Alias of a passing variant, and of the one batch scoring serves for a parent version.
METHOD_ALIAS = "v{version}-{method}"
SERVED_ALIAS = "v{version}-quantized"

#: Runtimes a variant can be served with.
EAGER, COMPILED, PREPACKED = "eager", "compiled", "oneDNN"
#: Outcomes of a variant.
PASSED, REJECTED, FAILED, SKIPPED = "passed", "rejected", "failed", "skipped"

#: The fp32 parent's latency must be finite and positive to divide by; below this it is noise.
MIN_LATENCY_MS = 1e-6
#: Decimals shown for metric values in reasons.
SHOWN_DECIMALS = 4
#: Longest error text kept in a reason.
MAX_REASON_CHARS = 300
#: Rows of the test split logged with a variant as its input example.
INPUT_EXAMPLE_ROWS = 5


# ---------------------------------------------------------------------------------------
# The variant network


class QuantizedNetwork(nn.Module):
    """A quantized or cast copy of a network, fed and read in float32 like the original.

    Attributes:
        network: the quantized (int8) or cast (bf16/fp16) network.
        method: one of :data:`METHODS`.
        runtime: ``compiled`` when the variant was measured faster compiled and is to be
            served that way (see :func:`serving_module`), else ``eager``.
    """

    def __init__(self, network: nn.Module, method: str, runtime: str = EAGER) -> None:
        super().__init__()
        self.network = network
        self.method = method
        self.runtime = runtime
        self.input_dtype = FLOAT_METHODS.get(method, torch.float32)
        # A variant only ever infers: in training mode its dropout layers would run.
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.network(x if x.dtype == self.input_dtype else x.to(self.input_dtype))
        return output if output.dtype == torch.float32 else output.float()


class VariantUnavailable(Exception):
    """A method that cannot run here (a GPU-only method on a CPU); the variant is skipped."""


class VariantBuildError(Exception):
    """A variant could not be built or run; the message says why (shown, not raised)."""


@contextmanager
def _quiet_torchao() -> Iterator[None]:
    """Keep torchao's import-time chatter off the console.

    torchao logs a warning for each CUDA extension it cannot load on a CPU machine and
    torch warns about enum registrations it makes; neither concerns a CPU user.
    """
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torchao_config(method: str) -> Any:
    with _quiet_torchao():
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


def _int8_tensor_class() -> type:
    with _quiet_torchao():
        from torchao.quantization import Int8Tensor
    return Int8Tensor


def unavailable_reason(method: str) -> str | None:
    """Why ``method`` cannot be built and served here, or None when it can."""
    if method not in GPU_ONLY_METHODS:
        return None
    if not torch.cuda.is_available():
        return f"{method} runs only on CUDA GPUs and this machine has none"
    return f"{method} runs only on a GPU, and batch scoring runs on the CPU"


def build_variant(network: nn.Module, method: str) -> QuantizedNetwork:
    """A quantized or cast copy of ``network`` (which is not modified), in eval mode.

    The int8 methods apply torchao's ``quantize_`` to every ``nn.Linear`` of a deep copy;
    bf16 and fp16 cast a copy. The result is a deterministic function of the weights: the
    same network always gives the same variant.

    Raises:
        VariantUnavailable: a GPU-only method on a machine that cannot serve it.
        VariantBuildError: the method is unknown, ``quantize_`` failed, or it found no
            ``nn.Linear`` layer to quantize.
    """
    if method not in METHODS:
        raise VariantBuildError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    reason = unavailable_reason(method)
    if reason is not None:
        raise VariantUnavailable(reason)
    candidate = copy.deepcopy(network).eval()
    candidate.requires_grad_(False)
    if method in FLOAT_METHODS:
        return QuantizedNetwork(candidate.to(FLOAT_METHODS[method]), method)
    config = _torchao_config(method)
    with _quiet_torchao():
        from torchao.quantization import quantize_

        try:
            quantize_(candidate, config)
        except Exception as error:  # torchao raises many kinds for layers it cannot handle
            raise VariantBuildError(f"torchao quantize_ failed: {_brief(error)}") from error
    int8 = _int8_tensor_class()
    quantized = [name for name, param in candidate.named_parameters() if isinstance(param, int8)]
    if not quantized:
        raise VariantBuildError(
            f"{method} quantized no layer: torchao quantizes nn.Linear layers and "
            f"{type(network).__name__} has none"
        )
    return QuantizedNetwork(candidate, method)


def serving_module(network: QuantizedNetwork, width: int) -> nn.Module:
    """The module batch scoring runs for a variant: compiled when it was measured compiled.

    The compiled module is warmed up here, on a small batch, so that compilation happens
    once in the calling thread rather than in the scoring engine's worker threads; its
    batch dimension is dynamic, so every batch size reuses it. Where compilation fails
    (no C++ compiler, say) the variant runs eager, with a warning.
    """
    if network.runtime != COMPILED:
        return network
    compiled = cast(nn.Module, torch.compile(network, dynamic=True))
    try:
        with torch.inference_mode(), _quiet_torchao():
            compiled(torch.zeros(2, width))
    except Exception as error:  # a compiler problem: serving eager is slower, not wrong
        _LOG.warning(
            "serving the %s variant eager: torch.compile failed: %s", network.method, error
        )
        return network
    return compiled


# ---------------------------------------------------------------------------------------
# Storing and loading a variant


def save_variant_weights(variant: QuantizedNetwork, path: Path) -> str:
    """Write the variant's weights as safetensors, atomically; returns the file's sha256.

    int8 weights are stored as their int8 data, scales and zero points with torchao's
    description of each tensor in the file's metadata; bf16/fp16 weights as they are.
    """
    import safetensors.torch

    with _quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(variant.network.state_dict())
    metadata[WEIGHTS_METHOD_KEY] = variant.method
    payload = safetensors.torch.save(
        {key: value.contiguous() for key, value in tensors.items()}, metadata=metadata
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return hashlib.sha256(payload).hexdigest()


def variant_document(
    parent_document: Mapping[str, Any], method: str, runtime: str, parent: Mapping[str, str]
) -> dict[str, Any]:
    """The network JSON of a variant: the parent's, with the format and the method.

    Args:
        parent_document: the parent's ``network.json``.
        method: the variant's method.
        runtime: ``eager`` or ``compiled``: how batch scoring runs it.
        parent: ``version`` and ``weights_sha256`` of the fp32 parent.
    """
    document = {key: value for key, value in parent_document.items() if key != "format"}
    document["format"] = QUANTIZED_NETWORK_FORMAT
    document["quantization"] = {
        "method": method,
        "runtime": runtime,
        "parent_version": parent["version"],
        "parent_weights_sha256": parent["weights_sha256"],
        "torch": torch.__version__.split("+", 1)[0],
        "torchao": _torchao_version(),
    }
    return document


def _torchao_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return "unknown"


def load_variant_network(
    document: Mapping[str, Any], weights: Path, *, allowed: Collection[str] | None = None
) -> QuantizedNetwork:
    """Rebuild a variant from its network JSON and weights file, without unpickling.

    The network is built from its config (as the fp32 model is), cast for bf16/fp16, and
    its parameters are replaced by the stored tensors: plain tensors, or torchao int8
    tensors rebuilt by torchao's safetensors reader, which builds only the classes on
    its allow-list. Every ``nn.Linear`` weight of an int8 variant must come back as an
    int8 tensor, and the file must name the method the JSON names.

    Args:
        document: the variant's network JSON.
        weights: its weights file.
        allowed: the architectures the network may name (``models.build_network``'s
            ``allowed``); None only for a document built from the caller's own spec.

    Raises:
        ValueError: the JSON names no or an unknown method, the file is not a variant's
            weights file, was written for another method, or does not fit the network.
        RegistryError: the network names an architecture outside ``allowed``.
    """
    import safetensors.torch

    from stemma.components.model.networks import build_network

    quantization = document.get("quantization")
    method = quantization.get("method") if isinstance(quantization, Mapping) else None
    if method not in METHODS or method in GPU_ONLY_METHODS:
        raise ValueError(f"network.json names no method Stemma can load (got {method!r})")
    runtime = quantization.get("runtime", EAGER) if isinstance(quantization, Mapping) else EAGER
    if runtime not in (EAGER, COMPILED):
        raise ValueError(f"network.json names an unknown runtime {runtime!r}")
    with safetensors.torch.safe_open(str(weights), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    stored_method = metadata.pop(WEIGHTS_METHOD_KEY, None)
    if stored_method != method:
        raise ValueError(
            f"the weights file holds a {stored_method or 'non-variant'} network, "
            f"network.json names {method}"
        )
    with _quiet_torchao():
        from torchao.prototype.safetensors.safetensors_support import (
            unflatten_tensor_state_dict,
        )

        state, leftover = unflatten_tensor_state_dict(
            safetensors.torch.load_file(str(weights), device="cpu"), metadata
        )
    if leftover:
        raise ValueError(f"the weights file holds tensors no layer takes: {sorted(leftover)}")
    network = build_network(
        document["config"], int(document["n_inputs"]), int(document["n_outputs"]), allowed=allowed
    )
    if method in FLOAT_METHODS:
        network = network.to(FLOAT_METHODS[method])
    try:
        network.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise ValueError(f"the weights do not fit the network: {_brief(error)}") from error
    network.eval().requires_grad_(False)
    if method in INT8_METHODS:
        int8 = _int8_tensor_class()
        plain = [
            name
            for name, module in network.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module.weight, int8)
        ]
        if plain:
            raise ValueError(f"layers {', '.join(plain)} are not int8 in a {method} variant")
    return QuantizedNetwork(network, method, runtime)


# ---------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class VariantResult:
    """How one variant compares with its fp32 parent, and the gate's decision.

    Attributes:
        method: the method.
        status: ``passed``, ``rejected`` (measured, missed a bound), ``failed`` (could not
            be built or run) or ``skipped`` (cannot run here).
        reasons: one line per check (or why it failed or was skipped).
        value: the gate metric on the held-out rows.
        metric_drop: how much worse than the parent (positive: worse), in the metric's
            units, whichever direction is better.
        agreement: share of rows whose decision (score at or above the threshold) matches
            the parent's; None for regression.
        mean_abs_diff: mean absolute difference of the scores.
        max_abs_diff: largest absolute difference of the scores.
        eager_ms: latency of one forward pass, eager.
        compiled_ms: the same, compiled (None when not measured or it failed to compile).
        runtime: the faster of the two, which batch scoring uses.
        latency_ms: the latency of that runtime.
        speedup: the fastest fp32 latency divided by ``latency_ms``.
        rows_per_second: batch rows over ``latency_ms``.
        size_bytes: the variant's weights file.
        compile_seconds: how long the first compiled call took.
        version: the registered model version, once registered.
    """

    method: str
    status: str
    reasons: tuple[str, ...]
    value: float | None = None
    metric_drop: float | None = None
    agreement: float | None = None
    mean_abs_diff: float | None = None
    max_abs_diff: float | None = None
    eager_ms: float | None = None
    compiled_ms: float | None = None
    runtime: str | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    rows_per_second: float | None = None
    size_bytes: int | None = None
    compile_seconds: float | None = None
    version: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class Comparison:
    """Every variant of one fp32 model against it, on the same rows and the same batch.

    Attributes:
        metric: the gate metric; ``higher_is_better`` its direction.
        parent_value: the fp32 model's value on the held-out rows.
        parent_ms: fp32 latency by runtime (``eager``, ``compiled``, ``oneDNN``).
        baseline_runtime: the fastest fp32 runtime; ``baseline_ms`` its latency.
        parent_size_bytes: the fp32 weights file.
        rows: held-out rows the metrics were computed on.
        batch_rows, repeats, warmup, threads: how latency was measured.
        clock: ``cpu`` (the process's CPU time, with one thread) or ``wall``.
        max_metric_drop, min_speedup: the gate's bounds.
        variants: one result per method the spec lists, in its order.
        notes: what the reader should know about the measurement (a compile failure).
    """

    metric: str
    higher_is_better: bool
    parent_value: float
    parent_ms: dict[str, float]
    baseline_runtime: str
    baseline_ms: float
    parent_size_bytes: int
    rows: int
    batch_rows: int
    repeats: int
    warmup: int
    threads: int
    max_metric_drop: float
    min_speedup: float
    variants: tuple[VariantResult, ...]
    notes: tuple[str, ...] = ()
    clock: str = "wall"

    def table(self) -> list[dict[str, Any]]:
        """The comparison as rows (fp32 runtimes first, then each variant), for a table."""
        rows: list[dict[str, Any]] = []
        for runtime, latency in self.parent_ms.items():
            rows.append(
                {
                    "model": f"fp32 ({runtime})",
                    "method": "fp32",
                    "status": "baseline" if runtime == self.baseline_runtime else "reference",
                    self.metric: self.parent_value,
                    "metric_drop": 0.0,
                    "agreement": 1.0,
                    "mean_abs_score_diff": 0.0,
                    "latency_ms": latency,
                    "speedup": self.baseline_ms / latency,
                    "rows_per_second": self.batch_rows / latency * 1000.0,
                    "size_bytes": self.parent_size_bytes,
                    "runtime": runtime,
                    "version": None,
                    "reasons": "",
                }
            )
        for variant in self.variants:
            rows.append(
                {
                    "model": variant.method,
                    "method": variant.method,
                    "status": variant.status,
                    self.metric: variant.value,
                    "metric_drop": variant.metric_drop,
                    "agreement": variant.agreement,
                    "mean_abs_score_diff": variant.mean_abs_diff,
                    "latency_ms": variant.latency_ms,
                    "speedup": variant.speedup,
                    "rows_per_second": variant.rows_per_second,
                    "size_bytes": variant.size_bytes,
                    "runtime": variant.runtime,
                    "version": variant.version,
                    "reasons": "; ".join(variant.reasons),
                }
            )
        return rows

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: ``quantize.<method>.<measure>`` and the fp32 latencies."""
        out: dict[str, float] = {f"quantize.fp32.{self.metric}": self.parent_value}
        for runtime, latency in self.parent_ms.items():
            out[f"quantize.fp32.{runtime}_ms"] = latency
        out["quantize.fp32.size_bytes"] = float(self.parent_size_bytes)
        for variant in self.variants:
            prefix = f"quantize.{variant.method}."
            out[prefix + "passed"] = 1.0 if variant.passed else 0.0
            for name, value in (
                (self.metric, variant.value),
                ("metric_drop", variant.metric_drop),
                ("agreement", variant.agreement),
                ("mean_abs_score_diff", variant.mean_abs_diff),
                ("eager_ms", variant.eager_ms),
                ("compiled_ms", variant.compiled_ms),
                ("latency_ms", variant.latency_ms),
                ("speedup", variant.speedup),
                ("rows_per_second", variant.rows_per_second),
                ("size_bytes", variant.size_bytes),
            ):
                if value is not None:
                    out[prefix + name] = float(value)
        return out

    def with_variant(self, result: VariantResult) -> Comparison:
        """The comparison with ``result`` in place of the variant of the same method."""
        variants = tuple(result if v.method == result.method else v for v in self.variants)
        return replace(self, variants=variants)


def decide_variant(
    *,
    metric: str,
    higher_is_better: bool,
    parent_value: float,
    value: float,
    speedup: float,
    max_metric_drop: float,
    min_speedup: float,
) -> tuple[bool, float, tuple[str, ...]]:
    """Does a variant pass: metric drop at most ``max_metric_drop`` and speed-up at least
    ``min_speedup``? Both checks are always reported; a non-finite number fails closed.

    Returns:
        ``(passed, metric_drop, reasons)``; the drop is positive when the variant is worse.
    """
    reasons: list[str] = []
    passed = True
    drop = (parent_value - value) if higher_is_better else (value - parent_value)
    if not (math.isfinite(value) and math.isfinite(parent_value)):
        passed = False
        reasons.append(f"cannot decide: {metric} is {value} (fp32: {parent_value})")
    else:
        ok = drop <= max_metric_drop
        passed &= ok
        reasons.append(
            f"{metric} drop {_shown(drop)} {'<=' if ok else '>'} max {_shown(max_metric_drop)} "
            f"({metric} {_shown(value)} vs fp32 {_shown(parent_value)})"
        )
    if not math.isfinite(speedup) or speedup <= 0:
        passed = False
        reasons.append(f"cannot decide: speed-up is {speedup}")
    else:
        ok = speedup >= min_speedup
        passed &= ok
        reasons.append(f"speed-up {speedup:.2f}x {'>=' if ok else '<'} min {min_speedup:.2f}x")
    return passed, float(drop), tuple(reasons)


def _shown(value: float) -> str:
    return f"{value:.{SHOWN_DECIMALS}f}"


def _brief(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 3] + "..."
    return f"{type(error).__name__}: {text}"


def _scores(network: nn.Module, x: np.ndarray, preprocessor: Preprocessor) -> np.ndarray:
    from stemma.components.training.loop import predict_raw

    raw = predict_raw(network, x)
    return np.asarray(preprocessor.decode_output(raw), dtype=np.float64).reshape(len(x))


def _timing_batch(x: np.ndarray, rows: int) -> torch.Tensor:
    """``rows`` rows of real inputs: the held-out matrix, repeated as often as needed."""
    index = np.arange(rows) % len(x)
    return torch.from_numpy(np.ascontiguousarray(x[index], dtype=np.float32))


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency_clock(threads: int) -> tuple[str, Callable[[], float]]:
    """The clock a forward pass is timed with, by name.

    With one torch thread, the process's CPU time: the pass runs on the calling thread,
    and other processes on a busy machine cannot inflate it (wall-clock time measured
    there ran several times the compute time when the pass was preempted). With more
    threads, wall-clock time, since CPU time then adds the threads up.
    """
    return ("cpu", time.process_time) if threads == 1 else ("wall", time.perf_counter)


def _time_runners(
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batch: torch.Tensor,
    *,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Median ms per call of each runner by ``clock``, measured in interleaved rounds.

    Each runner is called ``warmup`` times first (the first call of a compiled runner
    compiles it: that time is returned apart). Then every round calls each runner once,
    in turn, so that a burst of load on the machine slows all of them alike rather than
    whichever happened to be measured at the time.

    Returns:
        ``(median ms by runner, first-call seconds by runner, error by runner)``; a
        runner that raised is left out of the medians and its error given instead.
    """
    first_call: dict[str, float] = {}
    errors: dict[str, str] = {}
    live: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    with torch.inference_mode():
        for key, runner in runners.items():
            try:
                started = time.perf_counter()
                runner(batch)
                first_call[key] = time.perf_counter() - started
                for _ in range(max(warmup - 1, 0)):
                    runner(batch)
            except Exception as error:  # a variant or compiler that fails: report it
                errors[key] = _brief(error)
                continue
            live[key] = runner
        samples: dict[str, list[float]] = {key: [] for key in live}
        for _ in range(repeats):
            for key, runner in live.items():
                started = clock()
                runner(batch)
                samples[key].append(clock() - started)
    medians = {key: statistics.median(values) * 1000.0 for key, values in samples.items()}
    return medians, first_call, errors


def compare_variants(
    network: nn.Module,
    preprocessor: Preprocessor,
    x_heldout: np.ndarray,
    y_heldout: np.ndarray,
    *,
    task: str,
    metric: str,
    threshold: float,
    settings: QuantizeSpec,
    batch_rows: int,
    workdir: Path,
    prepack: Callable[[nn.Module, int], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[Comparison, dict[str, QuantizedNetwork]]:
    """Build every variant the settings list and measure each against the fp32 network.

    Metrics come from eager runs on the held-out rows; latency from one forward pass on
    ``batch_rows`` held-out rows (repeated as needed) with ``settings.threads`` torch
    threads, eager and (with ``settings.compile``) compiled, medians of interleaved
    rounds. A variant that cannot be built or run is reported as ``failed``, one that
    cannot run here as ``skipped``; neither stops the others.

    Every timed module is in eval mode: in training mode its dropout layers would run
    (measured on the credit MLP: a bf16 variant left in training mode took 6 ms a pass,
    in eval mode 0.5 ms).

    Args:
        network: the fp32 network (not modified).
        preprocessor: its feature encoding (decodes outputs into scores).
        x_heldout: the encoded held-out rows.
        y_heldout: their labels.
        task: ``binary`` or ``regression``.
        metric: the gate metric.
        threshold: the decision threshold of a binary model.
        settings: the spec's quantize section.
        batch_rows: rows per timed forward pass.
        workdir: where each variant's weights file is written (``<method>/``) to size it.
        prepack: makes the runner of the fp32 network as the scoring engine runs it
            (``scoring.engine_runner``), timed as a third fp32
            runtime; None to leave it out.

    Returns:
        The comparison, with every variant ``passed``, ``rejected``, ``failed`` or
        ``skipped``, and the built networks of the variants that were measured.

    Raises:
        DataError: the fp32 model's own metric on the held-out rows is not finite.
    """
    from stemma.components.training.loop import save_weights
    from stemma.components.training.metrics import evaluate_scores

    higher_is_better = METRIC_DIRECTIONS[task][metric]
    network = network.eval()
    parent_scores = _scores(network, x_heldout, preprocessor)
    parent_value = float(evaluate_scores(task, y_heldout, parent_scores, threshold)[metric])
    if not math.isfinite(parent_value):
        raise DataError(
            f"the fp32 model's {metric} on the held-out rows is {parent_value}: nothing to compare with"
        )
    workdir = Path(workdir)
    parent_weights = workdir / "fp32" / "weights.safetensors"
    save_weights(network, parent_weights)

    results: dict[str, VariantResult] = {}
    built: dict[str, QuantizedNetwork] = {}
    variant_scores: dict[str, np.ndarray] = {}
    notes: list[str] = []
    with _torch_threads(settings.threads), _quiet_torchao():
        for method in settings.methods:
            try:
                variant = build_variant(network, method)
                scores = _scores(variant, x_heldout, preprocessor)
                if not np.isfinite(scores).all():
                    raise VariantBuildError("its scores on the held-out rows are not all finite")
                weights = workdir / method / "weights.safetensors"
                save_variant_weights(variant, weights)
            except VariantUnavailable as error:
                results[method] = VariantResult(method, SKIPPED, (str(error),))
                continue
            except VariantBuildError as error:
                results[method] = VariantResult(method, FAILED, (str(error),))
                continue
            except Exception as error:  # running or saving a variant can fail in many ways
                results[method] = VariantResult(
                    method, FAILED, (f"cannot run it: {_brief(error)}",)
                )
                continue
            built[method] = variant
            variant_scores[method] = scores
            results[method] = VariantResult(method, REJECTED, (), size_bytes=weights.stat().st_size)

        if settings.compile:
            # Compiled graphs are cached per code object (8 by default); a fresh cache
            # keeps earlier comparisons in this process from pushing these out to eager.
            torch._dynamo.reset()
        runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {f"fp32/{EAGER}": network}
        if prepack is not None:
            runners[f"fp32/{PREPACKED}"] = prepack(network, x_heldout.shape[1])
        if settings.compile:
            runners[f"fp32/{COMPILED}"] = torch.compile(network, dynamic=True)
        for method, variant in built.items():
            # predict_raw restores the mode a module had; a variant's is eval.
            runners[f"{method}/{EAGER}"] = variant.eval()
            if settings.compile:
                runners[f"{method}/{COMPILED}"] = torch.compile(variant, dynamic=True)
        clock_name, clock = latency_clock(settings.threads)
        medians, first_call, errors = _time_runners(
            runners,
            _timing_batch(x_heldout, batch_rows),
            warmup=settings.warmup,
            repeats=settings.repeats,
            clock=clock,
        )

    parent_ms = {
        runtime: medians[f"fp32/{runtime}"]
        for runtime in (EAGER, COMPILED, PREPACKED)
        if f"fp32/{runtime}" in medians
    }
    if EAGER not in parent_ms:
        raise DataError(
            f"the fp32 model failed to run on a batch of {batch_rows} rows",
            [errors.get(f"fp32/{EAGER}", "unknown error")],
        )
    for runtime in (COMPILED, PREPACKED):
        if f"fp32/{runtime}" in errors:
            notes.append(f"fp32 {runtime} could not run: {errors[f'fp32/{runtime}']}")
    baseline_runtime = min(parent_ms, key=lambda key: parent_ms[key])
    baseline_ms = max(parent_ms[baseline_runtime], MIN_LATENCY_MS)

    for method, variant in built.items():
        result = results[method]
        eager_ms = medians.get(f"{method}/{EAGER}")
        compiled_ms = medians.get(f"{method}/{COMPILED}")
        compile_error = errors.get(f"{method}/{COMPILED}")
        if eager_ms is None:
            results[method] = replace(
                result,
                status=FAILED,
                reasons=(
                    f"failed on a batch of {batch_rows} rows: {errors.get(f'{method}/{EAGER}')}",
                ),
            )
            continue
        timings = {EAGER: eager_ms, **({COMPILED: compiled_ms} if compiled_ms is not None else {})}
        runtime = min(timings, key=lambda key: timings[key])
        latency = timings[runtime]
        variant.runtime = runtime
        scores = variant_scores[method]
        value = float(evaluate_scores(task, y_heldout, scores, threshold)[metric])
        speedup = baseline_ms / max(latency, MIN_LATENCY_MS)
        passed, drop, reasons = decide_variant(
            metric=metric,
            higher_is_better=higher_is_better,
            parent_value=parent_value,
            value=value,
            speedup=speedup,
            max_metric_drop=settings.max_metric_drop,
            min_speedup=settings.min_speedup,
        )
        if compile_error:
            reasons = (*reasons, f"compiled run failed, timed eager only: {compile_error}")
        agreement = None
        if task == "binary":
            agreement = float(np.mean((scores >= threshold) == (parent_scores >= threshold)))
        difference = np.abs(scores - parent_scores)
        results[method] = replace(
            result,
            status=PASSED if passed else REJECTED,
            reasons=reasons,
            value=value,
            metric_drop=drop,
            agreement=agreement,
            mean_abs_diff=float(difference.mean()),
            max_abs_diff=float(difference.max()),
            eager_ms=eager_ms,
            compiled_ms=compiled_ms,
            runtime=runtime,
            latency_ms=latency,
            speedup=speedup,
            rows_per_second=batch_rows / latency * 1000.0,
            compile_seconds=first_call.get(f"{method}/{COMPILED}"),
        )

    comparison = Comparison(
        metric=metric,
        higher_is_better=higher_is_better,
        parent_value=parent_value,
        parent_ms=parent_ms,
        baseline_runtime=baseline_runtime,
        baseline_ms=baseline_ms,
        parent_size_bytes=parent_weights.stat().st_size,
        rows=len(x_heldout),
        batch_rows=batch_rows,
        repeats=settings.repeats,
        warmup=settings.warmup,
        threads=settings.threads,
        max_metric_drop=settings.max_metric_drop,
        min_speedup=settings.min_speedup,
        variants=tuple(results[method] for method in settings.methods),
        notes=tuple(notes),
        clock=clock_name,
    )
    return comparison, {m: v for m, v in built.items() if results[m].status != FAILED}


# ---------------------------------------------------------------------------------------
# The fp32 parent and the rows it was gated on


def method_alias(parent_version: str, method: str) -> str:
    """The alias of a passing variant: ``v7-int8-dynamic``."""
    return METHOD_ALIAS.format(version=parent_version, method=method.replace("_", "-"))


def served_alias(parent_version: str) -> str:
    """The alias of the variant batch scoring serves for a parent: ``v7-quantized``."""
    return SERVED_ALIAS.format(version=parent_version)


def is_variant(version: ModelVersion) -> bool:
    """Whether a model version is a quantized variant (rather than an fp32 model)."""
    return METHOD_TAG in (getattr(version, "tags", None) or {})


def _registry_error(action: str, error: Exception) -> RegistryError:
    return RegistryError(
        f"MLflow model registry: {action}", [getattr(error, "message", str(error))]
    )


def _versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{model_name}'"))
    except MlflowException as error:
        raise _registry_error(f"cannot list the versions of {model_name!r}", error) from error


def default_parent_reference(client: MlflowClient, model_name: str) -> str:
    """The model ``stemma run quantize`` takes when none is named: the newest fp32 version
    that passed its gate (the challenger or champion a training run just made).

    Raises:
        RegistryError: no such registered model, or none of its fp32 versions passed.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"no registered model named {model_name!r}",
                ["train and register one first (stemma run train CONFIG), or fix the name"],
            ) from None
        raise _registry_error(f"cannot read registered model {model_name!r}", error) from error
    gated = [
        version
        for version in _versions(client, model_name)
        if not is_variant(version) and (version.tags or {}).get("stemma.gate.decision") == "passed"
    ]
    if not gated:
        raise RegistryError(
            f"{model_name} has no fp32 version that passed its gate: nothing to quantize",
            ["train one that passes (stemma run train CONFIG), or name a version with --model"],
        )
    newest = max(gated, key=lambda version: int(version.version))
    return f"models:/{model_name}/{newest.version}"


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows a model was gated on, recomputed from its data version.

    Attributes:
        frame: the test split, raw columns.
        data: the data section the model was trained with.
        version: the data version (DVC md5 and the file's paths).
    """

    frame: pd.DataFrame
    data: DataSpec
    version: DataVersion

    @property
    def md5(self) -> str:
        return self.version.md5

    @property
    def file_path(self) -> str:
        return self.version.relpath

    def pointer(self, root: Path) -> str:
        """The DVC pointer file, relative to the project root."""
        return str(self.version.dvc_file.resolve().relative_to(Path(root).resolve()))


#: The resolved spec every training run logs; its data section fixes the split.
RESOLVED_SPEC_ARTIFACT = "spec/resolved.yaml"


def heldout_rows(client: MlflowClient, parent: ModelVersion, root: Path) -> HeldOut:
    """Recompute the test split ``parent`` was gated on, as its training run did.

    The training run's resolved spec gives the data file, columns and split; the data on
    disk must be the version the run trained on (the DVC md5 on the version's
    ``stemma.data.md5`` tag), so the split yields the same rows.

    Raises:
        RegistryError: the version has no training run, or the run has no resolved spec.
        DataError: the data on disk is another version, or differs from data.dvc.
    """
    import yaml

    from stemma.components.data.tables import load_table, resolve_data_version, split_table

    label = f"{parent.name} v{parent.version}"
    if not parent.run_id:
        raise RegistryError(f"{label} has no training run: cannot tell which rows it was gated on")
    try:
        with tempfile.TemporaryDirectory(prefix="stemma-spec-") as scratch:
            path = client.download_artifacts(parent.run_id, RESOLVED_SPEC_ARTIFACT, scratch)
            document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        data = DataSpec.model_validate(document["data"])
    except Exception as error:  # missing artifact, unreadable YAML, an old layout
        raise RegistryError(
            f"{label}: cannot read the spec its training run {parent.run_id} used",
            [f"{RESOLVED_SPEC_ARTIFACT}: {_brief(error)}", "quantize a model trained by Stemma"],
        ) from error
    data_path = Path(data.path) if Path(data.path).is_absolute() else Path(root) / data.path
    version = resolve_data_version(Path(root), data_path)
    trained_on = (parent.tags or {}).get("stemma.data.md5")
    if trained_on and trained_on != version.md5:
        raise DataError(
            f"{label} was trained on data version {trained_on}; the project's data is {version.md5}",
            [
                "its held-out rows cannot be recomputed from other data",
                f"check out that version (git checkout {(parent.tags or {}).get('stemma.git.rev', '<rev>')} "
                "-- data.dvc && dvc checkout), or quantize a model trained on the current data",
            ],
        )
    frame = load_table(version.file_path, data)
    _, _, test = split_table(frame, data.split)
    return HeldOut(frame=test, data=data, version=version)


def check_parent_value(parent: ModelVersion, metric: str, value: float) -> None:
    """The fp32 model's metric on the recomputed rows must be the one its gate recorded.

    Raises:
        DataError: it differs, so the rows are not the ones it was gated on.
    """
    tags = parent.tags or {}
    if tags.get("stemma.gate.metric") != metric or "stemma.gate.value" not in tags:
        return
    recorded = float(tags["stemma.gate.value"])
    if not math.isclose(recorded, value, rel_tol=1e-9, abs_tol=1e-12):
        raise DataError(
            f"{parent.name} v{parent.version} scores {metric} {value!r} on the recomputed held-out "
            f"rows, but its gate recorded {recorded!r}",
            ["the rows differ from those it was gated on: nothing would be comparable"],
        )


def download_model_files(
    client: MlflowClient, model_name: str, version: str, destination: Path
) -> dict[str, Any]:
    """The registered model's files: ``preprocess``, ``network`` and ``weights`` paths,
    its ``network`` JSON as ``document`` and its MLmodel ``signature`` mapping.

    Raises:
        RegistryError: the artifacts cannot be downloaded or lack a file.
    """
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from stemma.components.platform.tracking import MODEL_ARTIFACT_FILES
    from stemma.components.scoring.engine import verify_model_files

    label = f"{model_name} v{version}"
    try:
        uri = client.get_model_version_download_uri(model_name, str(version))
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=client.tracking_uri
            )
        )
        registered = client.get_model_version(model_name, str(version))
    except (MlflowException, OSError) as error:
        raise RegistryError(f"cannot download the artifacts of {label}", [_brief(error)]) from error
    verify_model_files(client, registered, folder, label)
    files: dict[str, Any] = {}
    for key, name in MODEL_ARTIFACT_FILES.items():
        found = sorted(folder.rglob(name))
        if not found:
            raise RegistryError(f"{label}: the model has no {name} artifact")
        files[key] = found[0]
    files["document"] = json.loads(files["network"].read_text(encoding="utf-8"))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    files["signature"] = (mlmodel or {}).get("signature") or {}
    return files


# ---------------------------------------------------------------------------------------
# Registering variants


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_gone(owner: str) -> bool:
    """Whether the ``host:pid`` that tagged a version is a process of this host that ended."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def remove_abandoned_variants(
    client: MlflowClient, model_name: str, *, now: float | None = None
) -> list[str]:
    """Delete variant versions a killed run left ``registering``; returns their numbers.

    A version is abandoned when the process that tagged it (same host) has ended, or it
    has been ``registering`` for :data:`STALE_REGISTRATION_SECONDS`. Such a version never
    got an alias, so nothing served it.
    """
    from mlflow.exceptions import MlflowException

    now = time.time() if now is None else now
    removed = []
    for version in _versions(client, model_name):
        tags = version.tags or {}
        if tags.get(STATUS_TAG) != STATUS_REGISTERING:
            continue
        age = now - (version.creation_timestamp or 0) / 1000.0
        if not (_owner_gone(tags.get(OWNER_TAG, "")) or age > STALE_REGISTRATION_SECONDS):
            continue
        try:
            client.delete_model_version(model_name, str(version.version))
        except MlflowException as error:
            raise _registry_error(
                f"cannot delete the abandoned variant {model_name} v{version.version}", error
            ) from error
        removed.append(str(version.version))
    return removed


def register_variant(
    *,
    client: MlflowClient,
    model_name: str,
    parent_version: str,
    method: str,
    model_uri: str,
    run_id: str,
    tags: Mapping[str, str],
    description: str,
    verify: Callable[[str], None],
) -> ModelVersion:
    """Register a passing variant as a version of the parent's model, all or nothing.

    The version is created tagged ``registering`` (with this process as its owner), then
    ``verify(version)`` checks it (loads it back and compares outputs), then it gets its
    alias (:func:`method_alias`) and the tag ``registered``. If anything fails or the run
    is interrupted on the way, the version is deleted again; a process killed outright
    leaves it ``registering``, unaliased, for :func:`remove_abandoned_variants`.

    Raises:
        RegistryError: MLflow refused a step (the version is deleted).
        Exception: whatever ``verify`` raised (the version is deleted).
    """
    from mlflow.exceptions import MlflowException

    from stemma.components.platform.tracking import integrity_tags
    from stemma.components.registry.gate import _model_id

    try:
        recorded = integrity_tags(client, _model_id(model_uri))
        created = client.create_model_version(
            name=model_name,
            source=model_uri,
            run_id=run_id,
            tags={**tags, **recorded, STATUS_TAG: STATUS_REGISTERING, OWNER_TAG: _owner()},
            description=description,
            model_id=_model_id(model_uri),
        )
    except MlflowException as error:
        raise _registry_error(
            f"cannot register the {method} variant of v{parent_version}", error
        ) from error
    number = str(created.version)
    try:
        verify(number)
        client.set_registered_model_alias(model_name, method_alias(parent_version, method), number)
        client.set_model_version_tag(model_name, number, STATUS_TAG, STATUS_REGISTERED)
        client.delete_model_version_tag(model_name, number, OWNER_TAG)
        return client.get_model_version(model_name, number)
    except BaseException as error:
        try:
            client.delete_model_version(model_name, number)
        except Exception:  # the original error matters more; the next run cleans up
            _LOG.warning("could not delete half-registered %s v%s", model_name, number)
        if isinstance(error, MlflowException):
            raise _registry_error(
                f"cannot finish registering the {method} variant of v{parent_version}", error
            ) from error
        raise


def update_served_alias(
    client: MlflowClient, model_name: str, parent_version: str, comparison: Comparison
) -> str | None:
    """Point ``v<parent>-quantized`` at the fastest passing variant of this comparison.

    The latest measurement of a parent decides: when no variant passed, the alias is
    removed, and so are method aliases of the parent whose method was rejected now.

    Returns:
        The version the alias names, or None.
    """
    from mlflow.exceptions import MlflowException

    passing = [v for v in comparison.variants if v.passed and v.version is not None]
    best = min(passing, key=lambda v: v.latency_ms or math.inf) if passing else None
    alias = served_alias(parent_version)
    try:
        aliases = dict(client.get_registered_model(model_name).aliases or {})
        if best is not None:
            client.set_registered_model_alias(model_name, alias, str(best.version))
        elif alias in aliases:
            client.delete_registered_model_alias(model_name, alias)
        for variant in comparison.variants:
            stale = method_alias(parent_version, variant.method)
            if variant.status in (REJECTED, FAILED) and stale in aliases:
                client.delete_registered_model_alias(model_name, stale)
    except MlflowException as error:
        raise _registry_error(f"cannot set the alias {alias}", error) from error
    return None if best is None else str(best.version)


def summary_tag(comparison: Comparison, run_id: str, served: str | None) -> str:
    """The parent's :data:`SUMMARY_TAG`: each method's outcome and numbers, compact JSON."""

    def rounded(value: float | None, digits: int = 6) -> float | None:
        return None if value is None else round(float(value), digits)

    document = {
        "run_id": run_id,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "metric": comparison.metric,
        "max_metric_drop": comparison.max_metric_drop,
        "min_speedup": comparison.min_speedup,
        "baseline": f"fp32 {comparison.baseline_runtime} {comparison.baseline_ms:.3f} ms",
        "served_version": served,
        "variants": {
            v.method: {
                "status": v.status,
                "version": v.version,
                "metric_drop": rounded(v.metric_drop),
                "speedup": rounded(v.speedup, 3),
                "reasons": list(v.reasons),
            }
            for v in comparison.variants
        },
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------
# Serving a variant


def served_reference(
    quantize: QuantizeSpec | None,
    reference: str,
    *,
    explicit: bool = False,
    client: MlflowClient | None = None,
) -> tuple[str, str | None]:
    """The model batch scoring should load, and a line saying which and why.

    With ``quantize.serve`` on, a reference to an fp32 version (the champion, or the
    spec's ``score.model``) becomes the alias of its served variant
    (:func:`served_alias`) when one passed its gate; otherwise the fp32 model is scored
    and the line says why (its variants were rejected, or it was never quantized). A
    reference given on the command line (``explicit``) is scored as it is.

    Returns:
        ``(reference, note)``; the note is None when serving variants is off.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from stemma.components.scoring.engine import _REFERENCE

    if quantize is None or not quantize.serve or explicit:
        return reference, None
    match = _REFERENCE.match(reference.strip())
    if match is None:
        return reference, None  # the loader explains what a reference looks like
    client = client or MlflowClient()
    name = match["name"]
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"])
        else:
            version = client.get_model_version(name, match["version"])
        aliases = dict(client.get_registered_model(name).aliases or {})
    except MlflowException:
        return reference, None  # the loader reports a missing model, alias or version
    if is_variant(version):
        return reference, f"serving {name} v{version.version}, a variant named directly"
    number = str(version.version)
    alias = served_alias(number)
    if alias in aliases:
        try:
            variant = client.get_model_version(name, str(aliases[alias]))
            method = (variant.tags or {}).get(METHOD_TAG, "quantized")
        except MlflowException:
            method = "quantized"
        return (
            f"models:/{name}@{alias}",
            f"serving the {method} variant {name} v{aliases[alias]} of {name} v{number} "
            f"({reference}), which passed its quantization gate",
        )
    why = _why_no_variant(version)
    return reference, f"serving fp32 {name} v{number}: {why}"


def _why_no_variant(version: ModelVersion) -> str:
    raw = (version.tags or {}).get(SUMMARY_TAG)
    if not raw:
        return "it has not been quantized (run `stemma run quantize`)"
    try:
        document = json.loads(raw)
        variants = document.get("variants", {})
    except (ValueError, AttributeError):
        return "no quantized variant passed its gate"
    parts = []
    for method, outcome in variants.items():
        reasons = [r for r in outcome.get("reasons", []) if " > " in r or " < " in r]
        detail = "; ".join(reasons or outcome.get("reasons", [])[:1])
        parts.append(f"{method} {outcome.get('status')} ({detail})" if detail else method)
    return "no quantized variant passed its gate: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Logging a variant as a model


def model_requirements() -> list[str]:
    """pip requirements of a variant: the fp32 model's, plus torchao."""
    from stemma.components.platform.tracking import model_requirements as fp32_requirements

    return [*fp32_requirements(), f"torchao=={_torchao_version()}"]


def log_variant_model(
    *,
    variant: QuantizedNetwork,
    parent_files: Mapping[str, Any],
    parent: Mapping[str, str],
    input_example: pd.DataFrame,
    workdir: Path,
) -> tuple[Any, str]:
    """Log a variant as a pickle-free pyfunc model of the active run.

    The parent's ``preprocess.json`` is reused; ``network.json`` is the parent's with the
    method (:func:`variant_document`); the weights are the variant's. The model code is
    the same :mod:`.serving` file as the fp32 model's, and the signature the parent's.

    Returns:
        The logged model's info and the sha256 of its weights file.
    """
    import shutil

    import mlflow
    from mlflow.models import ModelSignature

    from stemma.components.platform.tracking import (
        MODEL_ARTIFACT_FILES,
        architecture_tags,
        record_model_files,
        serving_code_path,
    )

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {key: workdir / name for key, name in MODEL_ARTIFACT_FILES.items()}
    shutil.copyfile(parent_files["preprocess"], paths["preprocess"])
    document = variant_document(parent_files["document"], variant.method, variant.runtime, parent)
    paths["network"].write_text(json.dumps(document, indent=2, sort_keys=True))
    weights_sha256 = save_variant_weights(variant, paths["weights"])
    signature = ModelSignature.from_dict(dict(parent_files["signature"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name=f"variant-{variant.method.replace('_', '-')}",
            python_model=str(serving_code_path()),
            artifacts={key: str(path) for key, path in paths.items()},
            signature=signature,
            input_example=input_example.head(INPUT_EXAMPLE_ROWS).reset_index(drop=True),
            pip_requirements=model_requirements(),
            tags={
                "stemma.weights_sha256": weights_sha256,
                "stemma.task": str(document.get("task")),
                METHOD_TAG: variant.method,
                **architecture_tags(document.get("config") or {}),
            },
        )
    record_model_files(mlflow.MlflowClient(), info.model_id)
    return info, weights_sha256


# ---------------------------------------------------------------------------------------
# Reporting


def plot_tradeoff(comparison: Comparison, out_path: Path, *, title: str) -> Path:
    """Latency against metric drop, one point per measured model, with the gate drawn.

    The passing region is left of the maximum drop and below the latency the minimum
    speed-up allows (the fastest fp32 latency divided by it).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(7.0, 5.0), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    limit = comparison.baseline_ms / comparison.min_speedup
    measured = [v for v in comparison.variants if v.metric_drop is not None and v.latency_ms]
    drops = [0.0, comparison.max_metric_drop, *(v.metric_drop or 0.0 for v in measured)]
    left = min(drops) - 0.25 * (max(drops) - min(drops) or 1.0)
    # The passing region: small enough a drop, fast enough.
    axes.fill_between(
        [left, comparison.max_metric_drop], 0, limit, color="tab:green", alpha=0.08, zorder=0
    )
    # fp32 runtimes within 5% of each other share one label, so labels do not overlap.
    groups: list[list[tuple[str, float]]] = []
    for runtime, latency in sorted(comparison.parent_ms.items(), key=lambda item: item[1]):
        if groups and latency <= groups[-1][0][1] * 1.05:
            groups[-1].append((runtime, latency))
        else:
            groups.append([(runtime, latency)])
    for group in groups:
        names = [runtime for runtime, _ in group]
        baseline = comparison.baseline_runtime in names
        latency = group[0][1]
        axes.scatter(
            [0.0] * len(group),
            [ms for _, ms in group],
            color="black" if baseline else "grey",
            marker="s",
            zorder=3,
        )
        axes.annotate(
            "fp32 " + " / ".join(names) + (" (baseline)" if baseline else ""),
            (0.0, latency),
            textcoords="offset points",
            xytext=(8, 0),
            va="center",
            fontsize="small",
        )
    colours = {PASSED: "tab:green", REJECTED: "tab:red"}
    for variant in measured:
        point = (float(variant.metric_drop or 0.0), float(variant.latency_ms or 0.0))
        axes.scatter([point[0]], [point[1]], color=colours[variant.status], zorder=3)
        axes.annotate(
            f"{variant.method} ({variant.runtime}, {variant.speedup or 0.0:.2f}x)",
            point,
            textcoords="offset points",
            xytext=(8, 0),
            va="center",
            fontsize="small",
        )
    axes.axvline(
        comparison.max_metric_drop,
        color="tab:blue",
        linestyle="--",
        label=f"max {comparison.metric} drop {comparison.max_metric_drop:g}",
    )
    axes.axhline(
        limit,
        color="tab:orange",
        linestyle="--",
        label=f"min speed-up {comparison.min_speedup:g}x over fp32 ({limit:.3g} ms)",
    )
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.set_xlim(left=left)
    axes.set(
        xlabel=f"{comparison.metric} drop vs fp32 (right is worse)",
        ylabel=f"{comparison.clock} ms per forward pass of {comparison.batch_rows} rows (log)",
        title=title,
    )
    # Below the axes, where it never hides a point.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    figure.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


def build_quantize_record(
    *,
    pipeline: str,
    model_name: str,
    parent_version: str,
    parent_weights_sha256: str,
    heldout: HeldOut,
    root: Path,
    run_id: str,
    experiment_id: str,
    flow_run_id: str | None,
    comparison: Comparison,
    variant_weights: Mapping[str, str],
    created: datetime | None = None,
) -> dict[str, Any]:
    """The lineage record of a quantize run: parent and held-out rows in, variants out.

    Each registered variant is linked from the run (``produced``) and from its parent
    (``quantized_to``); the numbers of every variant, rejected ones too, are kept.
    """
    parent = model_node_id(model_name, parent_version)
    pointer = heldout.pointer(root)
    data = data_node_id(pointer, heldout.md5)
    run = run_node_id(run_id)
    nodes = [
        Node("model_version", parent, f"sha256:{parent_weights_sha256}", {"precision": "fp32"}),
        Node(
            "data_version",
            data,
            f"md5:{heldout.md5}",
            {
                "pointer": pointer,
                "path": heldout.file_path,
                "split": "test",
                "rows": comparison.rows,
            },
        ),
        Node("run", run, None, {"experiment_id": experiment_id, "flow_run_id": flow_run_id}),
    ]
    edges = [Edge(parent, run, "input_of"), Edge(data, run, "evaluated_on")]
    for variant in comparison.variants:
        if variant.version is None:
            continue
        node = model_node_id(model_name, variant.version)
        nodes.append(
            Node(
                "model_version",
                node,
                f"sha256:{variant_weights[variant.method]}",
                {"quantization": variant.method, "runtime": variant.runtime},
            )
        )
        edges += [Edge(run, node, "produced"), Edge(parent, node, "quantized_to")]
    return {
        "schema": RECORD_SCHEMA,
        "pipeline": pipeline,
        "flow": "quantize",
        "created": (created or datetime.now(UTC)).isoformat(),
        "nodes": [asdict(node) for node in nodes],
        "edges": [asdict(edge) for edge in edges],
        "variants": [asdict(variant) for variant in comparison.variants],
    }
