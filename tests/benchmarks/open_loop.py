"""Open-loop HTTP load from worker processes pinned to cores the server does not use.

Request *i* of a run is due at ``start + i / rate``, whatever happened to the requests
before it, and its latency counts from that due time: a server that falls behind cannot
slow the sender and hide its queue (coordinated omission). A request the sender itself
starts late still counts from its due time; the lag is reported apart, so that a sender
too slow for a rate shows as such instead of passing for a slow server.

The workers are processes (asyncio + aiohttp each), pinned with ``os.sched_setaffinity``
to the cores the server was not given, and started once per :class:`LoadGenerator`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

#: Connections one worker may hold open at once; a request past them waits, and counts.
CONNECTIONS_PER_WORKER = 512
#: Seconds before the first due time, for every worker to be ready to send.
START_DELAY_S = 0.5
#: A request the sender starts later than this (ms) after its due time counts as late.
LATE_MS = 2.0


@dataclass(frozen=True)
class Load:
    """What to send: ``rate`` requests a second in all, for ``warmup_s + seconds``.

    Requests due during the warm-up open the connections and are sent like the others but
    not measured.
    """

    url: str
    bodies: Sequence[bytes]
    rate: float
    seconds: float
    warmup_s: float = 1.0
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Outcome:
    """The measured requests of a run (warm-up excluded), in milliseconds."""

    latency_ms: np.ndarray  # due time to the whole answer read
    lag_ms: np.ndarray  # due time to the request's start by the sender
    failures: int  # not 200, or no answer within the timeout
    answered: int  # 200s over the whole run, warm-up included
    elapsed_s: float  # first due time to the last answer, warm-up included

    def percentile(self, share: float) -> float:
        return float(np.percentile(self.latency_ms, share)) if len(self.latency_ms) else np.nan

    @property
    def late_share(self) -> float:
        """Share of the requests the sender started over :data:`LATE_MS` after their due
        time: high, and the sender (not the server) is what limits the run."""
        return float(np.mean(self.lag_ms > LATE_MS)) if len(self.lag_ms) else np.nan


@dataclass(frozen=True)
class Throughput:
    """A closed-loop run: answers per second with ``concurrency`` requests always in flight."""

    answered: int  # 200s in the measured window
    failures: int  # in the measured window
    seconds: float  # the measured window
    answered_in_all: int  # 200s over the whole run, warm-up included

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds


def split_cores(server_cores: int = 1) -> tuple[list[int], list[int]]:
    """The cores for the server and for the load, apart where the machine has more than
    ``server_cores``; the same cores for both where it has not."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) <= server_cores:
        return available, available
    return available[:server_cores], available[server_cores:]


def _pin(cores: Sequence[int]) -> None:
    os.sched_setaffinity(0, set(cores))


def _affinity(_: int) -> tuple[int, ...]:
    """The cores a worker may run on (after :func:`_pin`)."""
    return tuple(sorted(os.sched_getaffinity(0)))


class LoadGenerator:
    """Worker processes that send :class:`Load` runs, each pinned to ``cores``.

    Args:
        cores: where the workers run.
        workers: how many (default: one per core, at most 2).
    """

    def __init__(self, cores: Sequence[int], workers: int | None = None) -> None:
        self.cores = list(cores)
        self.workers = workers or min(2, len(self.cores))
        # spawn: the workers import this module alone, not the benchmark's heavy imports.
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_pin,
            initargs=(self.cores,),
        )
        # Start the workers now, so that no run pays a process start.
        self.pinned = sorted(set(self._pool.map(_affinity, range(self.workers))))

    def run(self, load: Load) -> Outcome:
        """Send ``load`` from every worker (each takes every n-th request) and merge."""
        start = time.monotonic() + START_DELAY_S
        futures = [
            self._pool.submit(_send_share, load, start, index, self.workers)
            for index in range(self.workers)
        ]
        parts = [future.result() for future in futures]
        return Outcome(
            latency_ms=np.concatenate([part[0] for part in parts]),
            lag_ms=np.concatenate([part[1] for part in parts]),
            failures=sum(part[2] for part in parts),
            answered=sum(part[3] for part in parts),
            elapsed_s=max(part[4] for part in parts) - start,
        )

    def saturate(self, load: Load, concurrency: int) -> Throughput:
        """Keep ``concurrency`` requests in flight (split over the workers) for
        ``load.seconds`` after ``load.warmup_s`` (closed loop: ``load.rate`` is not used)."""
        start = time.monotonic() + START_DELAY_S
        shares = [concurrency // self.workers] * self.workers
        shares[0] += concurrency - sum(shares)
        futures = [self._pool.submit(_saturate_share, load, start, share) for share in shares]
        parts = [future.result() for future in futures]
        return Throughput(
            answered=sum(part[0] for part in parts),
            failures=sum(part[1] for part in parts),
            seconds=load.seconds,
            answered_in_all=sum(part[2] for part in parts),
        )

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _send_share(load: Load, start: float, index: int, workers: int) -> tuple:
    """One worker's share of a run: requests ``index``, ``index + workers``, ..."""
    return asyncio.run(_send(load, start, index, workers))


async def _send(load: Load, start: float, index: int, workers: int) -> tuple:
    import aiohttp

    total = int(load.rate * (load.warmup_s + load.seconds))
    measured_from = int(load.rate * load.warmup_s)
    latency: list[float] = []
    lag: list[float] = []
    failures = answered = 0
    finished = start
    loop = asyncio.get_running_loop()  # its clock is time.monotonic, shared by processes
    connector = aiohttp.TCPConnector(limit=CONNECTIONS_PER_WORKER)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(number: int, due: float) -> None:
            nonlocal failures, answered, finished
            began = loop.time()
            try:
                body = load.bodies[number % len(load.bodies)]
                async with session.post(load.url, data=body, headers=load.headers) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            done = loop.time()
            finished = max(finished, done)
            answered += ok
            if number >= measured_from:
                latency.append((done - due) * 1000)
                lag.append((began - due) * 1000)
                failures += not ok

        tasks = []
        for number in range(index, total, workers):
            due = start + number / load.rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            tasks.append(asyncio.create_task(one(number, due)))
        await asyncio.gather(*tasks)
    return np.array(latency), np.array(lag), failures, answered, finished


def _saturate_share(load: Load, start: float, concurrency: int) -> tuple[int, int, int]:
    return asyncio.run(_saturate(load, start, concurrency))


async def _saturate(load: Load, start: float, concurrency: int) -> tuple[int, int, int]:
    import aiohttp

    loop = asyncio.get_running_loop()
    measure_from = start + load.warmup_s
    measure_until = measure_from + load.seconds
    answered = failures = answered_in_all = 0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS_PER_WORKER)
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def sender(number: int) -> None:
            nonlocal answered, failures, answered_in_all
            await asyncio.sleep(max(0.0, start - loop.time()))
            while loop.time() < measure_until:
                body = load.bodies[number % len(load.bodies)]
                number += concurrency
                try:
                    async with session.post(load.url, data=body, headers=load.headers) as answer:
                        await answer.read()
                        ok = answer.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                answered_in_all += ok
                # An answer counts when it arrives inside the measured window.
                if measure_from <= loop.time() < measure_until:
                    answered += ok
                    failures += not ok

        await asyncio.gather(*(sender(number) for number in range(concurrency)))
    return answered, failures, answered_in_all
