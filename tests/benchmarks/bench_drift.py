"""Drift computation on 1M and 10M rows x 20 features: speed against scipy, and memory.

Run with `.venv/bin/pytest tests/benchmarks/bench_drift.py -m benchmark -s`.

A reference profile is built from 200,000 rows of 20 numeric features (normal, lognormal,
uniform and integer-valued columns, the last with many ties), keeping the default sorted
sample of 10,000 values per feature. Batches of 1M and 10M rows (a few features shifted)
are written to Parquet a million rows at a time. Then, in the same run:

* KS against scipy: per feature, the column is read into memory once and
  ``scipy.stats.ks_2samp(sample, column)`` and Stemma's ``ks_2samp_sorted(sample, column)``
  run on it, alternating, best of a few rounds; their statistics and p-values must be
  identical (``==``), and the ratio of the summed times is printed per size and per
  feature;
* the whole drift computation as the monitor runs it (``monitor_batch``: the Parquet file
  streamed in chunks of ``monitor.chunk_rows`` rows, PSI and KS for every feature) in a
  fresh process per size, scipy imported before the clock starts: wall time and peak RSS
  (VmHWM), against the size the batch would take in memory.

Stemma sorts parts of a large column in one thread per CPU (the counts it keeps are
additive over parts); scipy runs on one. Both compute the same p-value with scipy's
``kstwo``, whose cost (tens of ms for a moderately drifted feature at these sizes) bounds
the speed-up at 1M rows.

Target: KS at least 5x faster than scipy over all features. The assertions leave room for
a noisy shared machine: the ratio must be at least ASSERTED_KS_SPEEDUP, and peak RSS may
not grow with the batch (10M within ASSERTED_RSS_RATIO of 1M).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from stemma.components.monitoring.accumulators import ks_2samp_sorted
from stemma.components.monitoring.profile import (
    NumericProfile,
    ReferenceProfile,
    profile_numeric,
    write_profile,
)
from stemma.components.spec import MonitorSpec

FEATURES = [f"x{index:02d}" for index in range(20)]
SIZES = {"1M": 1_000_000, "10M": 10_000_000}
REFERENCE_ROWS = 200_000
#: Rows generated and written at a time (one Parquet row group).
CHUNK_ROWS = 1_000_000
#: Rounds of the alternating KS timings per size (the best of each is kept).
ROUNDS = {"1M": 3, "10M": 1}
#: Features whose batch distribution is shifted (a small shift: the statistics are real).
SHIFTED = {"x00", "x05", "x10", "x15"}
TARGET_KS_SPEEDUP = 5.0
#: Below the target on purpose: a shared 2-core machine slows either side at random.
ASSERTED_KS_SPEEDUP = 3.0
ASSERTED_RSS_RATIO = 1.3


def column(rng: np.random.Generator, index: int, rows: int, shift: float = 0.0) -> np.ndarray:
    """Feature ``index``: four families of distributions, integer ones with many ties."""
    family = index % 4
    if family == 0:
        return rng.normal(index + shift, 1.0 + index / 10, rows)
    if family == 1:
        return rng.lognormal(1.0 + shift, 0.5, rows)
    if family == 2:
        return rng.integers(0, 61, rows).astype(np.float64) + round(shift * 10)
    return rng.uniform(shift, 1.0 + shift, rows)


def rows_of(rng: np.random.Generator, rows: int, *, shifted: bool) -> dict[str, np.ndarray]:
    return {
        name: column(rng, index, rows, 0.05 if shifted and name in SHIFTED else 0.0)
        for index, name in enumerate(FEATURES)
    }


def write_batch(path: Path, rows: int, seed: int) -> Path:
    schema = pa.schema([pa.field(name, pa.float64()) for name in FEATURES])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, CHUNK_ROWS):
            rng = np.random.default_rng([seed, start])
            part = rows_of(rng, min(CHUNK_ROWS, rows - start), shifted=True)
            writer.write_table(pa.table(part, schema=schema), row_group_size=CHUNK_ROWS)
    return path


def reference_profile(path: Path) -> ReferenceProfile:
    reference = rows_of(np.random.default_rng(1), REFERENCE_ROWS, shifted=False)
    features: dict[str, NumericProfile] = {
        name: profile_numeric(values) for name, values in reference.items()
    }
    profile = ReferenceProfile(task="binary", features=dict(features), target="y")
    write_profile(profile, path)
    return profile


def best_time(function, *arguments, rounds: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(rounds):
        started = time.perf_counter()
        result = function(*arguments)
        best = min(best, time.perf_counter() - started)
    return best, result


RSS_SCRIPT = """
import json, sys, time
from pathlib import Path
import scipy.special, scipy.stats  # imported once per process (~1 s, ~100 MiB): not timed
from stemma.components.monitoring.drift import monitor_batch
from stemma.components.monitoring.profile import read_profile
from stemma.components.spec import MonitorSpec

