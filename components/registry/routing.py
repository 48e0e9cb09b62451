"""Which arm serves an entity during a canary, the same in every process and on every machine.

* :func:`route_buckets` maps entity ids to a stable number in ``[0, 1)`` (a salted 64-bit
  hash); an entity is in the challenger arm when its bucket is below the canary's fraction
  (:func:`route_to_challenger`), so it stays there when the fraction grows. Batch canary
  steps and the online endpoint route with these two functions, so an entity is served by
  the same arm in a batch, on every endpoint replica and after a restart.
* :func:`live_canary` reads, from the canary state a canary run records on the registered
  model (tag :data:`.tags.CANARY_STATE`, written by ``evaluation.canary``), what routing
  needs: the challenger, the control, the fraction and the salt, while a canary step runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemma.components.platform import tags

#: The canary state's format this reader knows (``evaluation.canary.STATE_FORMAT``).
CANARY_STATE_FORMAT = 1


def _salt64(salt: str) -> np.uint64:
    digest = hashlib.blake2b(salt.encode("utf-8"), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection of 64-bit integers that mixes every bit."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def route_buckets(ids: Sequence[Any] | np.ndarray, salt: str) -> np.ndarray:
    """A stable number in ``[0, 1)`` for each entity id.

    Integer ids are mixed with splitmix64 (vectorised); any other id is hashed as text with
    BLAKE2b. Neither depends on the process (Python's ``hash`` does), so the same id and
    salt give the same bucket everywhere. The integer ``7`` and the text ``"7"`` are hashed
    differently: keep the id column's type stable.

    Args:
        ids: the entity ids.
        salt: mixed into every hash, so that two canaries route different entities.

    Returns:
        float64 buckets, uniform on ``[0, 1)`` over distinct ids.
    """
    values = np.asarray(ids)
    if values.dtype.kind in "iu":
        hashed = _splitmix64(values.astype(np.int64).view(np.uint64) ^ _salt64(salt))
    else:
        prefix = salt.encode("utf-8") + b"\x00"
        hashed = np.fromiter(
            (
                int.from_bytes(
                    hashlib.blake2b(prefix + str(value).encode("utf-8"), digest_size=8).digest(),
                    "little",
                )
                for value in values.ravel()
            ),
            dtype=np.uint64,
            count=values.size,
        )
    # The top 53 bits make an exact float64 in [0, 1).
    return (hashed >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def route_to_challenger(ids: Sequence[Any] | np.ndarray, fraction: float, salt: str) -> np.ndarray:
    """Which entities the challenger serves at ``fraction``: bucket below the fraction.

    An entity routed to the challenger at one fraction is routed to it at every larger
    fraction with the same salt.

    Raises:
        ValueError: the fraction is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return route_buckets(ids, salt) < fraction


@dataclass(frozen=True)
class CanaryRoute:
    """A running canary step, as routing sees it.

    Attributes:
        model: the registered model.
        challenger: the version the canary's share is routed to.
        control: the version everyone else gets (the champion when the canary started).
        fraction: the share of entities routed to the challenger, in ``(0, 1]``.
        salt: mixed into the routing hash; fixed for the canary's life.
        revision: the state's revision (bumped on every step).
    """

    model: str
    challenger: str
    control: str
    fraction: float
    salt: str
    revision: int

    def routed(self, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """True for the ids the challenger serves."""
        return route_to_challenger(ids, self.fraction, self.salt)


def live_canary(model_tags: Mapping[str, str]) -> CanaryRoute | None:
    """The canary step running on a registered model, from its tags; None when none runs.

    A canary routes live traffic only in its ``canary`` phase while ``running``: once the
    challenger is promoted (``bake``) the champion alias already names it, and an ended
    canary (completed, rolled back, aborted) routes nothing. A state of a format this
    reader does not know, or unreadable, routes nothing either (the champion serves).
    """
    text = model_tags.get(tags.CANARY_STATE)
    if not text:
        return None
    try:
        state = json.loads(text)
        if state.get("format") != CANARY_STATE_FORMAT:
            return None
        if state["status"] != "running" or state["phase"] != "canary":
            return None
        fraction = float(state["steps"][int(state["step"])])
        route = CanaryRoute(
            model=str(state["model"]),
            challenger=str(state["challenger"]),
            control=str(state["control"]),
            fraction=fraction,
            salt=str(state["salt"]),
            revision=int(state.get("revision", 0)),
        )
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return route if 0.0 < fraction <= 1.0 else None
