"""A request's rows split between the champion and a running canary, and the answer built back.

While a canary step runs (:attr:`.watch.ModelWatch.canary`), each row whose entity id's
stable bucket falls in the canary's share (:meth:`.registry.routing.CanaryRoute.routed`,
the function batch canary steps use) is scored by the challenger, encoded by the
challenger's own preprocessing; every other row by the champion. The entity id is the
row's id column (``data.id``), or the request's :data:`ENTITY_HEADER` for all its rows;
rows without one are the champion's. A challenger that cannot take the request's columns
(or whose ``error`` policy refuses a row) leaves the rows to the champion, whose version
and variant the answer names: a canary never fails a request the champion answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stemma.components.data.prediction_log import CANARY_VARIANT, CHAMPION_VARIANT
from stemma.components.serving.rows import (
    PreparedRows,
    ServedModel,
    encode_for,
)
from stemma.components.serving.watch import CanaryArm

#: Request header: the entity every row of the request belongs to, when rows carry no id.
ENTITY_HEADER = "X-Stemma-Entity-Id"


@dataclass(frozen=True)
class Arm:
    """Rows of a request one model scores.

    Attributes:
        variant: ``champion`` or ``canary``.
        served: the model.
        matrix: the rows, encoded for the model.
        positions: each matrix row's position in the request.
    """

    variant: str
    served: ServedModel
    matrix: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class Routed:
    """A request's arms, and rows rejected on the way (by a challenger's row policies)."""

    arms: list[Arm]
    rejected: dict[int, str]


def route_rows(
    served: ServedModel,
    canary: CanaryArm | None,
    prepared: PreparedRows,
    entity: str | None,
    policies: Mapping[str, str],
) -> Routed:
    """Split ``prepared`` (encoded for the champion ``served``) between champion and canary."""
    kept = prepared.kept
    ids = _entity_ids(prepared, entity)
    champion_only = Routed([Arm(CHAMPION_VARIANT, served, prepared.matrix, kept)], {})
    if canary is None or ids is None or len(kept) == 0:
        return champion_only
    kept_ids = [ids[position] for position in kept.tolist()]
    has_id = np.array([value is not None for value in kept_ids], dtype=bool)
    routed = np.zeros(len(kept), dtype=bool)
    if has_id.any():
        present = [value for value in kept_ids if value is not None]
        routed[has_id] = canary.route.routed(np.asarray(present))
    if not routed.any():
        return champion_only
    positions = kept[routed]
    subset = prepared.table.take(positions)
    challenger = canary.served
    encoded = encode_for(challenger, subset, policies=policies, ids=None)
    if encoded is None:  # the challenger cannot take these rows: the champion answers them
        return champion_only
    rejected = {int(positions[index]): reason for index, reason in encoded.rejected.items()}
    arms = []
    if not routed.all():
        arms.append(Arm(CHAMPION_VARIANT, served, prepared.matrix[~routed], kept[~routed]))
    arms.append(Arm(CANARY_VARIANT, challenger, encoded.matrix, positions[encoded.kept]))
    return Routed(arms, rejected)


def _entity_ids(prepared: PreparedRows, entity: str | None) -> Sequence[Any] | None:
    if prepared.ids is not None:
        return prepared.ids
    if entity:
        return [entity] * prepared.rows
    return None


@dataclass(frozen=True)
class Answer:
    """A request's answer, and its scored rows as the log and the metrics count them."""

    body: dict[str, Any]
    versions: list[str]  # per scored row, in ``positions`` order
    variants: list[str]
    positions: np.ndarray
    predictions: list[int | None] | None
    scores: list[float | None]

    def header(self, field: str) -> str:
        """The distinct values of ``version``/``variant`` across the rows, for a header."""
        values = self.versions if field == "version" else self.variants
        return ", ".join(dict.fromkeys(values)) or self.body[field]


def build_answer(
    prepared: PreparedRows,
    routed: Routed,
    outputs: Sequence[np.ndarray],
    *,
    request_id: str,
    alias: str,
) -> Answer:
    """The JSON answer per row, in request order, from each arm's raw outputs."""
    results: list[dict[str, Any]] = [{} for _ in range(prepared.rows)]
    versions: list[str] = []
    variants: list[str] = []
    positions: list[np.ndarray] = []
    predictions: list[int | None] = []
    scores: list[float | None] = []
    binary = True
    for arm, raw in zip(routed.arms, outputs, strict=True):
        model = arm.served.model
        binary = binary and model.task == "binary"
        decoded = model.preprocessor.decode_output(raw.reshape(len(arm.positions)))
        for position, score in zip(arm.positions.tolist(), decoded.tolist(), strict=True):
            # A non-finite output (a diverged network) is no JSON number: null, not a crash.
            value = score if math.isfinite(score) else None
            result: dict[str, Any] = {
                "row": position,
                "score": value,
                "version": model.version,
                "variant": arm.variant,
            }
            prediction = None
            if model.task == "binary" and value is not None:
                prediction = result["prediction"] = int(value >= model.threshold)
            results[position] = result
            predictions.append(prediction)
            scores.append(value)
        versions.extend([model.version] * len(arm.positions))
        variants.extend([arm.variant] * len(arm.positions))
        positions.append(arm.positions)
    for position, reason in {**prepared.rejected, **routed.rejected}.items():
        results[position] = {"row": position, "rejected": True, "reason": reason}
    if prepared.ids is not None:
        for position, result in enumerate(results):
            result["id"] = prepared.ids[position]
    champion = routed.arms[0].served.model
    body = {
        "request_id": request_id,
        "model": champion.name,
        "version": ", ".join(dict.fromkeys(versions)) or champion.version,
        "alias": alias,
        "variant": ", ".join(dict.fromkeys(variants)) or CHAMPION_VARIANT,
        "results": results,
    }
    return Answer(
        body=body,
        versions=versions,
        variants=variants,
        positions=np.concatenate(positions) if positions else np.empty(0, dtype=np.int64),
        predictions=predictions if binary else None,
        scores=scores,
    )
