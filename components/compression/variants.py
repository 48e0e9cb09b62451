"""Pruned and distilled candidates measured against their parent, and the gate on them.

Every network, the parent on each fp32 backend and each candidate on the backend it will
be served with (ONNX Runtime on its own export when it exports, else eager), runs through
the one model runtime on the parent's held-out rows and is timed by the standard probe
(:mod:`stemma.components.runtime.probe`) in the same interleaved rounds. A candidate passes
when its metric drop is within the limit, its speed-up over the parent's fastest fp32
backend and its cost reduction are at least the spec's minimums; a number that cannot be
trusted fails closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from stemma.components.errors import DataError
from stemma.components.model.onnx_graph import ONNX_FILE
from stemma.components.model.preprocessing import Preprocessor
from stemma.components.model.quantized import brief
from stemma.components.quantization.measure import (
    ParentReference,
    parent_runtimes,
    scores,
)
from stemma.components.quantization.results import FAILED, PASSED, REJECTED
from stemma.components.runtime.backends import Runtime
from stemma.components.runtime.probe import LatencyProfile, probe_runtimes
from stemma.components.spec.compress import CompressSpec, MachineSpec

#: Key of the parent's runtimes among the probed ones: ``fp32/eager``, ``fp32/onnxruntime``.
FP32 = "fp32"


def parameter_count(network: nn.Module) -> int:
    """Number of parameters (weights and biases) of a network."""
    return int(sum(parameter.numel() for parameter in network.parameters()))


@dataclass(frozen=True)
class Candidate:
    """A compressed network, before it is measured.

    Attributes:
        method: ``prune`` or ``distill``.
        network: the dense fp32 network (CPU, eval mode).
        config: what ``networks.build_network`` rebuilds it from.
        details: what made it (layers pruned, epochs, rows), for the record.
        notes: what the reader should know.
    """

    method: str
    network: nn.Module
    config: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def parameters(self) -> int:
        return parameter_count(self.network)


@dataclass(frozen=True)
class CandidateResult:
    """How a candidate compares with its parent, and the gate's decision."""

    method: str
    status: str
    reasons: tuple[str, ...]
    parameters: int
    value: float | None = None
    metric_drop: float | None = None
    agreement: float | None = None
    mean_abs_diff: float | None = None
    runtime: str | None = None
    speedup: float | None = None
    cost_per_million: float | None = None
    cost_ratio: float | None = None
    size_bytes: int | None = None
    profile: dict[str, Any] | None = None
    version: str | None = None
    notes: tuple[str, ...] = ()
    #: The version was registered by an earlier run with these very weights.
    existing: bool = False

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class Measured:
    """A candidate on its runtime, with the raw outputs it gave on the held-out rows."""

    candidate: Candidate
    runtime: Runtime
    outputs: np.ndarray


