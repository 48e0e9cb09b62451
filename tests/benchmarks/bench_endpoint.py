"""Online serving: `stemma endpoint` against `mlflow models serve`, same model, same run.

Run with `.venv/bin/pytest tests/benchmarks/bench_endpoint.py -m benchmark -s`
(`--cost-per-hour 0.10 --cost-vcpus 2` for the price of the machine; `STEMMA_BENCH_RATES`
and `STEMMA_BENCH_SECONDS` change the fixed rates and their length).

One credit-shaped MLP (64x32, 9 features) is registered in a local MLflow store; both
servers run in processes of their own on loopback, serving that version, pinned to one
core; the load comes from worker processes pinned to the other cores (the same cores
where the machine has only one; the output names them). The load is open loop
(tests/benchmarks/open_loop.py): request *i* is due at ``start + i / rate`` whatever
happened to the ones before, and its latency counts from that due time, so a slow server
cannot hide its queue by slowing the sender (coordinated omission).

Measured, for each server:

- p50/p95/p99 of single-row requests at fixed rates (100, 500, 1000, 2000 req/s);
- the highest rate it sustains with p99 <= 50 ms and no failure (doubling short steps,
  then bisection);
- rows/s with 1,000-row requests (closed loop, a few requests always in flight), in
  each server's columnar body (`{"columns": ...}`, `dataframe_split`);
- CPU-seconds of the server's processes (user + system, psutil) per million predictions,
  and from it a cost per million predictions at an illustrative machine price.

Targets: Stemma's p99 <= 10 ms at 500 req/s and <= 25 ms at 1000 req/s; a sustained rate
>= 3x mlflow's; rows/s >= 5x mlflow's. Ratios are of figures measured in the same run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from stemma.components.platform.tags import WEIGHTS_SHA256
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.spec import load_spec
from tests.benchmarks.open_loop import LATE_MS, Load, LoadGenerator, Outcome, split_cores
from tests.support import free_port, isolated_mlflow, log_trained_model

pytestmark = pytest.mark.benchmark

RATES = [int(rate) for rate in os.environ.get("STEMMA_BENCH_RATES", "100,500,1000,2000").split(",")]
SECONDS = float(os.environ.get("STEMMA_BENCH_SECONDS", "5"))
#: The latency bound of the sustained rate, and the length of each step of its search.
SUSTAINED_P99_MS = 50.0
SEARCH_SECONDS = 2.0
SEARCH_START_RATE = 250
SEARCH_CEILING_RATE = 32_000
SEARCH_FLOOR_RATE = 10
#: Bisection stops when the bracket is narrower than this share of the rate.
SEARCH_PRECISION = 0.1
#: Rows per request of the throughput run, and the requests kept in flight: their rows
#: fit the endpoint's default queue (endpoint.max_queue_rows, 4,096 rows), past which it
#: answers 503 at once by design.
BULK_ROWS = 1000
BULK_IN_FLIGHT = 4
#: The rate of single-row requests whose CPU time prices a million predictions.
COST_RATE = 1000
#: A health check answered this fast (s) says the server has drained its queue.
SETTLED_S = 0.05
#: Seconds a request may take before it counts as failed.
REQUEST_TIMEOUT_S = 10.0
#: Stemma's p99 targets: (req/s, ms).
LATENCY_TARGETS = ((500, 10.0), (1000, 25.0))
SUSTAINED_RATIO_TARGET = 3.0
ROWS_RATIO_TARGET = 5.0


@dataclass
class Server:
    """A serving process under test, its URLs and request bodies."""

    name: str
    command: list[str]
    base: str
    health: str
    predict: str
    single: list[bytes]  # one row per body
    bulk: list[bytes]  # BULK_ROWS rows per body
    process: subprocess.Popen | None = None
    measured: dict = field(default_factory=dict)

    def start(self, cwd: Path, env: dict[str, str], cores: list[int]) -> None:
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, set(cores)),  # its workers inherit
        )
        wait_until_up(self.base + self.health, self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and every process it started."""
        root = psutil.Process(self.process.pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def cores(self) -> list[int]:
        return sorted(os.sched_getaffinity(self.process.pid))


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    limit = time.monotonic() + timeout_s
    while time.monotonic() < limit:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({process.returncode})")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root):
    from stemma.examples.credit import generate_credit_data

    root = tmp_path_factory.mktemp("bench-endpoint")
    generate_credit_data(root / "data", train_rows=2000, days=1, batch_rows=500)
    (root / "data.dvc").write_text("outs: []\n")
    (root / "configs").mkdir()
    config = root / "configs" / "credit.yaml"
    config.write_text((repo_root / "configs" / "credit.yaml").read_text())
    spec = load_spec(config).spec
    frame = pd.read_parquet(root / "data" / "credit" / "train.parquet")
    with isolated_mlflow():
        uri = configure_tracking(root)
        experiment = ensure_experiment("credit", root)
        _, _, info, sha256, run_id = log_trained_model(
            frame,
            spec.data.features,
            task="binary",
            target="approved",
            experiment_id=experiment,
            workdir=root / "model",
            hidden=(64, 32),
        )
        client = MlflowClient()
        client.create_registered_model("credit")
        version = client.create_model_version(
            "credit",
            info.model_uri,
            run_id=run_id,
            model_id=info.model_id,
            tags={WEIGHTS_SHA256: sha256},
        )
        client.set_registered_model_alias("credit", "champion", version.version)
    features = frame.drop(columns=["approved", "applied_at"])
    return {"root": root, "config": config, "uri": uri, "features": features}


@pytest.fixture(scope="module")
def price(request) -> tuple[float, int]:
    """(price of the machine per hour, its vCPUs), from --cost-per-hour and --cost-vcpus."""
    from tests.benchmarks.conftest import DEFAULT_COST_PER_HOUR, DEFAULT_COST_VCPUS

    return (
        request.config.getoption("cost_per_hour", DEFAULT_COST_PER_HOUR),
        request.config.getoption("cost_vcpus", DEFAULT_COST_VCPUS),
    )


def build_servers(project) -> list[Server]:
    bin_dir = Path(sys.executable).parent
    features = project["features"]
    rows = json.loads(features.head(200).to_json(orient="records"))
    chunks = [features.iloc[start : start + BULK_ROWS] for start in (0, BULK_ROWS)]
    stemma_port, mlflow_port = free_port(), free_port()
    stemma = Server(
        name="stemma",
        command=[
            *(str(bin_dir / "stemma"), "endpoint", str(project["config"])),
            *("--port", str(stemma_port)),
        ],
        base=f"http://127.0.0.1:{stemma_port}",
        health="/ready",
        predict="/v1/predict",
        single=[json.dumps(row).encode() for row in rows],
        bulk=[
            json.dumps({"columns": {name: chunk[name].tolist() for name in chunk}}).encode()
            for chunk in chunks
        ],
    )
    mlflow = Server(
        name="mlflow",
        command=[
            *(str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/credit/1"),
            *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port)),
        ],
        base=f"http://127.0.0.1:{mlflow_port}",
        health="/ping",
        predict="/invocations",
        single=[json.dumps({"dataframe_records": [row]}).encode() for row in rows],
        bulk=[
            json.dumps(
                {"dataframe_split": json.loads(chunk.to_json(orient="split", index=False))}
            ).encode()
            for chunk in chunks
        ],
    )
    return [stemma, mlflow]


