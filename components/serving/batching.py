"""Adaptive batching: requests coalesced into one model call, on a bounded queue.

One asyncio task takes the queued requests, oldest first, and runs them as one call of
the model's runtime in a worker thread (``Runtime.run`` is thread-safe; the event loop
keeps answering meanwhile). A batch holds at most ``max_batch_size`` rows, all for the
same served model (requests keep the model they were checked against, so a batch queued
before an alias swap finishes on the old model).

When the worker is free the batch goes at once, unless more requests are expected within
``max_wait_ms`` of the oldest one's arrival (the gap between recent arrivals, smoothed,
says so): at low traffic a request never waits for company, under load the rows that
queued while the model ran go together. This is BentoML's idea (wait only while waiting
pays) without its latency regression, and Ray Serve's ``max_batch_size`` /
``batch_wait_timeout_s`` as the bounds.

The queue holds at most ``max_queue_rows`` rows: a request beyond it is refused at once
(:class:`QueueFull`, which carries a Retry-After), never left to time out. A request with
a deadline is refused when the queue ahead of it cannot clear in time
(:class:`DeadlineMissed`), and dropped unscored when its deadline passes in the queue.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.rows import RequestError, ServedModel

#: Weight of the newest observation in the smoothed arrival gap and batch time.
SMOOTHING = 0.2
#: Seconds without a new request before work that must not delay answers may run.
QUIET_S = 0.002
#: Retry-After, in whole seconds, is at least this.
MIN_RETRY_AFTER_S = 1


class QueueFull(RequestError):
    """The queue has no room for the request's rows: 503 with Retry-After."""

    def __init__(self, rows: int, queued: int, limit: int, retry_after_s: int) -> None:
        super().__init__(
            503,
            f"overloaded: {queued} rows are queued and {rows} more would pass the limit of {limit}",
            [f"retry after {retry_after_s} s, or raise endpoint.max_queue_rows"],
        )
        self.retry_after_s = retry_after_s


class DeadlineMissed(RequestError):
    """The request's deadline cannot be met, or passed while it was queued."""


@dataclass(eq=False)
class Job:
    """One request's rows on their way through the model."""

    served: ServedModel
    matrix: np.ndarray
    enqueued: float  # loop time
    deadline: float | None  # loop time, or None
    future: asyncio.Future[np.ndarray] = field(repr=False)

    @property
    def rows(self) -> int:
        return len(self.matrix)


