"""End-to-end batch scoring throughput and memory: `score_files` against what users write instead.

Run with `.venv/bin/pytest tests/benchmarks/bench_scoring.py -m benchmark -s`.

A credit-like model (9 features, 6 numeric and 3 categorical, MLP 64x32) is registered in
a local MLflow store, and 1M- and 10M-row Parquet inputs are generated. Each job reads the
input in the same chunks, preprocesses, predicts and writes Parquet, each with the thread
setting that serves it best on this machine: Stemma its default (one model thread per
core but one while reading, beside its reader, hasher and writer threads, then one per
core for the chunks left once the input is read; each runs the network on its own
row groups, one TorchScript call each); (a) and (b) `torch.set_num_threads(THREADS)`,
one per core, which was faster for both than one thread (measured on 2 cores: pyfunc
0.68 s against 0.87 s for 1M rows):

* Stemma: `score_files` (schema check, input digest, validity checks, rejects, atomic
  parts with hashes, manifest); the input is touched before every job, so that Stemma
  hashes it each time as it would a new batch instead of reading a remembered digest;
* (a) a hand-written pandas + torch script: `iter_batches` -> `to_pandas`, manual
  standardisation and one-hot encoding with numpy, a forward pass under
  `torch.inference_mode`, `DataFrame.to_parquet` per chunk;
* (b) `mlflow.pyfunc.load_model(uri).predict` over the same chunks, plus the same writing.

Model loading is outside every timing, and so is one warm-up round of each job. Jobs
alternate so that load from other processes hits all alike. Peak RSS of Stemma is
measured in a fresh process per input size. Targets: Stemma at least as fast as (a) and
3x (b); peak RSS for 10M rows within 1.2x of 1M rows. The assertions leave room for a
noisy shared machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from stemma.components.model.preprocessing import Preprocessor
from stemma.components.platform import digests
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.scoring.engine import (
    WEIGHTS_TAG,
    ScoringModel,
    default_model_threads,
    input_files,
    load_scoring_model,
    score_files,
)
from stemma.components.spec import FeaturesSpec
from tests.support import isolated_mlflow, log_trained_model

MODEL_NAME = "credit-bench"
ID = "application_id"
NUMERIC = ["salary", "commission", "age", "hvalue", "hyears", "loan"]
CATEGORICAL = ["elevel", "car", "zipcode"]
FEATURES = FeaturesSpec(numeric=NUMERIC, categorical=CATEGORICAL)
SIZES = {"1M": 1_000_000, "10M": 10_000_000}
#: Rows generated (and written) at a time: bounds the generator's memory too.
ROW_GROUP_ROWS = 1_000_000
CHUNK_ROWS = 200_000
THREADS = os.cpu_count() or 1
#: Alternating rounds per input size (medians reported), after one untimed warm-up round of
#: each job on the 1M input.
ROUNDS = {"1M": 15, "10M": 4}
#: Targets of the issue, and the looser bounds asserted on a shared 2-core machine.
TARGET_VS_HAND_WRITTEN = 1.0
TARGET_VS_PYFUNC = 3.0
TARGET_RSS_RATIO = 1.2
ASSERTED_VS_HAND_WRITTEN = 0.8
#: Below the target, so that noise from other work on a shared 2-core machine does not fail
#: the run; the printed ratio is the measurement (five runs on that machine: 1M rows
#: 3.20-3.45x, 10M rows 3.50-3.57x, with pyfunc itself at 2.2-2.35M rows/s; pyfunc's
#: speed has ranged over 1.6-2.52M rows/s between runs).
ASSERTED_VS_PYFUNC = 2.5
ASSERTED_RSS_RATIO = 1.3


def credit_columns(rng: np.random.Generator, first_id: int, rows: int) -> dict[str, np.ndarray]:
    """Credit-like applications (the worked example's columns and ranges), vectorised."""
    salary = rng.uniform(20_000, 150_000, rows).round(2)
    zipcode = rng.integers(0, 9, rows)
    return {
        ID: np.arange(first_id, first_id + rows, dtype=np.int64),
        "salary": salary,
        "commission": np.where(salary >= 75_000, 0.0, rng.uniform(10_000, 75_000, rows)).round(2),
        "age": rng.integers(20, 81, rows),
        "elevel": rng.integers(0, 5, rows),
        "car": rng.integers(1, 21, rows),
        "zipcode": zipcode,
        "hvalue": ((9 - zipcode) * 100_000.0 * rng.uniform(0.5, 1.5, rows)).round(0),
        "hyears": rng.integers(1, 31, rows),
        "loan": rng.uniform(0, 500_000, rows).round(2),
    }


def write_input(path: Path, rows: int, seed: int) -> Path:
    """A Parquet file of ``rows`` rows, generated and written one row group at a time."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, ROW_GROUP_ROWS):
        table = pa.table(credit_columns(rng, start, min(ROW_GROUP_ROWS, rows - start)))
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return path


def register_model(root: Path) -> str:
    """Log and register the credit-like model (initial weights; training is not measured)."""
    configure_tracking(root)
    experiment_id = ensure_experiment("bench-scoring", root)
    frame = pd.DataFrame(credit_columns(np.random.default_rng(0), 0, 50_000))
    frame["approved"] = (frame["salary"] > 80_000).astype(np.int64)
    _, _, info, sha256, run_id = log_trained_model(
        frame,
        FEATURES,
        task="binary",
        target="approved",
        experiment_id=experiment_id,
        workdir=root / "model",
        hidden=(64, 32),
        dropout=0.1,
    )
    client = MlflowClient()
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(
        MODEL_NAME,
        source=info.model_uri,
        run_id=run_id,
        model_id=info.model_id,
        tags={WEIGHTS_TAG: sha256},
    )
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return f"models:/{MODEL_NAME}@champion"


# ---------------------------------------------------------------------------------------
# The three jobs


def run_stemma(model: ScoringModel, source: Path, out: Path) -> int:
    result = score_files(
        model,
        input_files(source),
        out,
        id_column=ID,
        chunk_rows=CHUNK_ROWS,
        progress=False,
    )
    return result.rows_scored + result.rows_rejected


def run_hand_written(
    preprocessor: Preprocessor, network: torch.nn.Module, source: Path, out: Path
) -> int:
    """What a user writes instead: pandas per chunk, numpy one-hot, torch, to_parquet."""
    out.mkdir(parents=True, exist_ok=True)
    means = np.asarray(preprocessor.means)
    stds = np.asarray(preprocessor.stds)
    vocabularies = [np.asarray(v) for v in preprocessor.vocabularies]
    rows = 0
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for index, batch in enumerate(pq.ParquetFile(source).iter_batches(batch_size=CHUNK_ROWS)):
            frame = batch.to_pandas()
            numeric = (frame[NUMERIC].to_numpy(dtype=np.float64) - means) / stds
            one_hot = [
                (frame[column].to_numpy()[:, None] == vocabulary[None, :]).astype(np.float32)
                for column, vocabulary in zip(CATEGORICAL, vocabularies, strict=True)
            ]
            x = np.hstack([numeric.astype(np.float32), *one_hot])
            with torch.inference_mode():
                logits = network(torch.from_numpy(x)).numpy()[:, 0].astype(np.float64)
            score = 1.0 / (1.0 + np.exp(-logits))
            pd.DataFrame(
                {ID: frame[ID], "prediction": (score >= 0.5).astype(np.int64), "score": score}
            ).to_parquet(out / f"part-{index:05d}.parquet", index=False)
            rows += len(frame)
    finally:
        torch.set_num_threads(previous)
    return rows


def run_pyfunc(pyfunc_model, source: Path, out: Path) -> int:
    """The MLflow way: the pyfunc model's predict over the same chunks, then the same write."""
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for index, batch in enumerate(pq.ParquetFile(source).iter_batches(batch_size=CHUNK_ROWS)):
            frame = batch.to_pandas()
            output = pyfunc_model.predict(frame[NUMERIC + CATEGORICAL])
            output.insert(0, ID, frame[ID].to_numpy())
            output.to_parquet(out / f"part-{index:05d}.parquet", index=False)
            rows += len(frame)
    finally:
        torch.set_num_threads(previous)
    return rows


def as_new(source: Path) -> Path:
    """Touch the input, so that Stemma hashes it as it would a new night's batch.

    An input unchanged since Stemma last hashed it has its digest remembered
    (`components/digests.py`); scoring the same file round after round would measure that
    store instead of the hash.
    """
    os.utime(source)
    return source


def timed(job: Callable[[Path], int], out: Path) -> float:
    """Rows per second of one run into a fresh folder."""
    started = time.perf_counter()
    rows = job(out)
    return rows / (time.perf_counter() - started)


RSS_SCRIPT = """
import json, sys, time
from pathlib import Path
from stemma.components.scoring.engine import input_files, load_scoring_model, score_files

def peak_kib():
    # VmHWM, not ru_maxrss: the latter keeps the peak of the parent it was forked from.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

model = load_scoring_model(sys.argv[1])
before = peak_kib()
started = time.perf_counter()
result = score_files(model, input_files(Path(sys.argv[2])), Path(sys.argv[3]),
                     id_column=sys.argv[4], chunk_rows=int(sys.argv[5]), progress=False)
seconds = time.perf_counter() - started
print(json.dumps({"before_kib": before, "peak_kib": peak_kib(), "rows": result.rows_input,
                  "seconds": seconds}))
"""


def stemma_peak_rss(reference: str, source: Path, out: Path, uri: str) -> dict[str, float]:
    """Peak RSS (KiB) of a fresh process that loads the model and scores ``source``."""
    arguments = [reference, str(source), str(out), ID, str(CHUNK_ROWS)]
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, *arguments],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# The benchmark


