"""The standard latency probe: one model's latency and cost figures, the same way for all.

Every model version (at registration) and every variant in a comparison is timed here:
batches of 1, 64 and 4,096 rows (:data:`~stemma.components.spec.compress.PROBE_BATCH_SIZES`)
of real inputs, a warm-up, then repeats. Each call of ``Runtime.run`` is timed by the
wall clock (latency as a caller sees it) and by the process's CPU clock (what it costs:
ONNX Runtime and torch threads included), so that a figure measured on a busy machine
still prices the work done rather than the waiting.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stemma.components.runtime.backends import Runtime, session_threads
from stemma.components.spec.compress import PROBE_BATCH_SIZES, MachineSpec, cost_per_million

#: Timed calls per batch size; the largest batch gets fewer (see :func:`repeats_for`).
DEFAULT_REPEATS = 50
#: Rows timed at least per batch size, so that a batch of 1 is timed over enough calls.
MIN_ROWS_TIMED = 4096
#: Most calls per batch size, however small the batch.
MAX_CALLS = 400


@dataclass(frozen=True)
class BatchLatency:
    """How one batch size ran."""

    rows: int
    calls: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rows_per_s: float
    cpu_seconds_per_million: float
    wall_seconds_per_million: float


@dataclass(frozen=True)
class LatencyProfile:
    """A model's probe: latency per batch size, throughput and CPU time per million rows.

    ``throughput`` and the per-million figures are those of the largest batch, the way
    batch scoring runs a model.
    """

    backend: str
    device: str
    threads: int
    machine: str
    batches: tuple[BatchLatency, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def largest(self) -> BatchLatency:
        return max(self.batches, key=lambda batch: batch.rows)

    @property
    def rows_per_s(self) -> float:
        return self.largest.rows_per_s

    @property
    def cpu_seconds_per_million(self) -> float:
        return self.largest.cpu_seconds_per_million

    @property
    def wall_seconds_per_million(self) -> float:
        return self.largest.wall_seconds_per_million

    def at(self, rows: int) -> BatchLatency:
        """The figures of the batch of ``rows`` rows."""
        for batch in self.batches:
            if batch.rows == rows:
                return batch
        raise KeyError(f"no batch of {rows} rows was timed")

    def cost_per_million(self, machine: MachineSpec) -> float:
        """What a million predictions cost on ``machine`` (see ``spec.compress``)."""
        return cost_per_million(
            self.cpu_seconds_per_million, self.wall_seconds_per_million, machine
        )

    def percentiles(self, prefix: str = "") -> dict[str, float]:
        """``<prefix>p50_ms_b64``, ``<prefix>p95_ms_b64``, ... for every batch size timed."""
        return {
            f"{prefix}{name}_b{batch.rows}": float(getattr(batch, name))
            for batch in self.batches
            for name in ("p50_ms", "p95_ms", "p99_ms")
        }

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for MLflow: the percentiles, ``<prefix>rows_per_s``, CPU time."""
        values = self.percentiles(prefix)
        values[f"{prefix}rows_per_s"] = float(self.rows_per_s)
        values[f"{prefix}cpu_s_per_million"] = float(self.cpu_seconds_per_million)
        return values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LatencyProfile:
        return cls(
            backend=str(values["backend"]),
            device=str(values["device"]),
            threads=int(values["threads"]),
            machine=str(values["machine"]),
            batches=tuple(BatchLatency(**batch) for batch in values["batches"]),
            notes=tuple(values.get("notes") or ()),
        )


def machine_description() -> str:
    """What the figures were measured on: CPU model, cores, and the GPU when one is used."""
    cpu = _cpu_model() or platform.processor() or platform.machine() or "unknown CPU"
    text = f"{cpu}, {os.cpu_count() or '?'} cores, {platform.system()} {platform.machine()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # a broken CUDA setup is no reason to lose the figures
        pass
    return text


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return " ".join(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def repeats_for(rows: int, repeats: int = DEFAULT_REPEATS) -> int:
    """Timed calls for a batch of ``rows``: ``repeats``, more for small batches."""
    return max(repeats, min(MAX_CALLS, -(-MIN_ROWS_TIMED // rows)))


def probe_batch(x: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` rows of real inputs: ``x`` repeated as often as needed."""
    if len(x) == 0:
        raise ValueError("the probe needs at least one row of inputs")
    index = np.arange(rows) % len(x)
    return np.ascontiguousarray(x[index], dtype=np.float32)


def probe_runtimes(
    runtimes: Mapping[str, Runtime],
    x: np.ndarray,
    *,
    batch_sizes: Sequence[int] = PROBE_BATCH_SIZES,
    warmup: int = 3,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, LatencyProfile]:
    """Probe several runtimes on the same rows, interleaved call by call.

    Every round runs each runtime once in turn, so that a burst of load on a shared
    machine slows all of them alike and their ratios stay fair.

    Args:
        runtimes: the models to time, by key.
        x: preprocessed inputs, ``(rows, width)``; repeated to fill the larger batches.
        batch_sizes: rows per call.
        warmup: untimed calls per runtime and batch size.
        repeats: timed calls per batch size (small batches get more, see
            :func:`repeats_for`).

    Raises:
        ValueError: ``x`` has no rows.
    """
    samples: dict[str, dict[int, tuple[list[float], list[float]]]] = {key: {} for key in runtimes}
    for rows in batch_sizes:
        batch = probe_batch(x, rows)
        for runtime in runtimes.values():
            for _ in range(max(warmup, 1)):
                runtime.run(batch)
        calls = repeats_for(rows, repeats)
        for key in runtimes:
            samples[key][rows] = ([], [])
        for _ in range(calls):
            for key, runtime in runtimes.items():
                wall, cpu = time.perf_counter(), time.process_time()
                runtime.run(batch)
                cpu_spent, wall_spent = time.process_time() - cpu, time.perf_counter() - wall
                samples[key][rows][0].append(wall_spent)
                samples[key][rows][1].append(cpu_spent)
    machine = machine_description()
    threads = session_threads()
    return {
        key: LatencyProfile(
            backend=runtime.backend,
            device=runtime.device,
            threads=threads,
            machine=machine,
            batches=tuple(_batch_figures(rows, *samples[key][rows]) for rows in batch_sizes),
        )
        for key, runtime in runtimes.items()
    }


def probe_runtime(runtime: Runtime, x: np.ndarray, **options: Any) -> LatencyProfile:
    """:func:`probe_runtimes` for one runtime."""
    return probe_runtimes({"model": runtime}, x, **options)["model"]


def _batch_figures(rows: int, walls: list[float], cpus: list[float]) -> BatchLatency:
    ordered = np.asarray(walls, dtype=np.float64) * 1000.0
    p50, p95, p99 = (float(np.percentile(ordered, q)) for q in (50, 95, 99))
    median_wall = statistics.median(walls)
    # The CPU clock ticks coarsely on some systems: the total over all calls, not a median.
    cpu_per_row = sum(cpus) / (rows * len(cpus))
    wall_per_row = sum(walls) / (rows * len(walls))
    return BatchLatency(
        rows=rows,
        calls=len(walls),
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        rows_per_s=rows / median_wall if median_wall > 0 else float("inf"),
        cpu_seconds_per_million=cpu_per_row * 1e6,
        wall_seconds_per_million=wall_per_row * 1e6,
    )
