"""Measuring variants against their fp32 parent, every run through the model runtime.

:func:`compare_variants` builds each variant a spec's ``quantize`` section lists and
measures it against the fp32 network in the same process: the gate's metric on the
held-out rows the parent was gated on, how often the two agree on the decision, the
difference of their scores, and the latency of one run of a batch of held-out rows. The
fp32 network is timed on both runtime backends (eager, and ONNX Runtime on its exported
graph); the fastest is the baseline. torchao variants run on the eager backend, ONNX
Runtime variants on ONNX Runtime with their own graph. All are timed in interleaved
rounds, so that a burst of load slows every model alike; with one thread a run is timed
by the process's CPU time, which other processes cannot inflate.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import nn

from stemma.components.errors import DataError
from stemma.components.model.artifact import save_weights
from stemma.components.model.onnx_graph import ONNX_FILE, export_onnx
from stemma.components.model.quantized import (
    EAGER,
    ONNXRUNTIME,
    ORT_METHODS,
    QuantizedNetwork,
    brief,
    quiet_torchao,
    save_variant_weights,
)
from stemma.components.quantization.methods import (
    VariantBuildError,
    VariantUnavailable,
    build_ort_variant,
    build_variant,
)
from stemma.components.quantization.results import (
    FAILED,
    PASSED,
    REJECTED,
    SKIPPED,
    Comparison,
    VariantResult,
    decide_variant,
)
from stemma.components.runtime.backends import Runtime, build_runtime, session_threads
from stemma.components.runtime.probe import probe_batch
from stemma.components.spec import METRIC_DIRECTIONS, CompressSpec, QuantizeSpec

if TYPE_CHECKING:
    from stemma.components.model.preprocessing import Preprocessor

#: The fp32 parent's latency must be finite and positive to divide by; below this it is noise.
MIN_LATENCY_MS = 1e-6
#: Key of the fp32 network's runtimes in the timing rounds.
FP32 = "fp32"


@dataclass(frozen=True)
class _Measured:
    """A variant that was built and ran on the held-out rows."""

    variant: QuantizedNetwork
    runtime: Runtime
    scores: np.ndarray
    size_bytes: int


def latency_clock(threads: int) -> tuple[str, Callable[[], float]]:
    """The clock a run is timed with, by name.

    With one thread, the process's CPU time: the run happens on the calling thread, and
    other processes on a busy machine cannot inflate it. With more threads, wall-clock
    time, since CPU time then adds the threads up.
    """
    return ("cpu", time.process_time) if threads == 1 else ("wall", time.perf_counter)


def time_runtimes(
    runtimes: dict[str, Runtime],
    batch: np.ndarray,
    *,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms per ``run(batch)`` of each runtime by ``clock``, in interleaved rounds.

    Each runtime runs ``warmup`` times first; then every round runs each once, in turn,
    so that a burst of load slows all of them alike.

    Returns:
        ``(median ms by key, error by key)``; a runtime that raised is left out of the
        medians and its error given instead.
    """
    errors: dict[str, str] = {}
    live: dict[str, Runtime] = {}
    for key, runtime in runtimes.items():
        try:
            for _ in range(max(warmup, 1)):
                runtime.run(batch)
        except Exception as error:  # a variant or backend that fails: report it
            errors[key] = brief(error)
            continue
        live[key] = runtime
    samples: dict[str, list[float]] = {key: [] for key in live}
    for _ in range(repeats):
        for key, runtime in live.items():
            started = clock()
            runtime.run(batch)
            samples[key].append(clock() - started)
    medians = {key: statistics.median(values) * 1000.0 for key, values in samples.items()}
    return medians, errors


def scores(runtime: Runtime, x: np.ndarray, preprocessor: Preprocessor) -> np.ndarray:
    """The decoded scores of the held-out rows, run through ``runtime``: one per row, or a
    multiclass model's ``(rows, classes)`` probabilities."""
    raw = runtime.run(x)
    decoded = np.asarray(preprocessor.decode_output(raw), dtype=np.float64)
    if preprocessor.task == "multiclass":
        return decoded.reshape(len(x), preprocessor.n_outputs)
    return decoded.reshape(len(x))


