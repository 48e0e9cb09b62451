"""What a comparison of variants found, and the gate that decides each variant."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from stemma.components.spec.limits import MetricDrop, describe_drop

#: Outcomes of a variant.
PASSED, REJECTED, FAILED, SKIPPED = "passed", "rejected", "failed", "skipped"
#: Decimals shown for metric values in reasons.
SHOWN_DECIMALS = 4


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
        runtime: the runtime backend it runs on (``eager`` or ``onnxruntime``).
        latency_ms: the latency of one run of the timing batch.
        speedup: the fastest fp32 latency divided by ``latency_ms``.
        rows_per_second: batch rows over ``latency_ms``.
        size_bytes: the variant's weights file (its ONNX graph for ONNX Runtime methods).
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
    runtime: str | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    rows_per_second: float | None = None
    size_bytes: int | None = None
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
        parent_ms: fp32 latency by runtime backend (``eager``, ``onnxruntime``).
        baseline_runtime: the fastest fp32 backend; ``baseline_ms`` its latency.
        parent_size_bytes: the fp32 weights file.
        rows: held-out rows the metrics were computed on.
        batch_rows, repeats, warmup, threads: how latency was measured.
        clock: ``cpu`` (the process's CPU time, with one thread) or ``wall``.
        max_metric_drop, min_speedup: the gate's bounds (the drop in the metric's units).
        variants: one result per method the spec lists, in its order.
        notes: what the reader should know about the measurement (an fp32 backend that
            could not run).
        metric_drop_limit: the drop's bound as the spec gave it and in the metric's units
            (``1% = 0.6510``, ``0.005 = 0.59%``).
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
    metric_drop_limit: str = ""

    def table(self) -> list[dict[str, Any]]:
        """The comparison as rows (fp32 backends first, then each variant), for a table."""
        rows: list[dict[str, Any]] = []
        for runtime, latency in self.parent_ms.items():
            status = "baseline" if runtime == self.baseline_runtime else "reference"
            fp32 = VariantResult("fp32", status, (), self.parent_value, 0.0, 1.0, 0.0)
            rows.append(
                self._row(
                    f"fp32 ({runtime})",
                    replace(fp32, runtime=runtime, latency_ms=latency),
                    speedup=self.baseline_ms / latency,
                    rows_per_second=self.batch_rows / latency * 1000.0,
                    size_bytes=self.parent_size_bytes,
                )
            )
        for variant in self.variants:
            rows.append(
                self._row(
                    variant.method,
                    variant,
                    speedup=variant.speedup,
                    rows_per_second=variant.rows_per_second,
                    size_bytes=variant.size_bytes,
                )
            )
        return rows

    def _row(self, model: str, result: VariantResult, **numbers: Any) -> dict[str, Any]:
        return {
            "model": model,
            "method": result.method,
            "status": result.status,
            self.metric: result.value,
            "metric_drop": result.metric_drop,
            "agreement": result.agreement,
            "mean_abs_score_diff": result.mean_abs_diff,
            "latency_ms": result.latency_ms,
            **numbers,
            "runtime": result.runtime,
            "version": result.version,
            "reasons": "; ".join(result.reasons),
        }

    def metrics(self) -> dict[str, float]:
        """Numbers for MLflow (the quantize run logs them under ``quantize/``):
        ``<method>.<measure>``, and ``fp32.<measure>`` for the parent."""
        out: dict[str, float] = {f"fp32.{self.metric}": self.parent_value}
        for runtime, latency in self.parent_ms.items():
            out[f"fp32.{runtime}_ms"] = latency
        out["fp32.size_bytes"] = float(self.parent_size_bytes)
        for variant in self.variants:
            prefix = f"{variant.method}."
            out[prefix + "passed"] = 1.0 if variant.passed else 0.0
            for name, value in (
                (self.metric, variant.value),
                ("metric_drop", variant.metric_drop),
                ("agreement", variant.agreement),
                ("mean_abs_score_diff", variant.mean_abs_diff),
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
    max_metric_drop: MetricDrop,
    min_speedup: float,
) -> tuple[bool, float, tuple[str, ...]]:
    """Does a variant pass: metric drop at most ``max_metric_drop`` (of the parent's value
    when relative) and speed-up at least ``min_speedup``? Both checks are always reported,
    the drop's limit in both forms; a non-finite number fails closed.

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
        ok = drop <= max_metric_drop.limit(parent_value)
        passed &= ok
        moved = describe_drop(metric, drop, parent_value, higher_is_better=higher_is_better)
        reasons.append(
            f"{moved}, limit {max_metric_drop.describe(parent_value)}: "
            f"{'within' if ok else 'over'} ({metric} {_shown(value)} vs fp32 "
            f"{_shown(parent_value)})"
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