class Batcher:
    """The bounded queue and the task that turns it into model calls.

    Args:
        max_batch_size: most rows per model call (a bigger request runs alone).
        max_wait_ms: longest the oldest request of a batch waits for others.
        max_queue_rows: most rows queued at once.
        metrics: where queue depth, waits, inference times and batch sizes go.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_rows: int,
        metrics: EndpointMetrics,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # One model call at a time: the runtime's own threads use the cores.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stemma-endpoint")
        self._last_arrival: float | None = None
        self._idle: asyncio.Event | None = None  # set while nothing is queued or running
        self._calling = False  # a batch's model call is running
        self._gap_s = self.max_wait_s  # smoothed time between arrivals
        self._batch_s = 0.0  # smoothed duration of a model call

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        """Start the batching task on the running loop."""
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stemma-batcher")

    async def stop(self) -> None:
        """Stop taking batches; queued requests are refused; the model call in flight ends."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            job = self._take_one()
            if not job.future.done():
                job.future.set_exception(RequestError(503, "the endpoint is shutting down"))
        self._worker.shutdown(wait=True)

    def submit(self, served: ServedModel, matrix: np.ndarray, deadline_s: float | None) -> Job:
        """Queue a request's rows; await the returned job's ``future`` for their raw outputs.

        Args:
            served: the model the rows were checked against and are scored with.
            matrix: the network's input rows.
            deadline_s: seconds from now within which the answer is needed, or None.

        Raises:
            QueueFull: the rows do not fit in the queue.
            DeadlineMissed: the queue ahead cannot clear within ``deadline_s``.
        """
        assert self._arrived is not None, "start() the batcher first"
        loop = asyncio.get_running_loop()
        now = loop.time()
        rows = len(matrix)
        if self._queued_rows + rows > self.max_queue_rows:
            raise QueueFull(rows, self._queued_rows, self.max_queue_rows, self._retry_after())
        if deadline_s is not None:
            expected = self._expected_wait_s(rows)
            if deadline_s <= 0 or expected > deadline_s:
                raise DeadlineMissed(
                    503,
                    f"the deadline of {deadline_s * 1000:.1f} ms cannot be met: about "
                    f"{expected * 1000:.1f} ms of work is ahead of this request",
                    ["retry with a longer X-Stemma-Deadline-Ms, or later"],
                )
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self._gap_s += SMOOTHING * (gap - self._gap_s)
        self._last_arrival = now
        job = Job(
            served=served,
            matrix=matrix,
            enqueued=now,
            deadline=None if deadline_s is None else now + deadline_s,
            future=loop.create_future(),
        )
        self._queue.append(job)
        self._queued_rows += rows
        self.metrics.queue_rows.set(self._queued_rows)
        self._arrived.set()
        assert self._idle is not None
        self._idle.clear()
        return job

    async def wait_quiet(self) -> None:
        """Return once no request waits or runs and none arrived for :data:`QUIET_S`.

        Work that must never delay an answer (the shadow's) waits here, then runs with
        :meth:`run_now` without awaiting anything in between. Under steady load the
        model is never quiet that long, so such work waits (and its bounded queue sheds)
        instead of taking the model's time from requests; a request that arrives during
        it waits for that one call at most.
        """
        assert self._idle is not None, "start() the batcher first"
        loop = asyncio.get_running_loop()
        while True:
            await self._idle.wait()
            if self._queue or self._calling:
                self._idle.clear()
                continue
            quiet = loop.time() - (self._last_arrival or -math.inf)
            if quiet >= QUIET_S:
                return
            await asyncio.sleep(QUIET_S - quiet)

    async def run_now(self, served: ServedModel, matrix: np.ndarray) -> np.ndarray:
        """Run ``matrix`` through ``served``'s model in the batches' worker thread."""
        assert self._idle is not None, "start() the batcher first"
        self._idle.clear()
        self._calling = True
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._worker, served.model.runtime.run, matrix
            )
        finally:
            self._calling = False
            if not self._queue:
                self._idle.set()

    def _expected_wait_s(self, rows: int) -> float:
        """Model calls ahead of a request of ``rows`` rows, times a call's smoothed duration."""
        calls = math.ceil((self._queued_rows + rows) / self.max_batch_size)
        return calls * self._batch_s

    def _retry_after(self) -> int:
        return max(MIN_RETRY_AFTER_S, math.ceil(self._expected_wait_s(0)))

    def _take_one(self) -> Job:
        job = self._queue.popleft()
        self._queued_rows -= job.rows
        self.metrics.queue_rows.set(self._queued_rows)
        return job

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill(loop)
            batch = self._take_batch(loop.time())
            if batch:
                await self._call(loop, batch)
            if not self._queue:
                assert self._idle is not None
                self._idle.set()

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for more rows while the batch has room and more are expected in time."""
        assert self._arrived is not None
        close_at = self._queue[0].enqueued + self.max_wait_s
        while self._queued_rows < self.max_batch_size:
            remaining = close_at - loop.time()
            if remaining <= 0 or self._gap_s >= remaining:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self, now: float) -> list[Job]:
        """The oldest requests for one model, up to ``max_batch_size`` rows (at least one);
        requests whose deadline passed are answered 504 and left out."""
        batch: list[Job] = []
        rows = 0
        while self._queue:
            job = self._queue[0]
            if batch and (
                job.served is not batch[0].served or rows + job.rows > self.max_batch_size
            ):
                break
            self._take_one()
            if job.future.done():  # its caller gave up (disconnected or timed out)
                continue
            if job.deadline is not None and now > job.deadline:
                job.future.set_exception(
                    DeadlineMissed(504, "the deadline passed while the request was queued")
                )
                continue
            self.metrics.queue_wait.observe(now - job.enqueued)
            batch.append(job)
            rows += job.rows
        return batch

    async def _call(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        """Run one model call in the worker thread and hand each request its rows."""
        matrix = batch[0].matrix if len(batch) == 1 else np.concatenate([j.matrix for j in batch])
        runtime = batch[0].served.model.runtime
        started = time.perf_counter()
        self._calling = True
        try:
            outputs = await loop.run_in_executor(self._worker, runtime.run, matrix)
        except Exception as error:  # a model that fails: every caller gets a 500 saying so
            failure = RequestError(
                500, f"the model call failed: {type(error).__name__}", [str(error)[:300]]
            )
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(failure)
            return
        finally:
            self._calling = False
        elapsed = time.perf_counter() - started
        self._batch_s += SMOOTHING * (elapsed - self._batch_s)
        self.metrics.inference.observe(elapsed)
        self.metrics.batch_rows.observe(len(matrix))
        self.metrics.batch_requests.observe(len(batch))
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(outputs[start : start + job.rows])
            start += job.rows
