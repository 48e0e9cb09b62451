"""Generation claims: which promoter may make the next move of a model's champion.

A promoter claims generation ``g`` of a model by creating the MLflow experiment
``stemma.claims/<model>/<g>``. Experiment names are unique in the tracking store, so
exactly one creator succeeds; that one write is the compare-and-set. The claim's tags say
who holds it (host, pid, the process's start time, user, what it moves, since when) and
carry a heartbeat that a background thread refreshes while the promoter works.

A claim whose generation never became current is *abandoned* when its holder is provably
gone (on this host: no process runs with its pid and start time) or its heartbeat is older
than the heartbeat limit (:data:`HEARTBEAT_LIMIT_SECONDS`, or the environment variable
:data:`HEARTBEAT_LIMIT_VARIABLE`). An abandoned claim is taken over by creating the next
name of its chain, ``stemma.claims/<model>/<g>/takeover-<n>``: again one unique name, so of
two promoters taking over the same claim exactly one wins. The holder of a generation is the
last name of its chain.

A holder trusts its own claim only while its last successful heartbeat is younger than
:data:`LEASE_FRACTION` of the limit by its own monotonic clock, so it stops writing before
anyone else may judge it stale. A holder that finds its lease expired (it was paused, or the
store did not answer) re-claims through the same compare-and-set, taking over its own
claim, and fails cleanly when someone else was first. What remains is one request wide: a
holder paused between its last check and the write itself; MLflow has no conditional alias
write that could close it.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from stemma.components.errors import RegistryError
from stemma.components.platform import tags as tag_names
from stemma.components.platform.locks import ProcessIdentity

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment

_LOG = logging.getLogger(__name__)

#: Prefix of the experiments whose unique names serve as generation claims.
CLAIM_PREFIX = tag_names.CLAIMS_EXPERIMENT_PREFIX
#: Registered-model tag holding the number of champion moves made so far.
GENERATION_TAG = tag_names.PROMOTION_GENERATION
#: A claim whose heartbeat is older than this is abandoned (seconds).
HEARTBEAT_LIMIT_SECONDS = 30.0
#: Environment variable that sets another heartbeat limit (seconds; tests use a short one).
HEARTBEAT_LIMIT_VARIABLE = "STEMMA_PROMOTION_HEARTBEAT_S"
#: Heartbeats written per heartbeat limit.
BEATS_PER_LIMIT = 6
#: Share of the limit after its last heartbeat for which a holder trusts its claim; the
#: rest is the margin for clocks and for the write in flight.
LEASE_FRACTION = 2 / 3
#: Longest wait for a live claim to finish before a promoter gives up (seconds); never more
#: than :data:`WAIT_FRACTION` of the heartbeat limit.
CLAIM_WAIT_SECONDS = 10.0
WAIT_FRACTION = 1 / 3
#: Interval between two looks at a claim held by someone else (seconds).
WAIT_POLL_SECONDS = 0.2
#: Takeovers of one generation after which promoting stops and asks for a person.
MAX_TAKEOVERS = 20
#: The claim experiment's tags.
TAG = tag_names.CLAIM_PREFIX
_ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
#: How each action reads in a message about the claim that makes it.
_DOING = {"promote": "promoting", "rollback": "rolling back to"}


def heartbeat_limit() -> float:
    """The heartbeat limit in seconds: :data:`HEARTBEAT_LIMIT_VARIABLE` or the default.

    Raises:
        RegistryError: the variable is set to anything but a positive number.
    """
    raw = os.environ.get(HEARTBEAT_LIMIT_VARIABLE, "").strip()
    if not raw:
        return HEARTBEAT_LIMIT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise RegistryError(
            f"{HEARTBEAT_LIMIT_VARIABLE}={raw!r} is not a positive number of seconds",
            [f"unset it for the default of {HEARTBEAT_LIMIT_SECONDS:g} s"],
        )
    return value


def claim_name(model_name: str, generation: int, position: int = 0) -> str:
    """The experiment name of a claim: position 0 is the first, n the n-th takeover."""
    base = f"{CLAIM_PREFIX}/{model_name}/{generation}"
    return base if position == 0 else f"{base}/takeover-{position}"


def read_generation(client: MlflowClient, model_name: str) -> int:
    """The model's current generation (0 before its first move)."""
    registered = client.get_registered_model(model_name)
    return int((registered.tags or {}).get(GENERATION_TAG, "0"))


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) one name of a generation's claim chain, as its tags say."""

    name: str
    position: int
    experiment_id: str
    action: str
    to_version: str
    user: str
    claimed_at: float  # epoch seconds
    heartbeat: float  # epoch seconds of the last heartbeat
    process: ProcessIdentity | None  # None: a claim written without its holder's identity

    @classmethod
    def from_experiment(cls, experiment: Experiment, position: int) -> Holder:
        return cls.from_tags(
            experiment.name,
            position,
            experiment.experiment_id,
            experiment.tags or {},
            (experiment.creation_time or 0) / 1000,
        )

    @classmethod
    def from_tags(
        cls,
        name: str,
        position: int,
        experiment_id: str,
        tags: dict[str, str],
        created: float,
    ) -> Holder:
        """The holder a claim experiment's tags describe (``created``: its creation time)."""
        try:
            process = ProcessIdentity(
                tags[TAG + "host"], int(tags[TAG + "pid"]), float(tags[TAG + "process_started"])
            )
        except (KeyError, ValueError):
            process = None
        claimed_at = _float(tags.get(TAG + "claimed_at"), created)
        return cls(
            name=name,
            position=position,
            experiment_id=experiment_id,
            action=tags.get(TAG + "action", tags.get("action", "promote")),
            to_version=tags.get(TAG + "to_version", tags.get("to_version", "?")),
            user=tags.get(TAG + "user", tags.get("who", "?")),
            claimed_at=claimed_at,
            heartbeat=_float(tags.get(TAG + "heartbeat"), claimed_at),
            process=process,
        )

    @property
    def who(self) -> str:
        """``pid 1234 on host X`` (or the user, for a claim without a process)."""
        if self.process is None:
            return f"user {self.user}"
        return f"pid {self.process.pid} on host {self.process.host}"

    @property
    def doing(self) -> str:
        """``promoting v5`` / ``rolling back to v1``."""
        return f"{_DOING.get(self.action, self.action)} v{self.to_version}"

    def describe(self, now: float) -> str:
        """``pid 1234 on host X (promoting v5) since 10:02:11, heartbeat 2 s ago``."""
        since = datetime.fromtimestamp(self.claimed_at).strftime("%H:%M:%S")
        age = max(0.0, now - self.heartbeat)
        return f"{self.who} ({self.doing}) since {since}, heartbeat {age:.0f} s ago"

    def abandoned_reason(self, now: float, limit: float) -> str | None:
        """Why the claim is abandoned, or None while its holder may still be working."""
        if self.process is not None and self.process.is_alive() is False:
            return f"{self.who} no longer runs"
        if now - self.heartbeat > limit:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (limit {limit:g} s)"
        return None


