"""Online latency: `stemma endpoint` against `mlflow models serve`, open loop, same model.

Run with `.venv/bin/pytest tests/benchmarks/bench_endpoint.py -m benchmark -s`
(`STEMMA_BENCH_RATES=100,500` and `STEMMA_BENCH_SECONDS=5` to change the load).

One credit-shaped MLP (64x32, 9 features) is registered in a local MLflow store; both
servers run in processes of their own on loopback and serve that version. The load
generator is open loop: request *i* is due at ``start + i / rate`` whatever happened to
the ones before, and its latency counts from that due time, so a slow server cannot hide
its queue by slowing the sender (coordinated omission). Single-row requests; p50, p95 and
p99 per rate and server, and the ratio of p99s, measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.platform.tags import WEIGHTS_SHA256
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.spec import load_spec
from tests.support import free_port, isolated_mlflow, log_trained_model

pytestmark = pytest.mark.benchmark

RATES = [int(rate) for rate in os.environ.get("STEMMA_BENCH_RATES", "100,500,1000").split(",")]
SECONDS = float(os.environ.get("STEMMA_BENCH_SECONDS", "5"))
#: Connections the generator may open at once; a request past them waits (and counts).
CONNECTIONS = 512


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


async def open_loop(url: str, bodies: list[bytes], rate: int, seconds: float) -> dict:
    """Send ``rate`` requests a second for ``seconds``, each due at a fixed time."""
    count = int(rate * seconds)
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        async def one(index: int) -> None:
            nonlocal failures
            due = start + index / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                response = await client.post(
                    url,
                    content=bodies[index % len(bodies)],
                    headers={"Content-Type": "application/json"},
                )
                if response.status_code != 200:
                    failures += 1
            except httpx.HTTPError:
                failures += 1
            latencies.append(loop.time() - due)

        await asyncio.gather(*(one(index) for index in range(count)))
    values = np.array(latencies) * 1000
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "p99": float(np.percentile(values, 99)),
        "failures": failures,
    }


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
    rows = json.loads(
        frame.drop(columns=["approved", "applied_at"]).head(200).to_json(orient="records")
    )
    return {"root": root, "config": config, "uri": uri, "rows": rows}


def test_open_loop_latency_against_mlflow_models_serve(project):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": project["uri"],
        "PYTHONWARNINGS": "ignore",
        # mlflow models serve starts `uvicorn` by name
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    stemma_port, mlflow_port = free_port(), free_port()
    servers = {
        "stemma": (
            [
                str(bin_dir / "stemma"),
                "endpoint",
                str(project["config"]),
                "--port",
                str(stemma_port),
            ],
            f"http://127.0.0.1:{stemma_port}",
            "/ready",
            "/v1/predict",
            [json.dumps(row).encode() for row in project["rows"]],
        ),
        "mlflow": (
            [
                str(bin_dir / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/credit/1",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(mlflow_port),
            ],
            f"http://127.0.0.1:{mlflow_port}",
            "/ping",
            "/invocations",
            [json.dumps({"dataframe_records": [row]}).encode() for row in project["rows"]],
        ),
    }
    processes = {}
    results: dict[str, dict[int, dict]] = {}
    try:
        for name, (command, base, health, _, _) in servers.items():
            processes[name] = subprocess.Popen(
                command,
                cwd=project["root"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            wait_until_up(base + health, processes[name])
        for rate in RATES:
            for name, (_, base, _, path, bodies) in servers.items():
                asyncio.run(open_loop(base + path, bodies, rate, 1.0))  # warm-up
                results.setdefault(name, {})[rate] = asyncio.run(
                    open_loop(base + path, bodies, rate, SECONDS)
                )
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(30)
    print(f"\nopen-loop single-row requests, {SECONDS:.0f} s per rate, ms from the due time")
    for rate in RATES:
        line = [f"{rate:>5} req/s"]
        for name in servers:
            r = results[name][rate]
            line.append(
                f"{name}: p50 {r['p50']:7.2f} p95 {r['p95']:7.2f} p99 {r['p99']:8.2f}"
                f" failed {r['failures']}"
            )
        ratio = results["mlflow"][rate]["p99"] / results["stemma"][rate]["p99"]
        line.append(f"p99 mlflow/stemma {ratio:5.2f}x")
        print(" | ".join(line))
    assert all(results["stemma"][rate]["failures"] == 0 for rate in RATES[:1])
    assert statistics.mean(results["stemma"][rate]["p50"] for rate in RATES) > 0