def heldout_labels(preprocessor: Preprocessor, labels: pd.Series, column: str) -> np.ndarray:
    """The held-out rows' labels as the metrics take them: a classifier's class codes
    through its label map (every held-out label was a training class), a regression's
    values.

    Raises:
        DataError: a label that is no class of the model, or is missing.
    """
    if preprocessor.task == "multiclass" or preprocessor.labels is not None:
        return preprocessor.known_codes(labels, column).astype(np.float64)
    return labels.to_numpy(dtype=np.float64)


def decisions_agree(
    task: str, found: np.ndarray, reference: np.ndarray, threshold: float
) -> float | None:
    """Share of rows on which a variant decides as its parent: the same side of the
    threshold (binary), the same class (multiclass); None for regression."""
    if task == "binary":
        return float(np.mean((found >= threshold) == (reference >= threshold)))
    if task == "multiclass":
        return float(np.mean(found.argmax(axis=1) == reference.argmax(axis=1)))
    return None


def variant_runtime(variant: QuantizedNetwork, width: int) -> Runtime:
    """The runtime a variant is measured and served on: ONNX Runtime on its own graph for
    an ONNX Runtime method, else eager."""
    if variant.method in ORT_METHODS:
        return build_runtime(variant, width=width, onnx_file=variant.onnx_file, backend=ONNXRUNTIME)
    return build_runtime(variant, width=width, backend=EAGER)


def parent_runtimes(
    network: nn.Module, width: int, folder: Path
) -> tuple[dict[str, Runtime], Path | None, str | None]:
    """The fp32 network on eager and, when it exports, on ONNX Runtime.

    Returns:
        ``(runtime by backend, the exported graph or None, why there is none)``.
    """
    runtimes: dict[str, Runtime] = {EAGER: build_runtime(network, width=width, backend=EAGER)}
    report = export_onnx(network, width, folder / ONNX_FILE)
    if not report.exported:
        return runtimes, None, report.reason or "it did not export"
    onnx_file = folder / ONNX_FILE
    try:
        runtimes[ONNXRUNTIME] = build_runtime(
            network, width=width, onnx_file=onnx_file, backend=ONNXRUNTIME
        )
    except Exception as error:  # OnnxFileError: measured eager only, and said why
        return runtimes, None, f"ONNX Runtime cannot run it: {brief(error)}"
    return runtimes, onnx_file, None


def _build_all(
    network: nn.Module,
    methods: list[str],
    *,
    fp32_onnx: Path | None,
    no_graph: str | None,
    workdir: Path,
    x: np.ndarray,
    preprocessor: Preprocessor,
) -> tuple[dict[str, VariantResult], dict[str, _Measured]]:
    """Every method built, its runtime and its scores on the held-out rows, saved to size
    it; one that cannot be is ``failed`` or ``skipped``."""
    results: dict[str, VariantResult] = {}
    measured: dict[str, _Measured] = {}
    with quiet_torchao():
        for method in methods:
            folder = workdir / method
            try:
                if method in ORT_METHODS and fp32_onnx is None:
                    raise VariantBuildError(f"the fp32 network has no ONNX graph: {no_graph}")
                if method in ORT_METHODS:
                    variant = build_ort_variant(network, method, fp32_onnx, folder)
                    size = variant.onnx_file.stat().st_size if variant.onnx_file else 0
                else:
                    variant = build_variant(network, method)
                    weights = folder / "weights.safetensors"
                    save_variant_weights(variant, weights)
                    size = weights.stat().st_size
                runtime = variant_runtime(variant, x.shape[1])
                found = scores(runtime, x, preprocessor)
                if not np.isfinite(found).all():
                    raise VariantBuildError("its scores on the held-out rows are not all finite")
            except VariantUnavailable as error:
                results[method] = VariantResult(method, SKIPPED, (str(error),))
                continue
            except VariantBuildError as error:
                results[method] = VariantResult(method, FAILED, (str(error),))
                continue
            except Exception as error:  # running or saving a variant can fail in many ways
                results[method] = VariantResult(method, FAILED, (f"cannot run it: {brief(error)}",))
                continue
            measured[method] = _Measured(variant, runtime, found, size)
            results[method] = VariantResult(
                method, REJECTED, (), runtime=runtime.backend, size_bytes=size
            )
    return results, measured