@dataclass(frozen=True)
class Measure:
    """A run's figures, with the server's CPU time over the whole run."""

    cpu_s: float
    rows: int  # rows answered over the whole run, warm-up included
    outcome: Outcome | None = None  # open-loop runs
    rows_per_s: float | None = None  # closed-loop runs
    failures: int = 0  # closed-loop runs

    @property
    def cpu_s_per_million(self) -> float:
        return self.cpu_s / self.rows * 1e6 if self.rows else float("nan")

    @property
    def sustained(self) -> bool:
        p99 = self.outcome.percentile(99)
        return self.outcome.failures == 0 and p99 <= SUSTAINED_P99_MS


def measure(generator: LoadGenerator, server: Server, rate: float, seconds: float) -> Measure:
    """Single-row requests at ``rate`` for ``seconds`` (after a second of warm-up)."""
    load = Load(
        url=server.base + server.predict,
        bodies=server.single,
        rate=rate,
        seconds=seconds,
        timeout_s=REQUEST_TIMEOUT_S,
    )
    before = server.cpu_seconds()
    outcome = generator.run(load)
    cpu = server.cpu_seconds() - before
    settle(server)
    return Measure(cpu, outcome.answered, outcome=outcome)


def settle(server: Server) -> None:
    """Wait until the server answers its health check at once: its queue is drained."""
    for _ in range(20):
        time.sleep(0.3)
        started = time.monotonic()
        httpx.get(server.base + server.health, timeout=60)
        if time.monotonic() - started < SETTLED_S:
            return


