"""Options of the benchmarks (given with a path under tests/benchmarks)."""

from __future__ import annotations

import os

#: Illustrative price of a 2-vCPU cloud machine per hour, for cost per million predictions.
DEFAULT_COST_PER_HOUR = 0.10
DEFAULT_COST_VCPUS = 2


def pytest_addoption(parser):
    group = parser.getgroup("stemma benchmarks")
    group.addoption(
        "--cost-per-hour",
        type=float,
        default=float(os.environ.get("STEMMA_BENCH_COST_PER_HOUR", DEFAULT_COST_PER_HOUR)),
        help=(
            "price of a machine per hour, for bench_endpoint's cost per million predictions "
            f"(default {DEFAULT_COST_PER_HOUR}: illustrative, about a 2-vCPU cloud machine)"
        ),
    )
    group.addoption(
        "--cost-vcpus",
        type=int,
        default=int(os.environ.get("STEMMA_BENCH_COST_VCPUS", DEFAULT_COST_VCPUS)),
        help=f"vCPUs of that machine (default {DEFAULT_COST_VCPUS})",
    )