def _float(raw: str | None, default: float) -> float:
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        return default


@dataclass(frozen=True)
class Refusal:
    """Why a claim was not granted.

    Attributes:
        spent: True when the generation became current meanwhile (the race is lost);
            False when a live holder still works on it.
        generation: the generation that was asked for.
        holder: the last holder of the generation's claim.
    """

    spent: bool
    generation: int
    holder: Holder


class ClaimLost(Exception):
    """A held claim was taken over by someone else; nothing more may be written."""

    def __init__(self, generation: int, taker: Holder, silent_for: float) -> None:
        super().__init__(f"claim on generation {generation} taken over by {taker.who}")
        self.generation = generation
        self.taker = taker
        self.silent_for = silent_for


class Claim:
    """A claim this process holds; refreshes its heartbeat until released."""

    def __init__(
        self,
        client: MlflowClient,
        model_name: str,
        generation: int,
        holder: Holder,
        tags: dict[str, str],
        limit: float,
        took_over: tuple[Holder, str] | None,
    ) -> None:
        self.client = client
        self.model_name = model_name
        self.generation = generation
        self.holder = holder
        #: The abandoned claim this one took over and why it was abandoned, if any.
        self.took_over = took_over
        self._tags = tags
        self._limit = limit
        self._last_beat = time.monotonic()  # creating the claim counts as a beat
        self._beats = self._start_beats()

    def _start_beats(self) -> threading.Thread:
        self._stop = threading.Event()
        thread = threading.Thread(
            target=self._beat_until_stopped,
            args=(self._stop, self.holder.experiment_id),
            name=f"stemma-claim-{self.model_name}-{self.generation}",
            daemon=True,
        )
        thread.start()
        return thread

    def _lease_left(self) -> float:
        return self._limit * LEASE_FRACTION - (time.monotonic() - self._last_beat)

    def _beat_until_stopped(self, stop: threading.Event, experiment_id: str) -> None:
        while not stop.wait(self._limit / BEATS_PER_LIMIT):
            # An expired lease is never renewed by a beat: others may have judged it
            # stale already; only a new compare-and-set (ensure_held) may revive it.
            if self._lease_left() <= 0:
                return
            started = time.monotonic()
            try:
                self.client.set_experiment_tag(
                    experiment_id, TAG + "heartbeat", f"{time.time():.3f}"
                )
            except Exception as error:  # the store may come back before the lease ends
                _LOG.warning("claim %s: heartbeat not written: %s", self.holder.name, error)
                continue
            if not stop.is_set():
                self._last_beat = started

    def ensure_held(self) -> None:
        """Check, right before a write, that this process still holds the claim.

        Raises:
            ClaimLost: another promoter took the claim over; write nothing more.
        """
        from mlflow.exceptions import MlflowException

        silent_for = time.monotonic() - self._last_beat
        position = self.holder.position + 1
        next_name = claim_name(self.model_name, self.generation, position)
        if self._lease_left() > 0:
            taker = self.client.get_experiment_by_name(next_name)
            if taker is None:
                return
            raise ClaimLost(self.generation, Holder.from_experiment(taker, position), silent_for)
        # The lease ran out (a pause, an unanswering store): take the claim over from
        # ourselves through the same compare-and-set that any other promoter would use.
        self._stop.set()
        tags = {**self._tags, **_fresh_tags(), TAG + "takeover_of": f"{self.holder.who} (itself)"}
        try:
            experiment_id = self.client.create_experiment(next_name, tags=tags)
        except MlflowException as error:
            if error.error_code not in _ALREADY_EXISTS:
                raise
            taker = self.client.get_experiment_by_name(next_name)
            if taker is None:  # the name is taken, so the experiment exists; defensive only
                raise
            taken = Holder.from_experiment(taker, position)
            raise ClaimLost(self.generation, taken, silent_for) from None
        self.holder = Holder.from_tags(next_name, position, experiment_id, tags, time.time())
        self._last_beat = time.monotonic()
        self._beats = self._start_beats()

    def release(self) -> None:
        """Stop the heartbeat and hide the chain's experiments from the MLflow UI.

        A deleted experiment keeps its name, so the generation stays claimed.
        """
        from mlflow.exceptions import MlflowException

        self._stop.set()
        self._beats.join(timeout=self._limit)
        for position in range(self.holder.position + 1):
            found = self.client.get_experiment_by_name(
                claim_name(self.model_name, self.generation, position)
            )
            if found is not None and found.lifecycle_stage == "active":
                with contextlib.suppress(MlflowException):  # cosmetic only
                    self.client.delete_experiment(found.experiment_id)