@dataclass(frozen=True)
class ParentReference:
    """The fp32 side of every decision: the parent's metric and scores on the rows."""

    task: str
    metric: str
    threshold: float
    value: float
    scores: np.ndarray

    @property
    def higher_is_better(self) -> bool:
        return METRIC_DIRECTIONS[self.task][self.metric]

    def decide(
        self,
        found: np.ndarray,
        y: np.ndarray,
        speedup: float,
        settings: QuantizeSpec | CompressSpec,
    ) -> tuple[bool, tuple[str, ...], dict[str, Any]]:
        """The gate on a variant whose scores on the held-out rows (labels ``y``) are
        ``found``, at ``speedup`` over the parent: whether it passes, the reasons, and the
        numbers its result records (``value``, ``metric_drop``, ``agreement``,
        ``mean_abs_diff``, ``speedup``)."""
        from stemma.components.training.metrics import evaluate_scores

        value = float(evaluate_scores(self.task, y, found, self.threshold)[self.metric])
        passed, drop, reasons = decide_variant(
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            parent_value=self.value,
            value=value,
            speedup=speedup,
            max_metric_drop=settings.metric_drop(self.metric),
            min_speedup=settings.min_speedup,
        )
        numbers = {
            "value": value,
            "metric_drop": drop,
            "agreement": decisions_agree(self.task, found, self.scores, self.threshold),
            "mean_abs_diff": float(np.abs(found - self.scores).mean()),
            "speedup": speedup,
        }
        return passed, reasons, numbers


def _parent_reference(
    runtime: Runtime,
    x: np.ndarray,
    y: np.ndarray,
    preprocessor: Preprocessor,
    task: str,
    metric: str,
    threshold: float,
) -> ParentReference:
    """The fp32 model's metric and scores on the held-out rows (eager, as its gate ran)."""
    from stemma.components.training.metrics import evaluate_scores

    parent_scores = scores(runtime, x, preprocessor)
    value = float(evaluate_scores(task, y, parent_scores, threshold)[metric])
    if not math.isfinite(value):
        raise DataError(
            f"the fp32 model's {metric} on the held-out rows is {value}: nothing to compare with"
        )
    return ParentReference(task, metric, threshold, value, parent_scores)


@dataclass(frozen=True)
class _Timed:
    """Median latency (ms) of every runtime timed, by key, and the error of each that failed."""

    medians: dict[str, float]
    errors: dict[str, str]
    clock: str
    threads: int

    def fp32(
        self, backends: list[str], batch_rows: int, no_graph: str | None
    ) -> tuple[dict[str, float], list[str]]:
        """The fp32 latency by backend, and a note for each backend missing or failed."""
        keys = {backend: f"{FP32}/{backend}" for backend in backends}
        parent_ms = {b: self.medians[k] for b, k in keys.items() if k in self.medians}
        if EAGER not in parent_ms:
            raise DataError(
                f"the fp32 model failed to run on a batch of {batch_rows} rows",
                [self.errors.get(keys[EAGER], "unknown error")],
            )
        notes = [f"fp32 has no ONNX graph, timed eager only: {no_graph}"] if no_graph else []
        notes += [
            f"fp32 {b} could not run: {e}" for b, k in keys.items() if (e := self.errors.get(k))
        ]
        return parent_ms, notes


def _time_all(
    fp32: dict[str, Runtime],
    measured: dict[str, _Measured],
    batch: np.ndarray,
    settings: QuantizeSpec,
) -> _Timed:
    """The fp32 runtimes and every built variant, timed in the same interleaved rounds."""
    threads = session_threads()
    clock_name, clock = latency_clock(threads)
    runtimes = {f"{FP32}/{backend}": runtime for backend, runtime in fp32.items()}
    runtimes.update({method: built.runtime for method, built in measured.items()})
    medians, errors = time_runtimes(
        runtimes, batch, warmup=settings.warmup, repeats=settings.repeats, clock=clock
    )
    return _Timed(medians, errors, clock_name, threads)