def peak_kib():
    # VmHWM, not ru_maxrss: the latter keeps the peak of the parent it was forked from.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

profile = read_profile(Path(sys.argv[1]))
settings = MonitorSpec(prediction_drift=False)
before = peak_kib()
started = time.perf_counter()
report = monitor_batch([Path(sys.argv[2])], profile, settings)
seconds = time.perf_counter() - started
print(json.dumps({"before_kib": before, "peak_kib": peak_kib(), "seconds": seconds,
                  "rows": report.rows, "drifted": report.drifted_features}))
"""


def monitor_in_fresh_process(profile_path: Path, batch: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(profile_path), str(batch)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark
def test_drift_is_faster_than_scipy_with_identical_statistics_in_bounded_memory(tmp_path):
    profile_path = tmp_path / "reference_profile.json"
    profile = reference_profile(profile_path)
    batches = {
        label: write_batch(tmp_path / f"batch-{label}.parquet", rows, seed=len(label))
        for label, rows in SIZES.items()
    }

    print()
    print(
        f"KS of {len(FEATURES)} features against a sorted reference sample of "
        f"{profile.features[FEATURES[0]].sample.size:,} values"
    )
    speedups = {}
    for label, path in batches.items():
        scipy_total = stemma_total = 0.0
        per_feature = []
        for name in FEATURES:
            sample = profile.features[name].sample
            values = pq.read_table(path, columns=[name]).column(0).to_numpy()
            scipy_seconds, expected = best_time(
                stats.ks_2samp, sample, values, rounds=ROUNDS[label]
            )
            stemma_seconds, got = best_time(ks_2samp_sorted, sample, values, rounds=ROUNDS[label])
            assert got == (expected.statistic, expected.pvalue), name
            scipy_total += scipy_seconds
            stemma_total += stemma_seconds
            per_feature.append(f"{name} {scipy_seconds / stemma_seconds:.1f}x")
            del values
        speedups[label] = scipy_total / stemma_total
        print(
            f"  {label:>3} rows: scipy {scipy_total:.2f} s, stemma {stemma_total:.2f} s over all "
            f"features: {speedups[label]:.1f}x (target >= {TARGET_KS_SPEEDUP}); statistics "
            "and p-values identical"
        )
        print(f"      per feature: {', '.join(per_feature)}")

    print(
        f"whole drift computation (PSI + KS, {len(FEATURES)} features, streamed in chunks of "
        f"{MonitorSpec().chunk_rows:,} rows, {os.cpu_count()} CPUs)"
    )
    memory = {}
    for label, path in batches.items():
        measured = monitor_in_fresh_process(profile_path, path)
        assert measured["rows"] == SIZES[label]
        in_memory = SIZES[label] * len(FEATURES) * 8 / 2**20
        memory[label] = measured
        print(
            f"  {label:>3} rows: {measured['seconds']:.2f} s "
            f"({SIZES[label] / measured['seconds'] / 1e6:.1f}M rows/s), peak RSS "
            f"{measured['peak_kib'] / 1024:,.0f} MiB ({(measured['peak_kib'] - measured['before_kib']) / 1024:,.0f} "
            f"MiB above start-up); the batch in memory would be {in_memory:,.0f} MiB; "
            f"drifted: {', '.join(measured['drifted']) or 'none'}"
        )
    rss_ratio = memory["10M"]["peak_kib"] / memory["1M"]["peak_kib"]
    print(f"  peak RSS 10M / 1M: {rss_ratio:.2f}")

    for label, speedup in speedups.items():
        assert speedup >= ASSERTED_KS_SPEEDUP, f"{label}: KS only {speedup:.1f}x scipy"
    assert rss_ratio <= ASSERTED_RSS_RATIO, f"peak RSS grows with the batch: {rss_ratio:.2f}"
