"""Live shadow's cost to the callers: the endpoint with and without a shadow, same run.

Run with `.venv/bin/pytest tests/benchmarks/bench_endpoint_shadow.py -m benchmark -s`.

The model of bench_endpoint is registered a second time (the same files, another
version) and named `challenger`; one `stemma endpoint` serves the champion alone, another
also shadows every request (`endpoint.shadow.sample=1.0`) with the challenger. Both run
pinned to one core, in turns (plain, shadow, plain, shadow), under the same open-loop load
of single-row requests from the other core; the figure is the callers' p99 with the
shadow over their p99 without it (target: at most 1.2), at a calm rate and at one past
what the core holds, where the shadow must shed its work (counted) rather than delay
answers.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from stemma.components.platform.tracking import configure_tracking
from tests.benchmarks import bench_endpoint
from tests.benchmarks.bench_endpoint import Server, build_servers, measure
from tests.benchmarks.open_loop import LoadGenerator, split_cores
from tests.support import isolated_mlflow

pytestmark = pytest.mark.benchmark

#: bench_endpoint's project: a credit-shaped MLP registered as credit@champion.
project = bench_endpoint.project

#: Rates of single-row requests: well within one core, and past it.
RATES = [int(r) for r in os.environ.get("STEMMA_BENCH_SHADOW_RATES", "200,1500").split(",")]
SECONDS = float(os.environ.get("STEMMA_BENCH_SECONDS", "5"))
#: Plain and shadowed runs alternate this many times at each rate.
TURNS = 2
P99_RATIO_TARGET = 1.2


def register_challenger(project: dict) -> str:
    with isolated_mlflow():  # the registry resolves a model's source on the current store
        configure_tracking(project["root"])
        client = MlflowClient()
        champion = client.get_model_version_by_alias("credit", "champion")
        version = client.create_model_version(
            "credit",
            champion.source,
            run_id=champion.run_id,
            model_id=getattr(champion, "model_id", None),
            tags=champion.tags,
        )
        client.set_registered_model_alias("credit", "challenger", version.version)
        return str(version.version)


def shadow_rows(server: Server) -> dict[str, float]:
    text = httpx.get(server.base + "/metrics", timeout=5).text
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "stemma_endpoint_shadow_rows"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_the_shadow_costs_the_callers_little(project):
    challenger = register_challenger(project)
    server_cores, load_cores = split_cores()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": project["uri"],
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    plain = build_servers(project)[0]
    shadowed = build_servers(project)[0]
    shadowed.name = "shadow"
    shadowed.command += ["--set", "endpoint.shadow.sample=1.0"]
    p99: dict[tuple[str, int], list[float]] = {}
    counts: dict[int, dict[str, float]] = {}
    with LoadGenerator(load_cores) as generator:
        for rate in RATES:
            for _ in range(TURNS):
                for server in (plain, shadowed):
                    server.start(project["root"], env, server_cores)
                    try:
                        if server is shadowed:
                            wait_for_shadow(server, challenger)
                        run = measure(generator, server, rate, SECONDS)
                        p99.setdefault((server.name, rate), []).append(run.outcome.percentile(99))
                        if server is shadowed:
                            rows = shadow_rows(server)
                            for outcome, value in rows.items():
                                counts.setdefault(rate, {}).setdefault(outcome, 0.0)
                                counts[rate][outcome] += value
                    finally:
                        server.stop()
    print(f"\nserver on core(s) {server_cores}, load on {generator.pinned}; {TURNS} turns each")
    print(" req/s   p99 plain ms   p99 shadow ms   ratio   shadow rows (scored / dropped)")
    ratios = {}
    for rate in RATES:
        base = statistics.median(p99[("stemma", rate)])
        with_shadow = statistics.median(p99[("shadow", rate)])
        ratios[rate] = with_shadow / base
        rows = counts.get(rate, {})
        print(
            f"{rate:6d} {base:14.2f} {with_shadow:15.2f} {ratios[rate]:7.2f}   "
            f"{rows.get('scored', 0):.0f} / {rows.get('dropped', 0):.0f}"
        )
    for rate, value in ratios.items():
        met = "met" if value <= P99_RATIO_TARGET else "NOT MET"
        print(f"target p99 with shadow <= {P99_RATIO_TARGET}x without, at {rate} req/s: {met}")
    assert counts[RATES[0]].get("scored", 0) > 0


def wait_for_shadow(server: Server, version: str, timeout_s: float = 30) -> None:
    import time

    limit = time.monotonic() + timeout_s
    while time.monotonic() < limit:
        ready = httpx.get(server.base + "/ready", timeout=5).json()
        if ready.get("shadow", {}).get("version") == version:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name}: the shadow v{version} did not load")
