"""The served models and the registry state they follow: hot swaps, off the hot path.

A background task reads the registered model every ``poll_s`` (one request: its aliases
and its tags). Three roles follow it:

* the **champion**, the version ``endpoint.alias`` names, which answers every request not
  routed elsewhere;
* the **canary**, while a canary step runs (the state ``stemma run canary`` records on the
  registered model, read by :func:`.registry.routing.live_canary`): its challenger serves
  the entities whose stable hash falls in the canary's share;
* the **shadow**, the version ``endpoint.shadow.alias`` names (when shadowing is on and it
  differs from the champion): it scores a sample of requests after they are answered.

When a role's version changes, that version is loaded with
:func:`.runtime.loading.load_scoring_model` (every file checked against its recorded
hashes) in a thread, warmed on one row, and only then swapped in, by replacing one
reference: a request keeps the models it was routed with, so batches already queued
finish on the old ones. A version already loaded for another role is reused (a promoted
canary challenger becomes the champion without a second load). A load that fails keeps
the role as it was (the champion keeps serving; a canary or shadow that cannot load is
off), is logged with its reason, counted, reported by ``/ready``, and tried again only
after :data:`FAILED_LOAD_RETRY_S` (or when the registry names another version).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stemma.components.platform.redaction import redact_url
from stemma.components.platform.refs import format_model_ref
from stemma.components.registry.routing import CanaryRoute, live_canary
from stemma.components.runtime.loading import ScoringModel, first_line
from stemma.components.serving.metrics import EndpointMetrics
from stemma.components.serving.rows import ServedModel

if TYPE_CHECKING:
    from mlflow import MlflowClient

_LOG = logging.getLogger(__name__)

#: Seconds before a version that failed to load is tried again in the same role.
FAILED_LOAD_RETRY_S = 60.0
#: The roles a loaded version can have.
CHAMPION = "champion"
CANARY = "canary"
SHADOW = "shadow"


@dataclass(frozen=True)
class LoadFailure:
    """The last version that could not be loaded in a role, and why."""

    version: str
    reason: str
    at: float  # time.monotonic()


@dataclass(frozen=True)
class RegistryView:
    """What the endpoint follows on the registered model, read in one request.

    Attributes:
        aliases: ``{alias: version}``.
        canary: the canary step running, or None.
    """

    aliases: Mapping[str, str]
    canary: CanaryRoute | None


@dataclass(frozen=True)
class CanaryArm:
    """A running canary step and the loaded challenger its share is routed to."""

    route: CanaryRoute
    served: ServedModel


def served_version(
    version: str, aliases: Mapping[str, str], served_alias: Callable[[str], str | None] | None
) -> tuple[str, str | None]:
    """The version that serves for ``version`` (the champion's), and the alias it came by.

    With ``served_alias`` (the spec's ``compress.serve``/``quantize.serve``: the alias of a
    version's served variant, ``v7-cheapest``), that alias's version when the registered
    model has it; otherwise ``version`` itself and None.
    """
    alias = served_alias(version) if served_alias is not None else None
    target = aliases.get(alias) if alias is not None else None
    return (str(target), alias) if target is not None else (version, None)


def warm(model: ScoringModel) -> None:
    """Run the model once on one row (all zeros), so the first request pays no set-up."""
    outputs = model.runtime.run(np.zeros((1, model.runtime.width), dtype=np.float32))
    model.preprocessor.decode_output(outputs.reshape(1, model.preprocessor.n_outputs))


class ModelWatch:
    """The models being served, swapped when the registry moves.

    Args:
        served: the champion loaded at start.
        reference: ``models:/<name>@<alias>``, what is served.
        load: loads a ``models:/<name>/<version>`` reference (checked, not yet warmed);
            runs in a thread.
        resolve: the registered model's aliases and running canary; runs in a thread.
        poll_s: seconds between two looks at the registry.
        metrics: where swaps and failed loads are counted.
        follow_canary: route a running canary's share to its challenger.
        shadow_alias: the alias whose version shadows the champion, or None for no shadow.
        served_alias: the alias of the variant that serves in place of a champion version
            (:func:`served_version`), or None to serve the champion itself.
        serves_for: the champion version the served model stands in for, when it is a
            variant.
    """

    def __init__(
        self,
        served: ServedModel,
        *,
        reference: str,
        load: Callable[[str], ScoringModel],
        resolve: Callable[[], RegistryView],
        poll_s: float,
        metrics: EndpointMetrics,
        follow_canary: bool = True,
        shadow_alias: str | None = None,
        served_alias: Callable[[str], str | None] | None = None,
        serves_for: str | None = None,
    ) -> None:
        self.current = served
        self.canary: CanaryArm | None = None
        self.shadow: ServedModel | None = None
        self.reference = reference
        self.poll_s = poll_s
        self.metrics = metrics
        self.follow_canary = follow_canary
        self.shadow_alias = shadow_alias
        self.failures: dict[str, LoadFailure] = {}
        self.served_alias = served_alias
        #: The champion version and the alias of its variant being served, or None.
        self.serves_for: tuple[str, str] | None = None
        if serves_for is not None and served_alias is not None:
            self.serves_for = (serves_for, str(served_alias(serves_for)))
        self._load = load
        self._resolve = resolve
        self._task: asyncio.Task[None] | None = None
        metrics.serving(served.model.name, served.model.version, served.alias)

    @property
    def serving_note(self) -> str | None:
        """Which model serves and why, when the spec serves a variant in the champion's
        place; None when it serves the champion itself."""
        if self.served_alias is None:
            return None
        model = self.current.model
        if self.serves_for is not None:
            version, alias = self.serves_for
            return (
                f"serving {model.label} ({alias}) in place of {model.name} v{version} "
                f"({self.reference})"
            )
        wanted = self.served_alias(model.version)
        return (
            f"serving {model.label} ({self.reference}) itself: the model has no alias {wanted} "
            "(set by stemma run compare or stemma run quantize)"
        )

    @property
    def failure(self) -> LoadFailure | None:
        """The champion's last failed load, while the alias still names that version."""
        return self.failures.get(CHAMPION)

    def start(self) -> None:
        """Start polling the registry on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stemma-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:  # the first look at once: a running canary or a shadow loads at start
            await self.check()
            await asyncio.sleep(self.poll_s)

    async def check(self) -> bool:
        """Look at the registry once; load, warm and swap what moved. True when the
        champion was swapped."""
        try:
            view = await asyncio.to_thread(self._resolve)
        except Exception as error:  # the registry is away: keep serving, say so once a poll
            _LOG.warning(
                "cannot read %s: %s; still serving %s",
                self.reference,
                redact_url(first_line(error)),
                self.current.model.label,
            )
            return False
        swapped = await self._follow_champion(view)
        await self._follow_canary(view)
        await self._follow_shadow(view)
        return swapped

    async def _follow_champion(self, view: RegistryView) -> bool:
        champion = view.aliases.get(self.current.alias)
        if champion is None:
            _LOG.warning(
                "%s names no version any more; still serving %s",
                self.reference,
                self.current.model.label,
            )
            return False
        version, via = served_version(champion, view.aliases, self.served_alias)
        serves_for = (champion, via) if via is not None else None
        if version == self.current.model.version:
            self.serves_for = serves_for
            self.failures.pop(CHAMPION, None)
            return False
        served = await self._served(CHAMPION, version, self.current.alias)
        if served is None or served.model.version == self.current.model.version:
            return False
        self.serves_for = serves_for
        previous = self.current.model.label
        if served.model.signature_columns != self.current.model.signature_columns:
            _LOG.warning(
                "%s takes other columns than %s: requests are checked against the new ones",
                served.model.label,
                previous,
            )
        self.current = served
        self.metrics.model_loads.labels(result="swapped").inc()
        self.metrics.serving(served.model.name, served.model.version, served.alias)
        _LOG.info("now serving %s (was %s)", served.model.label, previous)
        return True

    async def _follow_canary(self, view: RegistryView) -> None:
        route = view.canary if self.follow_canary else None
        if route is not None and route.model != self.current.model.name:
            route = None
        if route is None:
            if self.canary is not None:
                _LOG.info(
                    "the canary of %s ended: the champion serves everyone",
                    self.canary.route.challenger,
                )
                self.canary = None
            return
        arm = self.canary
        if arm is not None and arm.served.model.version == route.challenger:
            if arm.route != route:
                self.canary = CanaryArm(route, arm.served)
            return
        served = await self._served(CANARY, route.challenger, CANARY)
        if served is None:
            self.canary = None
            return
        self.canary = CanaryArm(route, served)
        _LOG.info(
            "canary: %s serves %.0f%% of entities (control v%s)",
            served.model.label,
            route.fraction * 100,
            route.control,
        )

    async def _follow_shadow(self, view: RegistryView) -> None:
        version = view.aliases.get(self.shadow_alias) if self.shadow_alias else None
        if version is None or version == self.current.model.version:
            self.shadow = None
            return
        if self.shadow is not None and self.shadow.model.version == version:
            return
        self.shadow = await self._served(SHADOW, version, str(self.shadow_alias))
        if self.shadow is not None:
            _LOG.info("shadow: %s scores sampled requests", self.shadow.model.label)

    async def _served(self, role: str, version: str, alias: str) -> ServedModel | None:
        """``version`` ready to serve under ``alias``: reused when loaded, else loaded and
        warmed in a thread; None when it failed (now or recently)."""
        for loaded in self._loaded():
            if loaded.model.version == version:
                return loaded if loaded.alias == alias else ServedModel.of(loaded.model, alias)
        failure = self.failures.get(role)
        if (
            failure is not None
            and failure.version == version
            and time.monotonic() - failure.at < FAILED_LOAD_RETRY_S
        ):
            return None
        reference = format_model_ref(self.current.model.name, version=version)
        _LOG.info("%s: loading v%s", role, version)
        try:
            model = await asyncio.to_thread(self._load_warm, reference)
        except Exception as error:  # StemmaError (refused, unreadable) or anything else
            reason = redact_url(first_line(error))
            self.failures[role] = LoadFailure(version=version, reason=reason, at=time.monotonic())
            self.metrics.model_loads.labels(result="failed").inc()
            _LOG.warning(
                "could not load v%s of %s as the %s; still serving %s: %s",
                version,
                self.current.model.name,
                role,
                self.current.model.label,
                reason,
            )
            return None
        self.failures.pop(role, None)
        return ServedModel.of(model, alias)

    def _loaded(self) -> list[ServedModel]:
        loaded = [self.current]
        if self.canary is not None:
            loaded.append(self.canary.served)
        if self.shadow is not None:
            loaded.append(self.shadow)
        return loaded

    def _load_warm(self, reference: str) -> ScoringModel:
        model = self._load(reference)
        warm(model)
        return model


def registry_callables(
    client: MlflowClient,
    reference: str,
    *,
    architectures: tuple[str, ...],
) -> tuple[Callable[[str], ScoringModel], Callable[[], RegistryView]]:
    """``load`` and ``resolve`` for :class:`ModelWatch`, on an MLflow registry.

    Args:
        client: the registry's client.
        reference: ``models:/<name>@<alias>``, the champion's.
        architectures: the architectures the spec allows besides the built-ins.
    """
    from stemma.components.platform.refs import parse_model_ref
    from stemma.components.runtime.loading import load_scoring_model

    name = parse_model_ref(reference).name

    def load(target: str) -> ScoringModel:
        return load_scoring_model(target, client=client, architectures=architectures)

    def resolve() -> RegistryView:
        model = client.get_registered_model(name)
        aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
        return RegistryView(aliases=aliases, canary=live_canary(model.tags or {}))

    return load, resolve
