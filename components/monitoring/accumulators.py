"""Counts of a batch's columns against a reference profile, added chunk by chunk.

Memory is bounded by the chunk whatever the batch's size, and the statistics are those of
the whole batch. Per numeric column and chunk the work is one sort of the chunk and one
binary search per distinct reference value: the counts of the batch below and at every
point of the reference sample are additive over chunks and are all the KS statistic
needs. The KS statistic and p-value equal ``scipy.stats.ks_2samp(sample, batch)``: scipy
computes them itself while the batch is small enough for its exact method, and beyond
that its asymptotic p-value is applied to the statistic from the counts.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stemma.components.evaluation.statistics import ks_pvalue, ks_test
from stemma.components.monitoring.profile import (
    CategoricalProfile,
    ColumnProfile,
    NumericProfile,
    bin_counts_sorted,
    category_key,
)

#: scipy's ks_2samp(method="auto") is exact while neither sample is larger than this.
KS_EXACT_MAX_N = 10_000
#: Values of a chunk from which its numeric columns are sorted in parallel parts.
PARALLEL_MIN_ROWS = 200_000
#: Most threads sorting parts of one column.
MAX_THREADS = 8


def ks_2samp_sorted(sample: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Two-sample KS test of ``values`` against a sorted reference ``sample``.

    Equal to ``scipy.stats.ks_2samp(sample, values)`` (statistic and p-value). Values
    that are missing or not finite are left out, as the monitor leaves them out.
    """
    ordered = np.sort(np.asarray(sample, dtype=np.float64))
    ordered = ordered[np.isfinite(ordered)]
    accumulator = NumericAccumulator(
        NumericProfile(
            rows=ordered.size, missing=0, edges=(), counts=(ordered.size,), sample=ordered
        )
    )
    accumulator.add(values)
    return accumulator.ks()


def _workers() -> int:
    return min(os.cpu_count() or 1, MAX_THREADS)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Threads that sort and count parts of large chunks, shared by every accumulator."""
    return ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="stemma-drift")


class NumericAccumulator:
    """Counts of a numeric column of the batch, chunk by chunk, against its profile."""

    def __init__(self, reference: NumericProfile) -> None:
        self.reference = reference
        sample = np.asarray(reference.sample, dtype=np.float64)
        self._points, first = np.unique(sample, return_index=True)
        # Reference sample values <= each distinct point (the sample is sorted).
        self._reference_le = np.append(first[1:], sample.size).astype(np.int64)
        self._edges = np.asarray(reference.edges, dtype=np.float64)
        self._below = np.zeros(self._points.size, dtype=np.int64)
        self._at_or_below = np.zeros(self._points.size, dtype=np.int64)
        self.bins = np.zeros(self._edges.size + 1, dtype=np.int64)
        self.rows = 0
        self.finite = 0
        self._sum = 0.0
        # Values kept while the batch is small enough for scipy's exact p-value.
        self._kept: list[np.ndarray] | None = []

    def add(self, values: np.ndarray) -> None:
        """Count one chunk of the column (missing and non-finite values are counted apart).

        The counts are additive over any split of the values, so a large chunk is cut into
        one part per CPU, each sorted and counted in its own thread (numpy releases the GIL
        while sorting and searching).
        """
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        self.rows += array.size
        finite = np.isfinite(array)
        if not finite.all():
            array = array[finite]
        self.finite += array.size
        if self._kept is not None:
            if self.finite <= KS_EXACT_MAX_N:
                self._kept.append(array.copy())
            else:
                self._kept = None
        workers = _workers()
        if array.size < PARALLEL_MIN_ROWS or workers == 1:
            parts = [self._count(array)]
        else:
            parts = list(_pool().map(self._count, np.array_split(array, workers)))
        for below, at_or_below, bins, total in parts:
            self._below += below
            self._at_or_below += at_or_below
            self.bins += bins
            self._sum += total

    def _count(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        ordered = np.sort(values)
        return (
            np.searchsorted(ordered, self._points, side="left"),
            np.searchsorted(ordered, self._points, side="right"),
            bin_counts_sorted(ordered, self._edges),
            float(ordered.sum()),
        )

    @property
    def missing(self) -> int:
        return self.rows - self.finite

    @property
    def mean(self) -> float:
        return self._sum / self.finite if self.finite else math.nan

    def ks(self) -> tuple[float, float]:
        """KS statistic and p-value of the values counted so far against the sample."""
        m, n = int(self.reference.sample.size), self.finite
        if m == 0 or n == 0:
            return math.nan, math.nan
        if m <= KS_EXACT_MAX_N and self._kept is not None:
            # Small samples: scipy's exact p-value (which also rounds the statistic to the
            # lattice of the two sizes), computed by scipy itself.
            kept = np.concatenate(self._kept) if self._kept else np.empty(0)
            return ks_test(self.reference.sample, kept)
        reference_cdf = self._reference_le / m
        # The ECDF difference on [point_i, point_i+1) runs from its value at point_i to its
        # value just below point_i+1; below the first point the reference ECDF is 0.
        at_points = reference_cdf - self._at_or_below / n
        before_next = reference_cdf[:-1] - self._below[1:] / n
        before_first = -(self._below[0] / n)
        largest = max(float(at_points.max()), float(before_next.max(initial=0.0)), 0.0)
        smallest = min(float(at_points.min()), float(before_next.min(initial=0.0)), before_first)
        statistic = max(largest, min(max(-smallest, 0.0), 1.0))
        return statistic, ks_pvalue(statistic, m, n)


class CategoricalAccumulator:
    """Counts of a categorical column of the batch, chunk by chunk."""

    def __init__(self, reference: CategoricalProfile) -> None:
        self.reference = reference
        self.counts: dict[Any, int] = {}
        self.rows = 0
        self.missing = 0

    def add(self, values: Any) -> None:
        """Count one chunk (an Arrow array, numpy array or pandas Series)."""
        array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values)
        self.rows += len(array)
        self.missing += array.null_count
        counted = pc.value_counts(array)
        for value, count in zip(
            counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True
        ):
            if value is None:
                continue
            key = category_key(value)
            self.counts[key] = self.counts.get(key, 0) + int(count)

    @property
    def finite(self) -> int:
        return self.rows - self.missing

    def aligned(self) -> tuple[list[Any], np.ndarray, np.ndarray]:
        """Categories (the reference's, then new ones by count) with both count vectors."""
        categories = list(self.reference.categories)
        known = set(categories)
        new = sorted(
            (key for key in self.counts if key not in known),
            key=lambda key: (-self.counts[key], str(key)),
        )
        categories += new
        reference = np.asarray([*self.reference.counts, *([0] * len(new))], dtype=np.float64)
        current = np.asarray([self.counts.get(key, 0) for key in categories], dtype=np.float64)
        return categories, reference, current


Accumulator = NumericAccumulator | CategoricalAccumulator


def accumulator_for(reference: ColumnProfile) -> Accumulator:
    """The accumulator of a column's kind."""
    if isinstance(reference, NumericProfile):
        return NumericAccumulator(reference)
    return CategoricalAccumulator(reference)
