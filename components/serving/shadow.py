"""Live shadow: a sample of requests is scored by a second version after it is answered.

A sampled request's rows are offered to :class:`ShadowWorker` once its answer is ready;
the worker keeps them in a bounded queue and scores them with the shadow version only
while no request waits for the model (:meth:`.batching.Batcher.run_when_idle`), coalescing
queued requests into one call. Past ``max_queue_rows`` an offer is dropped and counted:
under load the shadow falls behind and sheds work; the callers never wait for it. The
shadow's scores go to the prediction log beside the served ones, paired by request id
and row.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stemma.components.platform.redaction import redact_url
from stemma.components.runtime.loading import first_line
from stemma.components.serving.batching import Batcher
from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.rows import (
    PreparedRows,
    RequestError,
    ServedModel,
    encode_rows,
    fits_signature,
)

if TYPE_CHECKING:
    from stemma.components.serving.predlog import PredictionLog

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShadowJob:
    """A request's scored rows, waiting for the shadow."""

    served: ServedModel
    prepared: PreparedRows  # the rows, encoded for the shadow
    positions: np.ndarray  # their positions in the request
    request_id: str
    received: float  # time.time() at arrival


class ShadowWorker:
    """The bounded queue of shadow work and the task that scores it when the model is idle.

    Args:
        batcher: the endpoint's batcher, whose idle time the shadow uses.
        sample: share of requests offered.
        max_queue_rows: rows waiting at most; more are dropped and counted.
        max_batch_size: most rows per shadow model call.
        policies: the spec's row policies (a row the shadow cannot take is not scored).
        metrics: where scored, dropped and failed shadow rows are counted.
        log: where the shadow's scores go (None: counted only).
    """

    def __init__(
        self,
        *,
        batcher: Batcher,
        sample: float,
        max_queue_rows: int,
        max_batch_size: int,
        policies: Mapping[str, str],
        metrics: EndpointMetrics,
        log: PredictionLog | None,
    ) -> None:
        self.batcher = batcher
        self.sample = sample
        self.max_queue_rows = max_queue_rows
        self.max_batch_size = max_batch_size
        self.policies = dict(policies)
        self.metrics = metrics
        self.log = log
        self._queue: deque[ShadowJob] = deque()
        self._queued_rows = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._random = random.Random()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stemma-shadow")

    async def stop(self) -> None:
        """Stop: queued shadow work is dropped (and counted)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._queued_rows:
            self._count(None, "dropped", self._queued_rows)
        self._queue.clear()
        self._queued_rows = 0

    def offer(
        self,
        served: ServedModel,
        table: Any,
        positions: np.ndarray,
        ids: list[Any] | None,
        *,
        request_id: str,
        received: float,
    ) -> bool:
        """Queue a sampled request's scored rows for the shadow; False when not taken.

        Args:
            served: the shadow version.
            table: the request's columns for the rows (Arrow), in ``positions`` order.
            positions: the rows' positions in the request.
            ids: the rows' ids, or None.
            request_id: the request's id, which pairs the shadow's scores with the answer.
            received: ``time.time()`` when the request arrived.
        """
        if len(positions) == 0 or self._random.random() >= self.sample:
            return False
        rows = len(positions)
        if self._queued_rows + rows > self.max_queue_rows:
            self._count(served, "dropped", rows)
            return False
        if not fits_signature(served, table):
            self._count(served, "unfit", rows)
            return False
        try:
            prepared = encode_rows(served, table, policies=self.policies, ids=ids)
        except RequestError:
            self._count(served, "unfit", rows)
            return False
        self._queue.append(ShadowJob(served, prepared, positions, request_id, received))
        self._queued_rows += rows
        assert self._arrived is not None, "start() the shadow worker first"
        self._arrived.set()
        return True

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            jobs = self._take()
            await self._score(jobs)

    def _take(self) -> list[ShadowJob]:
        """The oldest jobs for one version, up to ``max_batch_size`` rows (at least one)."""
        jobs: list[ShadowJob] = []
        rows = 0
        while self._queue:
            job = self._queue[0]
            size = len(job.prepared.matrix)
            if jobs and (job.served is not jobs[0].served or rows + size > self.max_batch_size):
                break
            self._queue.popleft()
            self._queued_rows -= len(job.positions)
            jobs.append(job)
            rows += size
        return jobs

    async def _score(self, jobs: list[ShadowJob]) -> None:
        served = jobs[0].served
        matrix = np.concatenate([job.prepared.matrix for job in jobs])
        try:
            outputs = await self.batcher.run_when_idle(served, matrix) if len(matrix) else matrix
        except Exception as error:  # a shadow that fails costs the callers nothing
            self._count(served, "failed", sum(len(job.positions) for job in jobs))
            _LOG.warning("shadow %s failed: %s", served.model.label, redact_url(first_line(error)))
            return
        model = served.model
        scores = model.preprocessor.decode_output(np.asarray(outputs).reshape(len(matrix)))
        start = 0
        for job in jobs:
            kept = job.prepared.kept
            own = scores[start : start + len(kept)]
            start += len(kept)
            self._count(served, "scored", len(kept))
            if len(kept) < len(job.positions):
                self._count(served, "unfit", len(job.positions) - len(kept))
            if self.log is None or len(kept) == 0:
                continue
            ids = job.prepared.ids
            self.log.record_shadow(
                request_id=job.request_id,
                received=job.received,
                rows=job.positions[kept].tolist(),
                ids=None if ids is None else [ids[i] for i in kept.tolist()],
                version=model.version,
                predictions=(
                    [int(score >= model.threshold) for score in own.tolist()]
                    if model.task == "binary"
                    else None
                ),
                scores=own.tolist(),
            )

    def _count(self, served: ServedModel | None, outcome: str, rows: int) -> None:
        version = served.model.version if served is not None else ""
        self.metrics.shadow_rows.labels(outcome=outcome, version=version).inc(rows)
