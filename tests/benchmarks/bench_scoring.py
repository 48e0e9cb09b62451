"""End-to-end batch scoring against `mlflow.pyfunc`, for the credit MLP and a custom module.

Run with `.venv/bin/pytest tests/benchmarks/bench_scoring.py -m benchmark -s`
(`STEMMA_BENCH_SIZES=1M` for the 1M-row input only).

Two models are registered in a local MLflow store: the built-in credit MLP (9 features, 6
numeric and 3 categorical, 64x32) and a user's own `nn.Module`, a residual MLP with
LayerNorm 128 wide (:class:`ResidualMLP`), each with its ONNX graph. For each model and
input size, every round runs `mlflow.pyfunc.load_model(uri).predict` over the input's
chunks (then `to_parquet`, with `torch.set_num_threads(THREADS)`), and Stemma's
`score_files` over the same input (schema check, input digest, validity checks, rejects,
atomic parts with hashes, manifest; the input is touched first, so that it is hashed as a
new batch would be) right after it. The printed figure is the median over rounds of the
per-round ratio pyfunc seconds / Stemma seconds, whose drift on a shared machine cancels
out. Model loading and one warm-up round of each job are outside the timings. Peak RSS of
Stemma is measured in a fresh process per input size when the 10M input is run.
Targets: credit >= 2.5x at 1M and >= 2.8x at 10M; the custom module >= 2x at both.
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
from torch import nn

from stemma.components.model.artifact import log_pyfunc_model
from stemma.components.model.networks import build_network, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform import digests
from stemma.components.platform.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.scoring.engine import (
    ScoringModel,
    default_model_threads,
    input_files,
    load_scoring_model,
    score_files,
)
from stemma.components.spec import FeaturesSpec, ModelSpec
from tests.support import isolated_mlflow

MODEL_NAME = "credit-bench"
ID = "application_id"
NUMERIC = ["salary", "commission", "age", "hvalue", "hyears", "loan"]
CATEGORICAL = ["elevel", "car", "zipcode"]
FEATURES = FeaturesSpec(numeric=NUMERIC, categorical=CATEGORICAL)
ALL_SIZES = {"1M": 1_000_000, "10M": 10_000_000}
SIZES = {
    label: ALL_SIZES[label]
    for label in os.environ.get("STEMMA_BENCH_SIZES", "1M,10M").split(",")
    if label in ALL_SIZES
}
#: Rows generated (and written) at a time: bounds the generator's memory too.
ROW_GROUP_ROWS = 1_000_000
CHUNK_ROWS = 200_000
THREADS = os.cpu_count() or 1
#: Paired rounds per input size (medians reported), after one untimed warm-up round.
ROUNDS = {"1M": 7, "10M": 3}
#: The custom module: a residual MLP with LayerNorm, this wide.
CUSTOM_WIDTH = 128
CUSTOM_ARCHITECTURE = f"{__name__}:ResidualMLP"
#: Targets of the issue (Stemma's speed over pyfunc's, per model and size), and the
#: looser bounds asserted on a shared 2-core machine.
TARGETS = {
    ("credit", "1M"): 2.5,
    ("credit", "10M"): 2.8,
    ("custom", "1M"): 2.0,
    ("custom", "10M"): 2.0,
}
ASSERTED_SHARE_OF_TARGET = 0.8
TARGET_RSS_RATIO = 1.2
ASSERTED_RSS_RATIO = 1.3


class ResidualMLP(nn.Module):
    """A user's own network: a projection, two residual blocks with LayerNorm, a head."""

    def __init__(self, n_inputs: int, n_outputs: int = 1, width: int = CUSTOM_WIDTH) -> None:
        super().__init__()
        self.project = nn.Linear(n_inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(2)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.project(x)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden)


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


def register_model(root: Path, kind: str = "credit") -> str:
    """Log and register the credit MLP or the custom module (initial weights: training is
    not measured); returns the reference of its champion."""
    configure_tracking(root)
    experiment_id = ensure_experiment("bench-scoring", root)
    frame = pd.DataFrame(credit_columns(np.random.default_rng(0), 0, 50_000))
    frame["approved"] = (frame["salary"] > 80_000).astype(np.int64)
    preprocessor = fit_preprocessor(frame, FEATURES, task="binary", target="approved")
    if kind == "credit":
        spec = ModelSpec(hidden=[64, 32], dropout=0.1)
    else:
        spec = ModelSpec(architecture=CUSTOM_ARCHITECTURE, params={"width": CUSTOM_WIDTH})
    config = network_config(spec)
    network = build_network(config, preprocessor.n_inputs, seed=7)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info, sha256 = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame,
            task="binary",
            workdir=root / f"model-{kind}",
        )
    name = f"{MODEL_NAME}-{kind}"
    client = MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=info.model_uri,
        run_id=run.info.run_id,
        model_id=info.model_id,
        tags={WEIGHTS_TAG: sha256},
    )
    client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def load_model(reference: str, kind: str) -> ScoringModel:
    architectures = [CUSTOM_ARCHITECTURE] if kind == "custom" else []
    return load_scoring_model(reference, architectures=architectures)