@dataclass(frozen=True)
class CompressComparison:
    """The parent and every candidate, on the same rows and the same probe."""

    metric: str
    higher_is_better: bool
    parent_value: float
    parent_parameters: int
    parent_profiles: dict[str, dict[str, Any]]
    baseline_runtime: str
    parent_cost_per_million: float
    rows: int
    machine: str
    currency: str
    metric_drop_limit: str
    min_speedup: float
    min_cost_reduction: float
    candidates: tuple[CandidateResult, ...]
    notes: tuple[str, ...] = ()

    def table(self) -> list[dict[str, Any]]:
        """The parent's backends, then each candidate, as rows of one table."""
        rows = []
        for backend, values in self.parent_profiles.items():
            profile = LatencyProfile.from_dict(values)
            rows.append(
                self._row(
                    f"fp32 ({backend})",
                    "baseline" if backend == self.baseline_runtime else "reference",
                    profile,
                    value=self.parent_value,
                    metric_drop=0.0,
                    parameters=self.parent_parameters,
                    runtime=backend,
                )
            )
        for result in self.candidates:
            profile = LatencyProfile.from_dict(result.profile) if result.profile else None
            rows.append(
                self._row(
                    result.method,
                    result.status,
                    profile,
                    value=result.value,
                    metric_drop=result.metric_drop,
                    parameters=result.parameters,
                    runtime=result.runtime,
                    speedup=result.speedup,
                    cost_per_million=result.cost_per_million,
                    version=result.version,
                    reasons="; ".join(result.reasons),
                )
            )
        return rows

    def _row(
        self, model: str, status: str, profile: LatencyProfile | None, **values: Any
    ) -> dict[str, Any]:
        latency: dict[str, Any] = {}
        if profile is not None:
            latency.update(profile.percentiles())
            latency["rows_per_s"] = profile.rows_per_s
            latency["cpu_s_per_million"] = profile.cpu_seconds_per_million
        return {
            "model": model,
            "status": status,
            self.metric: values.pop("value"),
            "metric_drop": values.pop("metric_drop"),
            "parameters": values.pop("parameters"),
            **latency,
            **values,
        }

    def metrics(self) -> dict[str, float]:
        """Numbers for MLflow: ``<method>.<measure>``, ``fp32.<measure>`` for the parent."""
        out: dict[str, float] = {
            f"fp32.{self.metric}": self.parent_value,
            "fp32.parameters": float(self.parent_parameters),
            "fp32.cost_per_million": self.parent_cost_per_million,
        }
        for result in self.candidates:
            prefix = f"{result.method}."
            out[prefix + "passed"] = 1.0 if result.passed else 0.0
            for name in (
                "value",
                "metric_drop",
                "parameters",
                "speedup",
                "cost_per_million",
                "cost_ratio",
                "size_bytes",
            ):
                number = getattr(result, name)
                if number is not None:
                    out[prefix + (self.metric if name == "value" else name)] = float(number)
            if result.profile:
                out.update(LatencyProfile.from_dict(result.profile).metrics(prefix))
        return out

    def with_result(self, result: CandidateResult) -> CompressComparison:
        """The comparison with ``result`` in place of the candidate of the same method."""
        updated = tuple(result if r.method == result.method else r for r in self.candidates)
        return replace(self, candidates=updated)


def served_runtime(network: nn.Module, width: int, folder: Path) -> tuple[Runtime, str | None]:
    """The runtime a registered fp32 network is served with: ONNX Runtime on its export when
    it exports and runs, else eager (with the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    runtimes, _, reason = parent_runtimes(network, width, folder)
    return runtimes.get("onnxruntime", runtimes["eager"]), reason


def measure_candidates(
    parent: nn.Module,
    candidates: list[Candidate],
    *,
    x: np.ndarray,
    y: np.ndarray,
    preprocessor: Preprocessor,
    task: str,
    metric: str,
    threshold: float,
    settings: CompressSpec,
    machine: MachineSpec,
    currency: str,
    workdir: Path,
) -> tuple[CompressComparison, dict[str, Measured]]:
    """Measure the parent and every candidate, and decide each candidate.

    Returns:
        The comparison, and each measured candidate by method (for registration).

    Raises:
        DataError: the parent's metric on the held-out rows is not finite.
    """
    from stemma.components.training.metrics import evaluate_scores

    width = x.shape[1]
    (workdir / FP32).mkdir(parents=True, exist_ok=True)
    fp32, _, no_graph = parent_runtimes(parent, width, workdir / FP32)
    parent_scores = scores(fp32["eager"], x, preprocessor)
    parent_value = float(evaluate_scores(task, y, parent_scores, threshold)[metric])
    if not math.isfinite(parent_value):
        raise DataError(f"the parent's {metric} on the held-out rows is {parent_value}")
    results, measured = _run_candidates(candidates, x, workdir)
    runtimes = {f"{FP32}/{backend}": runtime for backend, runtime in fp32.items()}
    probed = probe_runtimes({**runtimes, **{m: item.runtime for m, item in measured.items()}}, x)
    parent_profiles = {k.partition("/")[2]: p for k, p in probed.items() if k.startswith(FP32)}
    baseline = min(parent_profiles, key=lambda b: parent_profiles[b].cpu_seconds_per_million)
    reference = _Reference(
        task=task,
        metric=metric,
        threshold=threshold,
        value=parent_value,
        scores=parent_scores,
        profile=parent_profiles[baseline],
        cost=parent_profiles[baseline].cost_per_million(machine),
    )
    for method, item in measured.items():
        results[method] = _decided(
            results[method],
            item,
            probed[method],
            reference,
            y,
            preprocessor,
            settings,
            machine=machine,
            currency=currency,
        )
    comparison = CompressComparison(
        metric=metric,
        higher_is_better=reference.higher_is_better,
        parent_value=parent_value,
        parent_parameters=parameter_count(parent),
        parent_profiles={b: p.to_dict() for b, p in parent_profiles.items()},
        baseline_runtime=baseline,
        parent_cost_per_million=reference.cost,
        rows=len(x),
        machine=reference.profile.machine,
        currency=currency,
        metric_drop_limit=settings.metric_drop(metric).describe(parent_value),
        min_speedup=settings.min_speedup,
        min_cost_reduction=settings.min_cost_reduction,
        candidates=tuple(results[c.method] for c in candidates),
        notes=(f"fp32 has no ONNX graph, probed eager only: {no_graph}",) if no_graph else (),
    )
    return comparison, measured


@dataclass(frozen=True)
class _Reference(ParentReference):
    """The parent's side of every decision, with its probe and its cost."""

    profile: LatencyProfile
    cost: float


