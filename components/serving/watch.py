"""The served model and the alias it follows: hot swaps, off the hot path.

A background task asks the registry where the alias points every ``poll_s``. When it has
moved, the version it names is loaded with :func:`.runtime.loading.load_scoring_model`
(every file checked against its recorded hashes) in a thread, warmed on one row, and only
then swapped in, by replacing one reference: a request keeps the model it was checked
against, so batches already queued finish on the old one. A load that fails keeps the old
model, is logged with its reason, counted, and tried again only after
:data:`FAILED_LOAD_RETRY_S` (or when the alias moves elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stemma.components.platform.redaction import redact_url
from stemma.components.runtime.loading import ScoringModel, first_line
from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.rows import ServedModel

if TYPE_CHECKING:
    from mlflow import MlflowClient

_LOG = logging.getLogger(__name__)

#: Seconds before a version that failed to load is tried again under the same alias.
FAILED_LOAD_RETRY_S = 60.0


@dataclass(frozen=True)
class LoadFailure:
    """The last version that could not be loaded, and why."""

    version: str
    reason: str
    at: float  # time.monotonic()


def warm(model: ScoringModel) -> None:
    """Run the model once on one row (all zeros), so the first request pays no set-up."""
    outputs = model.runtime.run(np.zeros((1, model.runtime.width), dtype=np.float32))
    model.preprocessor.decode_output(outputs.reshape(1))


class ModelWatch:
    """The model being served, swapped when its alias moves.

    Args:
        served: the model loaded at start.
        reference: ``models:/<name>@<alias>``, what is served.
        load: loads ``reference`` (checked, not yet warmed); runs in a thread.
        resolve: the version ``reference`` names now, cheaply; runs in a thread.
        poll_s: seconds between two looks at the alias.
        metrics: where swaps and failed loads are counted.
    """

    def __init__(
        self,
        served: ServedModel,
        *,
        reference: str,
        load: Callable[[], ScoringModel],
        resolve: Callable[[], str],
        poll_s: float,
        metrics: EndpointMetrics,
    ) -> None:
        self.current = served
        self.reference = reference
        self.poll_s = poll_s
        self.metrics = metrics
        self.failure: LoadFailure | None = None
        self._load = load
        self._resolve = resolve
        self._task: asyncio.Task[None] | None = None
        metrics.serving(served.model.name, served.model.version, served.alias)

    def start(self) -> None:
        """Start polling the alias on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stemma-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.check()

    async def check(self) -> bool:
        """Look at the alias once; load, warm and swap when it moved. True when swapped."""
        try:
            version = await asyncio.to_thread(self._resolve)
        except Exception as error:  # the registry is away: keep serving, say so once a poll
            _LOG.warning(
                "cannot read %s: %s; still serving %s",
                self.reference,
                redact_url(first_line(error)),
                self.current.model.label,
            )
            return False
        if version == self.current.model.version or self._failed_recently(version):
            return False
        _LOG.info("%s moved to v%s: loading it", self.reference, version)
        try:
            model = await asyncio.to_thread(self._load_warm)
        except Exception as error:  # StemmaError (refused, unreadable) or anything else
            reason = redact_url(first_line(error))
            self.failure = LoadFailure(version=version, reason=reason, at=time.monotonic())
            self.metrics.model_loads.labels(result="failed").inc()
            _LOG.warning(
                "could not load v%s of %s; still serving %s: %s",
                version,
                self.reference,
                self.current.model.label,
                reason,
            )
            return False
        if model.version == self.current.model.version:  # moved back meanwhile
            return False
        previous = self.current.model.label
        if model.signature_columns != self.current.model.signature_columns:
            _LOG.warning(
                "%s takes other columns than %s: requests are checked against the new ones",
                model.label,
                previous,
            )
        self.current = ServedModel.of(model, self.current.alias)
        self.failure = None
        self.metrics.model_loads.labels(result="swapped").inc()
        self.metrics.serving(model.name, model.version, self.current.alias)
        _LOG.info("now serving %s (was %s)", model.label, previous)
        return True

    def _failed_recently(self, version: str) -> bool:
        failure = self.failure
        return (
            failure is not None
            and failure.version == version
            and time.monotonic() - failure.at < FAILED_LOAD_RETRY_S
        )

    def _load_warm(self) -> ScoringModel:
        model = self._load()
        warm(model)
        return model


def registry_callables(
    client: MlflowClient,
    reference: str,
    *,
    architectures: tuple[str, ...],
) -> tuple[Callable[[], ScoringModel], Callable[[], str]]:
    """``load`` and ``resolve`` for :class:`ModelWatch`, on an MLflow registry.

    Args:
        client: the registry's client.
        reference: ``models:/<name>@<alias>``.
        architectures: the architectures the spec allows besides the built-ins.
    """
    from stemma.components.platform.refs import parse_model_ref
    from stemma.components.runtime.loading import load_scoring_model

    parsed = parse_model_ref(reference)

    def load() -> ScoringModel:
        return load_scoring_model(reference, client=client, architectures=architectures)

    def resolve() -> str:
        version = client.get_model_version_by_alias(parsed.name, str(parsed.alias))
        return str(version.version)

    return load, resolve