# ---------------------------------------------------------------------------------------
# The two jobs


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


def paired_ratios(
    jobs: dict[str, tuple[Callable[[Path, Path], int], Callable[[Path, Path], int]]],
    source: Path,
    rounds: int,
    scratch: Path,
) -> dict[str, list[float]]:
    """Per model, each round's pyfunc seconds over Stemma's, the two run back to back."""
    ratios: dict[str, list[float]] = {kind: [] for kind in jobs}
    for index in range(rounds):
        for kind, (stemma, pyfunc) in jobs.items():
            base = scratch / f"{kind}-{source.stem}-{index}"
            theirs = timed_seconds(lambda out, job=pyfunc: job(source, out), base / "pyfunc")
            ours = timed_seconds(lambda out, job=stemma: job(as_new(source), out), base / "stemma")
            ratios[kind].append(theirs / ours)
    return ratios


def timed_seconds(job: Callable[[Path], int], out: Path) -> float:
    started = time.perf_counter()
    job(out)
    return time.perf_counter() - started


@pytest.mark.benchmark
def test_score_files_beats_pyfunc_for_the_credit_mlp_and_a_custom_module(
    tmp_path: Path, isolated_tracking: None
) -> None:
    store = tmp_path / "store"
    jobs = {}
    references = {}
    for kind in ("credit", "custom"):
        references[kind] = register_model(store, kind)
        model = load_model(references[kind], kind)
        pyfunc_model = mlflow.pyfunc.load_model(model.model_uri, suppress_warnings=True)
        print(f"\n{kind}: {model.label} runs on {model.runtime.label}", end="")
        jobs[kind] = (
            lambda source, out, model=model: run_stemma(model, source, out),
            lambda source, out, pyfunc_model=pyfunc_model: run_pyfunc(pyfunc_model, source, out),
        )
    uri = mlflow.get_tracking_uri()
    inputs = {
        label: write_input(tmp_path / f"input-{label}.parquet", rows, seed=len(label))
        for label, rows in SIZES.items()
    }
    # The warm-up round pays what a process pays once (memory faulted in, kernels chosen).
    os.sync()
    first = next(iter(inputs.values()))
    for kind, (stemma, pyfunc) in jobs.items():
        stemma(as_new(first), tmp_path / f"warm-up-{kind}-stemma")
        pyfunc(first, tmp_path / f"warm-up-{kind}-pyfunc")
    digests.reset_stats()
    ratios = {
        label: paired_ratios(jobs, source, ROUNDS[label], tmp_path / "rounds")
        for label, source in inputs.items()
    }
    # every timed Stemma run hashed its input: none read a remembered digest
    assert digests.stats().hits == 0, digests.stats()

    print(
        f"\nbatch scoring, chunks of {CHUNK_ROWS:,} rows; Stemma {default_model_threads()} model "
        f"threads while reading, then {THREADS}; pyfunc {THREADS} torch threads"
    )
    medians = {}
    for label, by_kind in ratios.items():
        for kind, values in by_kind.items():
            medians[kind, label] = statistics.median(values)
            print(
                f"  {kind:>6} {label:>3} rows: stemma/pyfunc median {medians[kind, label]:.2f}x "
                f"(target >= {TARGETS[kind, label]}); rounds: "
                f"{', '.join(f'{ratio:.2f}' for ratio in sorted(values))}"
            )
    if "10M" in inputs and "1M" in inputs:
        check_memory(references["credit"], inputs, tmp_path, uri)
    for key, median in medians.items():
        assert median >= ASSERTED_SHARE_OF_TARGET * TARGETS[key], f"{key}: {median:.2f}x pyfunc"


def check_memory(reference: str, inputs: dict[str, Path], tmp_path: Path, uri: str) -> None:
    """Peak RSS of 10M rows within TARGET_RSS_RATIO of 1M rows (fresh processes)."""
    memory = {
        label: stemma_peak_rss(reference, as_new(inputs[label]), tmp_path / f"rss-{label}", uri)
        for label in ("1M", "10M")
    }
    rss_ratio = memory["10M"]["peak_kib"] / memory["1M"]["peak_kib"]
    print(
        f"  peak RSS: 1M {memory['1M']['peak_kib'] / 1024:,.0f} MiB, "
        f"10M {memory['10M']['peak_kib'] / 1024:,.0f} MiB, ratio {rss_ratio:.3f} "
        f"(target <= {TARGET_RSS_RATIO})"
    )
    assert rss_ratio <= ASSERTED_RSS_RATIO, f"peak RSS 10M/1M = {rss_ratio:.3f}"