@pytest.fixture
def isolated_tracking():
    with isolated_mlflow():
        yield


@pytest.mark.benchmark
def test_score_files_beats_hand_written_and_pyfunc_in_bounded_memory(
    tmp_path: Path, isolated_tracking: None
) -> None:
    reference = register_model(tmp_path / "store")
    uri = mlflow.get_tracking_uri()
    inputs = {
        label: write_input(tmp_path / f"input-{label}.parquet", rows, seed=len(label))
        for label, rows in SIZES.items()
    }
    model = load_scoring_model(reference)
    pyfunc_model = mlflow.pyfunc.load_model(model.model_uri, suppress_warnings=True)
    network = model.network

    jobs: dict[str, Callable[[Path, Path], int]] = {
        "stemma": lambda source, out: run_stemma(model, source, out),
        "hand-written": lambda source, out: run_hand_written(
            model.preprocessor, network, source, out
        ),
        "pyfunc": lambda source, out: run_pyfunc(pyfunc_model, source, out),
    }
    # The inputs just written are flushed first, so that the kernel writing them back does
    # not share the two cores with the first rounds. The warm-up round pays what a process
    # pays once: faulting in the memory each job settles into (mostly huge pages zeroed
    # for Arrow's allocator) and oneDNN compiling kernels for the batch shapes. Measured
    # in fresh processes, a first 1M-row scoring took 160-470 ms, the next ones 140-210.
    os.sync()
    for job_name, job in jobs.items():
        job(as_new(inputs["1M"]), tmp_path / f"warm-up-{job_name}")
    digests.reset_stats()
    rates: dict[str, dict[str, list[float]]] = {label: {job: [] for job in jobs} for label in SIZES}
    run = 0
    for label in SIZES:
        for _ in range(ROUNDS[label]):
            for job_name, job in jobs.items():
                run += 1
                out = tmp_path / f"out-{run}"
                source = as_new(inputs[label])
                rates[label][job_name].append(
                    timed(lambda folder, job=job, source=source: job(source, folder), out)
                )

    # every timed Stemma run hashed its input: none read a remembered digest
    assert digests.stats().hits == 0, digests.stats()
    assert digests.stats().misses == sum(ROUNDS.values()), digests.stats()

    memory = {
        label: stemma_peak_rss(reference, as_new(inputs[label]), tmp_path / f"rss-{label}", uri)
        for label in SIZES
    }

    print()
    print(
        f"batch scoring, chunks of {CHUNK_ROWS:,} rows; model threads: Stemma "
        f"{default_model_threads()} while reading, then {THREADS}; hand-written and pyfunc "
        f"{THREADS}"
    )
    ratios = {}
    for label in SIZES:
        medians = {job: statistics.median(values) for job, values in rates[label].items()}
        vs_hand = medians["stemma"] / medians["hand-written"]
        vs_pyfunc = medians["stemma"] / medians["pyfunc"]
        ratios[label] = (vs_hand, vs_pyfunc)
        print(
            f"  {label:>3} rows: stemma {medians['stemma']:,.0f} rows/s, "
            f"hand-written {medians['hand-written']:,.0f}, pyfunc {medians['pyfunc']:,.0f} | "
            f"stemma/hand-written {vs_hand:.2f} (target >= {TARGET_VS_HAND_WRITTEN}), "
            f"stemma/pyfunc {vs_pyfunc:.2f} (target >= {TARGET_VS_PYFUNC})"
        )
        # Each round's jobs ran back to back, so a round's ratio has the least drift in it.
        paired = sorted(
            ours / theirs
            for ours, theirs in zip(rates[label]["stemma"], rates[label]["pyfunc"], strict=True)
        )
        print(
            f"        stemma/pyfunc per round: {', '.join(f'{ratio:.2f}' for ratio in paired)} "
            f"({sum(ratio >= TARGET_VS_PYFUNC for ratio in paired)} of {len(paired)} "
            f"at {TARGET_VS_PYFUNC:g}x or more)"
        )
    rss_ratio = memory["10M"]["peak_kib"] / memory["1M"]["peak_kib"]
    growth = {label: (m["peak_kib"] - m["before_kib"]) / 1024 for label, m in memory.items()}
    print(
        f"  peak RSS: 1M {memory['1M']['peak_kib'] / 1024:,.0f} MiB, "
        f"10M {memory['10M']['peak_kib'] / 1024:,.0f} MiB, ratio {rss_ratio:.3f} "
        f"(target <= {TARGET_RSS_RATIO}); above the loaded model: "
        f"1M {growth['1M']:,.0f} MiB, 10M {growth['10M']:,.0f} MiB"
    )

    for label, (vs_hand, vs_pyfunc) in ratios.items():
        assert vs_hand >= ASSERTED_VS_HAND_WRITTEN, f"{label}: {vs_hand:.2f} x hand-written"
        assert vs_pyfunc >= ASSERTED_VS_PYFUNC, f"{label}: {vs_pyfunc:.2f} x pyfunc"
    assert rss_ratio <= ASSERTED_RSS_RATIO, f"peak RSS 10M/1M = {rss_ratio:.3f}"