def sustained_rate(generator: LoadGenerator, server: Server) -> tuple[int, Measure | None]:
    """The highest rate of single-row requests with p99 <= SUSTAINED_P99_MS and no failure:
    steps of SEARCH_SECONDS doubling (or halving) from SEARCH_START_RATE until one passes
    and one fails, then bisection between them."""

    def passes(rate: int) -> Measure | None:
        step = measure(generator, server, rate, SEARCH_SECONDS)
        return step if step.sustained else None

    good, good_measure, bad = 0, None, 0  # 0: not found yet
    rate = SEARCH_START_RATE
    while not bad and rate <= SEARCH_CEILING_RATE:  # up while it passes
        step = passes(rate)
        if step is None:
            bad = rate
        else:
            good, good_measure, rate = rate, step, rate * 2
    while not good and bad // 2 >= SEARCH_FLOOR_RATE:  # down while it fails
        good_measure = passes(bad // 2)
        if good_measure is None:
            bad //= 2
        else:
            good = bad // 2
    while good and bad and bad - good > SEARCH_PRECISION * good:
        rate = (good + bad) // 2
        step = passes(rate)
        if step is None:
            bad = rate
        else:
            good, good_measure = rate, step
    return good, good_measure


def bulk_rows_per_second(generator: LoadGenerator, server: Server) -> Measure:
    """Rows/s with BULK_ROWS-row requests, BULK_IN_FLIGHT always in flight."""
    load = Load(
        url=server.base + server.predict,
        bodies=server.bulk,
        rate=0,
        seconds=SECONDS,
        timeout_s=REQUEST_TIMEOUT_S * 3,
    )
    before = server.cpu_seconds()
    throughput = generator.saturate(load, BULK_IN_FLIGHT)
    cpu = server.cpu_seconds() - before
    settle(server)
    return Measure(
        cpu,
        throughput.answered_in_all * BULK_ROWS,
        rows_per_s=throughput.per_second * BULK_ROWS,
        failures=throughput.failures,
    )


def test_endpoint_against_mlflow_models_serve(project, price):
    server_cores, load_cores = split_cores()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": project["uri"],
        "PYTHONWARNINGS": "ignore",
        # mlflow models serve starts `uvicorn` by name
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    servers = build_servers(project)
    load_before = os.getloadavg()[0]
    try:
        for server in servers:
            server.start(project["root"], env, server_cores)
        with LoadGenerator(load_cores) as generator:
            for rate in RATES:
                for server in servers:
                    server.measured[rate] = measure(generator, server, rate, SECONDS)
            for server in servers:
                server.measured["sustained"] = sustained_rate(generator, server)
                server.measured["bulk"] = bulk_rows_per_second(generator, server)
            print_report(servers, generator, price, load_before)
    finally:
        for server in servers:
            server.stop()
    stemma, mlflow = servers
    assert stemma.measured[RATES[0]].outcome.failures == 0
    assert stemma.measured["bulk"].rows_per_s > 0 < mlflow.measured["bulk"].rows_per_s
    assert stemma.measured["sustained"][0] > 0


def print_report(
    servers: list[Server], generator: LoadGenerator, price, load_before: float
) -> None:
    stemma, mlflow = servers
    print(
        f"\nmachine: {os.cpu_count()} cores; load average {load_before:.1f} before the run, "
        f"{os.getloadavg()[0]:.1f} after (other processes share these cores); uvicorn (both "
        f"servers) with {http_stack()}"
    )
    print(
        f"server processes on core(s) {stemma.cores()} (stemma), {mlflow.cores()} (mlflow); "
        f"load: {generator.workers} worker process(es) on core(s) "
        f"{sorted({core for cores in generator.pinned for core in cores})}"
        + (" (the same: one core only)" if set(stemma.cores()) & set(generator.cores) else "")
    )
    print(
        f"single-row requests, open loop, {SECONDS:.0f} s per rate after 1 s of warm-up; "
        "latency in ms from each request's due time; 'late' is the share of requests the "
        f"sender started over {LATE_MS:.0f} ms late; CPU s/M: the server's CPU-seconds over "
        "the run per million rows answered (work on requests that timed out counts too)"
    )
    print(
        f"{'req/s':>6} {'server':<7} {'p50':>8} {'p95':>8} {'p99':>9} {'failed':>7} "
        f"{'late':>6} {'CPU s/M':>9}"
    )
    for rate in RATES:
        for server in servers:
            m = server.measured[rate]
            o = m.outcome
            print(
                f"{rate:>6} {server.name:<7} {o.percentile(50):8.2f} {o.percentile(95):8.2f} "
                f"{o.percentile(99):9.2f} {o.failures:>7} {o.late_share:6.1%} "
                f"{m.cpu_s_per_million:9.0f}"
            )
    sustained = {s.name: s.measured["sustained"][0] for s in servers}
    bulk = {s.name: s.measured["bulk"] for s in servers}
    rows_per_s = {name: m.rows_per_s for name, m in bulk.items()}
    print(
        f"\nhighest rate with p99 <= {SUSTAINED_P99_MS:.0f} ms and no failure "
        f"({SEARCH_SECONDS:.0f} s steps): "
        + ", ".join(f"{name} {rate} req/s" for name, rate in sustained.items())
        + f"; stemma/mlflow {ratio(sustained['stemma'], sustained['mlflow'])}"
    )
    print(
        f"{BULK_ROWS:,}-row requests ({BULK_IN_FLIGHT} in flight, columnar bodies, "
        f"{SECONDS:.0f} s): "
        + ", ".join(
            f"{name} {rows_per_s[name]:,.0f} rows/s ({bulk[name].cpu_s_per_million:,.0f} "
            f"CPU s per million, {bulk[name].failures} failed)"
            for name in rows_per_s
        )
        + f"; stemma/mlflow {ratio(rows_per_s['stemma'], rows_per_s['mlflow'])}"
    )
    print_cost(servers, price)
    print_targets(stemma, sustained, rows_per_s)


def print_cost(servers: list[Server], price) -> None:
    per_hour, vcpus = price
    per_vcpu_hour = per_hour / vcpus
    print(
        f"\ncost per million predictions = CPU-seconds per million / 3600 x price per "
        f"vCPU-hour ({per_hour:.2f}/h for {vcpus} vCPU = {per_vcpu_hour:.3f} per vCPU-hour; "
        "illustrative, --cost-per-hour, --cost-vcpus)"
    )
    print(
        "capacity cost = 1e6 / sustained req/s / 3600 x price per vCPU-hour (one vCPU "
        "reserved per server process, at its sustained single-row rate)"
    )
    rate = COST_RATE if COST_RATE in RATES else RATES[-1]
    for server in servers:
        single = server.measured[rate]
        bulk = server.measured["bulk"]
        sustained = server.measured["sustained"][0]
        capacity = 1e6 / sustained / 3600 * per_vcpu_hour if sustained else float("inf")
        print(
            f"  {server.name:<7} single rows at {rate} req/s "
            f"{single.cpu_s_per_million / 3600 * per_vcpu_hour:.4f}, "
            f"{BULK_ROWS:,}-row requests {bulk.cpu_s_per_million / 3600 * per_vcpu_hour:.5f}, "
            f"capacity {capacity:.4f} per million"
        )


def print_targets(stemma: Server, sustained: dict, rows_per_s: dict) -> None:
    print("\ntargets")
    for rate, bound in LATENCY_TARGETS:
        if rate in stemma.measured:
            p99 = stemma.measured[rate].outcome.percentile(99)
            verdict(f"stemma p99 <= {bound:.0f} ms at {rate} req/s", f"{p99:.2f} ms", p99 <= bound)
    sustained_ratio = sustained["stemma"] / sustained["mlflow"] if sustained["mlflow"] else None
    verdict(
        f"sustained rate >= {SUSTAINED_RATIO_TARGET:.0f}x mlflow",
        f"{sustained_ratio:.2f}x" if sustained_ratio else "mlflow none",
        sustained["stemma"] > 0
        and (sustained_ratio or SUSTAINED_RATIO_TARGET) >= SUSTAINED_RATIO_TARGET,
    )
    rows_ratio = rows_per_s["stemma"] / rows_per_s["mlflow"]
    verdict(
        f"rows/s >= {ROWS_RATIO_TARGET:.0f}x mlflow",
        f"{rows_ratio:.2f}x",
        rows_ratio >= ROWS_RATIO_TARGET,
    )


def http_stack() -> str:
    """uvicorn's HTTP parser and event loop here: its fast ones when installed."""
    from importlib.util import find_spec

    parser = "httptools" if find_spec("httptools") else "h11 (httptools not installed)"
    loop = "uvloop" if find_spec("uvloop") else "asyncio's loop (uvloop not installed)"
    return f"{parser}, {loop}"


def verdict(target: str, measured: str, met: bool) -> None:
    print(f"  {target:<36} {measured:>10}  {'met' if met else 'NOT MET'}")


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a (mlflow sustained none)"
