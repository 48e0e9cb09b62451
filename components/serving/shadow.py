"""Live shadow: a sample of requests is scored by a second version after it is answered.

A sampled request's rows are offered to :class:`ShadowWorker` once its answer is ready;
the worker keeps them in a bounded queue and, only once the model has been quiet for a
moment (:meth:`.batching.Batcher.wait_quiet`), encodes them for the shadow version and
scores them, coalescing queued requests into calls of at most :data:`MAX_CALL_ROWS` rows. Past ``max_queue_rows`` an offer is dropped and counted:
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
from stemma.components.serving.routing import decode_rows
from stemma.components.serving.rows import (
    PreparedRows,
    ServedModel,
    encode_for,
)

if TYPE_CHECKING:
    from stemma.components.serving.predlog import PredictionLog

_LOG = logging.getLogger(__name__)

#: Most rows of one shadow call: a request arriving during it waits for it, so it is short.
MAX_CALL_ROWS = 64


@dataclass(frozen=True)
class ShadowJob:
    """A request's scored rows, waiting for the shadow."""

    served: ServedModel
    table: Any  # the request's columns (Arrow), every row
    ids: list[Any] | None  # the request's ids, every row
    positions: np.ndarray  # the positions of the rows to shadow, in the request
    request_id: str
    received: float  # time.time() at arrival


class ShadowWorker:
    """The bounded queue of shadow work and the task that scores it when the model is idle.

    Args:
        batcher: the endpoint's batcher, whose idle time the shadow uses.
        sample: share of requests offered.
        max_queue_rows: rows waiting at most; more are dropped and counted.
        max_batch_size: the endpoint's most rows per model call (a shadow call holds at
            most :data:`MAX_CALL_ROWS` of them).
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
        self.max_call_rows = min(max_batch_size, MAX_CALL_ROWS)
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
        busy: bool = False,
    ) -> bool:
        """Queue a sampled request's scored rows for the shadow; False when not taken.

        Nothing is copied or encoded here (the worker does it when the model is quiet):
        an offer costs the request a sampling draw and an append.

        Args:
            served: the shadow version.
            table: the request's columns (Arrow).
            positions: the positions of the rows to shadow (the scored ones), ascending.
            ids: the request's ids, or None.
            request_id: the request's id, which pairs the shadow's scores with the answer.
            received: ``time.time()`` when the request arrived.
            busy: requests are queued for the model: the shadow would only fall further
                behind, so the rows are dropped (and counted) at once.
        """
        if len(positions) == 0 or self._random.random() >= self.sample:
            return False
        rows = len(positions)
        if busy or self._queued_rows + rows > self.max_queue_rows:
            self._count(served, "dropped", rows)
            return False
        self._queue.append(ShadowJob(served, table, ids, positions, request_id, received))
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
            await self.batcher.wait_quiet()
            encoded = self._encode(self._take())
            if encoded:
                await self._score(encoded)

    def _take(self) -> list[ShadowJob]:
        """The oldest jobs for one version, up to ``max_call_rows`` rows (at least one)."""
        jobs: list[ShadowJob] = []
        rows = 0
        while self._queue:
            job = self._queue[0]
            size = len(job.positions)
            if jobs and (job.served is not jobs[0].served or rows + size > self.max_call_rows):
                break
            self._queue.popleft()
            self._queued_rows -= size
            jobs.append(job)
            rows += size
        return jobs

    def _encode(self, jobs: list[ShadowJob]) -> list[tuple[ShadowJob, PreparedRows]]:
        """The jobs' rows encoded for the shadow; rows it cannot take are counted unfit."""
        encoded = []
        for job in jobs:
            ids = None if job.ids is None else [job.ids[p] for p in job.positions.tolist()]
            table = job.table.take(job.positions)
            prepared = encode_for(job.served, table, policies=self.policies, ids=ids)
            if prepared is None:
                self._count(job.served, "unfit", len(job.positions))
                continue
            encoded.append((job, prepared))
        return encoded

    async def _score(self, encoded: list[tuple[ShadowJob, PreparedRows]]) -> None:
        served = encoded[0][0].served
        matrix = np.concatenate([prepared.matrix for _, prepared in encoded])
        try:
            outputs = await self.batcher.run_now(served, matrix) if len(matrix) else matrix
        except Exception as error:  # a shadow that fails costs the callers nothing
            self._count(served, "failed", sum(len(job.positions) for job, _ in encoded))
            _LOG.warning("shadow %s failed: %s", served.model.label, redact_url(first_line(error)))
            return
        model = served.model
        decoded = decode_rows(model, np.asarray(outputs))
        start = 0
        for job, prepared in encoded:
            kept = prepared.kept
            own = slice(start, start + len(kept))
            start += len(kept)
            self._count(served, "scored", len(kept))
            if len(kept) < len(job.positions):
                self._count(served, "unfit", len(job.positions) - len(kept))
            if self.log is None or len(kept) == 0:
                continue
            ids = prepared.ids
            self.log.record_shadow(
                request_id=job.request_id,
                received=job.received,
                rows=job.positions[kept].tolist(),
                ids=None if ids is None else [ids[i] for i in kept.tolist()],
                version=model.version,
                predictions=None if decoded.predictions is None else decoded.predictions[own],
                scores=decoded.scores[own],
                probabilities=(
                    None if decoded.probabilities is None else decoded.probabilities[own]
                ),
            )

    def _count(self, served: ServedModel | None, outcome: str, rows: int) -> None:
        version = served.model.version if served is not None else ""
        self.metrics.shadow_rows.labels(outcome=outcome, version=version).inc(rows)