def _run_candidates(
    candidates: list[Candidate], x: np.ndarray, workdir: Path
) -> tuple[dict[str, CandidateResult], dict[str, Measured]]:
    """Each candidate on the runtime it would be served with, run on the held-out rows; one
    that cannot run is ``failed`` and left out of the measurement."""
    results: dict[str, CandidateResult] = {}
    measured: dict[str, Measured] = {}
    for candidate in candidates:
        method = candidate.method
        try:
            runtime, reason = served_runtime(candidate.network, x.shape[1], workdir / method)
            outputs = runtime.run(x)
            if not np.isfinite(outputs).all():
                raise ValueError("its outputs on the held-out rows are not all finite")
        except Exception as error:  # a candidate that cannot run is reported, not registered
            results[method] = CandidateResult(
                method, FAILED, (f"cannot run it: {brief(error)}",), candidate.parameters
            )
            continue
        extra = (f"served by eager: {reason}",) if reason else ()
        measured[method] = Measured(candidate, runtime, outputs)
        results[method] = CandidateResult(
            method,
            REJECTED,
            (),
            candidate.parameters,
            runtime=runtime.backend,
            size_bytes=_size(workdir / method, candidate.network),
            notes=candidate.notes + extra,
        )
    return results, measured


def _decided(
    result: CandidateResult,
    item: Measured,
    profile: LatencyProfile,
    reference: _Reference,
    y: np.ndarray,
    preprocessor: Preprocessor,
    settings: CompressSpec,
    *,
    machine: MachineSpec,
    currency: str,
) -> CandidateResult:
    """A measured candidate's numbers and the gate's decision on them: metric drop,
    speed-up over the parent's fastest backend (CPU time per row at the largest batch),
    and cost reduction."""
    found = np.asarray(preprocessor.decode_output(item.outputs), dtype=np.float64)
    found = found.reshape(len(found), -1) if reference.task == "multiclass" else found.reshape(-1)
    speedup = reference.profile.cpu_seconds_per_million / max(
        profile.cpu_seconds_per_million, 1e-12
    )
    passed, reasons, numbers = reference.decide(found, y, speedup, settings)
    cost = profile.cost_per_million(machine)
    ratio = cost / reference.cost if reference.cost > 0 else math.inf
    cost_ok = math.isfinite(ratio) and (1.0 - ratio) >= settings.min_cost_reduction
    reasons += (
        f"cost {cost:.4g} {currency} per million predictions = {ratio:.2f}x fp32's "
        f"{reference.cost:.4g} ({'>=' if cost_ok else '<'} min reduction "
        f"{settings.min_cost_reduction:.0%})",
    )
    return replace(
        result,
        status=PASSED if passed and cost_ok else REJECTED,
        reasons=reasons,
        **numbers,
        cost_per_million=cost,
        cost_ratio=ratio,
        profile=profile.to_dict(),
    )


def _size(folder: Path, network: nn.Module) -> int:
    """Bytes the candidate takes on disk: its ONNX graph when it exported, else its weights
    as float32."""
    graph = folder / ONNX_FILE
    if graph.exists():
        return graph.stat().st_size
    return parameter_count(network) * 4