def _decided(
    result: VariantResult,
    found: np.ndarray,
    timed: _Timed,
    *,
    y: np.ndarray,
    reference: ParentReference,
    baseline_ms: float,
    batch_rows: int,
    settings: QuantizeSpec,
) -> VariantResult:
    """A measured variant's numbers and the gate's decision on them."""
    if result.method in timed.errors:
        reason = f"failed on a batch of {batch_rows} rows: {timed.errors[result.method]}"
        return replace(result, status=FAILED, reasons=(reason,))
    latency = timed.medians[result.method]
    speedup = baseline_ms / max(latency, MIN_LATENCY_MS)
    passed, reasons, numbers = reference.decide(found, y, speedup, settings)
    return replace(
        result,
        status=PASSED if passed else REJECTED,
        reasons=reasons,
        **numbers,
        max_abs_diff=float(np.abs(found - reference.scores).max()),
        latency_ms=latency,
        rows_per_second=batch_rows / latency * 1000.0,
    )


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
) -> tuple[Comparison, dict[str, QuantizedNetwork]]:
    """Build every variant the settings list and measure each against the fp32 network.

    ``x_heldout``/``y_heldout`` are the encoded held-out rows and their labels; ``task``,
    ``metric`` and ``threshold`` the gate's; ``batch_rows`` the rows of a timed run; the
    fp32 graph and each variant's files are written under ``workdir``. A variant that
    cannot be built or run is ``failed``, one that cannot run here ``skipped``; neither
    stops the others. Latency is measured with the threads the process runs with
    (:func:`.backends.set_threads`).

    Returns:
        The comparison, and the networks of the variants that were measured (an ONNX
        Runtime variant's holds its graph in ``onnx_file``).

    Raises:
        DataError: the fp32 model's own metric is not finite, or it failed to run.
    """
    workdir = Path(workdir)
    parent_weights = workdir / FP32 / "weights.safetensors"
    save_weights(network, parent_weights)
    fp32, fp32_onnx, no_graph = parent_runtimes(network.eval(), x_heldout.shape[1], workdir / FP32)
    gate = (task, metric, threshold)
    reference = _parent_reference(fp32[EAGER], x_heldout, y_heldout, preprocessor, *gate)
    results, measured = _build_all(
        network,
        list(settings.methods),
        fp32_onnx=fp32_onnx,
        no_graph=no_graph,
        workdir=workdir,
        x=x_heldout,
        preprocessor=preprocessor,
    )
    timed = _time_all(fp32, measured, probe_batch(x_heldout, batch_rows), settings)
    parent_ms, notes = timed.fp32(list(fp32), batch_rows, no_graph)
    baseline = min(parent_ms, key=lambda backend: parent_ms[backend])
    baseline_ms = max(parent_ms[baseline], MIN_LATENCY_MS)
    for method, built in measured.items():
        results[method] = _decided(
            results[method],
            built.scores,
            timed,
            y=y_heldout,
            reference=reference,
            baseline_ms=baseline_ms,
            batch_rows=batch_rows,
            settings=settings,
        )
    comparison = Comparison(
        metric=metric,
        higher_is_better=reference.higher_is_better,
        parent_value=reference.value,
        parent_ms=parent_ms,
        baseline_runtime=baseline,
        baseline_ms=baseline_ms,
        parent_size_bytes=parent_weights.stat().st_size,
        rows=len(x_heldout),
        batch_rows=batch_rows,
        repeats=settings.repeats,
        warmup=settings.warmup,
        threads=timed.threads,
        max_metric_drop=settings.metric_drop(metric).limit(reference.value),
        min_speedup=settings.min_speedup,
        variants=tuple(results[method] for method in settings.methods),
        notes=tuple(notes),
        clock=timed.clock,
        metric_drop_limit=settings.metric_drop(metric).describe(reference.value),
    )
    return comparison, {m: b.variant for m, b in measured.items() if results[m].status != FAILED}