def _fresh_tags() -> dict[str, str]:
    now = f"{time.time():.3f}"
    me = ProcessIdentity.current()
    return {
        TAG + "host": me.host,
        TAG + "pid": str(me.pid),
        TAG + "process_started": f"{me.started:.3f}",
        TAG + "claimed_at": now,
        TAG + "heartbeat": now,
        TAG + "token": uuid.uuid4().hex,
    }


def last_holder(client: MlflowClient, model_name: str, generation: int) -> Holder | None:
    """The last name of a generation's claim chain, or None when nobody claimed it."""
    found: Holder | None = None
    for position in range(MAX_TAKEOVERS + 2):
        experiment = client.get_experiment_by_name(claim_name(model_name, generation, position))
        if experiment is None:
            break
        found = Holder.from_experiment(experiment, position)
    return found


def claim_generation(
    client: MlflowClient,
    model_name: str,
    generation: int,
    *,
    action: str,
    to_version: str,
    from_version: str | None,
) -> Claim | Refusal:
    """Claim ``generation`` of ``model_name``: exactly one caller gets it.

    A live holder is waited for (at most :data:`CLAIM_WAIT_SECONDS`, and a third of the
    heartbeat limit); an abandoned one is taken over.

    Returns:
        The held :class:`Claim` (call :meth:`Claim.release` when done), or a
        :class:`Refusal` naming the holder that won or still works.

    Raises:
        RegistryError: the store refused, or the generation was abandoned too often.
    """
    limit = heartbeat_limit()
    deadline = time.monotonic() + min(CLAIM_WAIT_SECONDS, limit * WAIT_FRACTION)
    tags = {
        TAG + "action": action,
        TAG + "to_version": str(to_version),
        TAG + "from_version": str(from_version),
        TAG + "user": getpass.getuser(),
    }
    position, took_over = 0, None
    while True:
        if position > MAX_TAKEOVERS:
            raise RegistryError(
                f"{model_name}: the claim on generation {generation} was abandoned "
                f"{MAX_TAKEOVERS} times",
                ["promoters keep dying mid-way; look at their logs before promoting again"],
            )
        name = claim_name(model_name, generation, position)
        claim_tags = {**tags, **_fresh_tags()}
        if took_over is not None:
            claim_tags[TAG + "takeover_of"] = took_over[0].who
        experiment_id = _create_claim(client, name, claim_tags, model_name, generation)
        if experiment_id is not None:
            mine = Holder.from_tags(name, position, experiment_id, claim_tags, time.time())
            claim = Claim(client, model_name, generation, mine, tags, limit, took_over)
            if took_over is not None and read_generation(client, model_name) >= generation:
                # The holder finished between our last look and the takeover.
                claim.release()
                return Refusal(True, generation, took_over[0])
            return claim
        while True:
            spent = read_generation(client, model_name) >= generation
            last = last_holder(client, model_name, generation)
            if last is None:  # deleted for good (mlflow gc); the name is free again
                break
            holder = last
            if spent:
                return Refusal(True, generation, holder)
            why = holder.abandoned_reason(time.time(), limit)
            if why is not None:
                position, took_over = holder.position + 1, (holder, why)
                _LOG.warning(
                    "%s: taking over the abandoned claim on generation %d of %s: %s",
                    model_name,
                    generation,
                    holder.describe(time.time()),
                    why,
                )
                break
            if time.monotonic() >= deadline:
                return Refusal(False, generation, holder)
            time.sleep(WAIT_POLL_SECONDS)


def _create_claim(
    client: MlflowClient, name: str, tags: dict[str, str], model_name: str, generation: int
) -> str | None:
    """The new claim experiment's id, or None when the name is taken (someone else's)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.create_experiment(name, tags=tags))
    except MlflowException as error:
        if error.error_code not in _ALREADY_EXISTS:
            raise RegistryError(
                f"{model_name}: cannot claim generation {generation}",
                [getattr(error, "message", str(error))],
            ) from error
    return None


def wait_for_live_claim(client: MlflowClient, model_name: str) -> Holder | None:
    """Wait until no live claim on the next generation is in flight.

    Returns:
        None when none is (or it finished, or it is abandoned), else the live holder that
        was still working after the wait.
    """
    limit = heartbeat_limit()
    deadline = time.monotonic() + min(CLAIM_WAIT_SECONDS, limit * WAIT_FRACTION)
    while True:
        generation = read_generation(client, model_name) + 1
        holder = last_holder(client, model_name, generation)
        if holder is None or holder.abandoned_reason(time.time(), limit) is not None:
            return None
        if time.monotonic() >= deadline:
            return holder
        time.sleep(WAIT_POLL_SECONDS)
