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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from stemma.components.data.prediction_log import CANARY_VARIANT, CHAMPION_VARIANT
from stemma.components.runtime.loading import ScoringModel
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
class Decoded:
    """One model's answer for its rows, in their order, as the answer and the log hold it.

    Attributes:
        scores: the probability of class 1 (binary), of the predicted class (multiclass),
            or the value (regression); None where the model's output is not finite.
        predictions: the class per row (classifiers), or None.
        probabilities: multiclass: ``{class (as text): probability}`` per row, else None.
        counts: multiclass: rows per predicted class (as text), for the metrics.
    """

    scores: list[float | None]
    predictions: list[int | str | None] | None
    probabilities: list[dict[str, float] | None] | None
    counts: dict[str, int]


def decode_rows(model: ScoringModel, raw: np.ndarray) -> Decoded:
    """A model's raw outputs for ``len(raw)`` rows, decoded into its answer's values."""
    rows = len(raw)
    preprocessor = model.preprocessor
    values = preprocessor.decode_output(np.asarray(raw).reshape(rows, preprocessor.n_outputs))
    if model.task == "multiclass":
        return _multiclass_rows(model, values)
    finite = np.isfinite(values)
    scores = values.tolist()
    if not finite.all():
        scores = [score if ok else None for score, ok in zip(scores, finite.tolist(), strict=True)]
    if model.task != "binary":
        return Decoded(scores, None, None, {})
    positive = np.asarray(values >= model.threshold)
    predictions: list[int | str | None] = [
        None if score is None else int(one)
        for score, one in zip(scores, positive.tolist(), strict=True)
    ]
    return Decoded(scores, predictions, None, {})


def _multiclass_rows(model: ScoringModel, probabilities: np.ndarray) -> Decoded:
    """Per row the likeliest class, its probability and every class's (one dict per row:
    the answer's ``probabilities``)."""
    classes = model.preprocessor.class_names()
    keys = [str(name) for name in classes]
    finite = np.isfinite(probabilities).all(axis=1)
    best = probabilities.argmax(axis=1) if probabilities.size else np.empty(0, dtype=np.int64)
    predictions: list[Any] = np.asarray(classes, dtype=object)[best].tolist()
    scores: list[Any] = probabilities[np.arange(len(best)), best].tolist()
    rows: list[Any] = [dict(zip(keys, row, strict=True)) for row in probabilities.tolist()]
    if not finite.all():  # a diverged network: no class, no number
        for index in np.flatnonzero(~finite).tolist():
            predictions[index] = scores[index] = rows[index] = None
    counts = np.bincount(best[finite], minlength=len(keys))
    return Decoded(
        scores,
        predictions,
        rows,
        {key: int(count) for key, count in zip(keys, counts.tolist(), strict=True) if count},
    )


@dataclass(frozen=True)
class Answer:
    """A request's answer, and its scored rows as the log and the metrics count them.

    ``predictions`` is None unless every arm's model is a classifier, ``probabilities``
    unless one is multiclass (rows of the others then None); ``counts`` holds
    ``(version, variant, class, rows)`` of each multiclass arm's predicted classes.
    """

    body: dict[str, Any]
    versions: list[str]  # per scored row, in ``positions`` order
    variants: list[str]
    positions: np.ndarray
    predictions: list[int | str | None] | None
    scores: list[float | None]
    probabilities: list[dict[str, float] | None] | None = None
    counts: list[tuple[str, str, str, int]] = field(default_factory=list)

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
    """The JSON answer per row, in request order, from each arm's raw outputs.

    A row's answer holds ``score`` and, from a binary model, ``prediction``; from a
    multiclass model ``prediction`` (the likeliest class), ``score`` (its probability) and
    ``probabilities`` (``{class: probability}``).
    """
    results: list[dict[str, Any]] = [{} for _ in range(prepared.rows)]
    versions: list[str] = []
    variants: list[str] = []
    positions: list[np.ndarray] = []
    predictions: list[int | str | None] = []
    scores: list[float | None] = []
    multiclass: dict[int, Decoded] = {}  # by arm
    classifiers = True
    for index, (arm, raw) in enumerate(zip(routed.arms, outputs, strict=True)):
        model = arm.served.model
        classifiers = classifiers and model.task in ("binary", "multiclass")
        rows = len(arm.positions)
        if model.task == "multiclass":
            decoded = multiclass[index] = _multiclass_answer(arm, raw, results)
            predictions.extend(decoded.predictions or ())
            scores.extend(decoded.scores)
        else:
            _scalar_answer(arm, raw, results, predictions, scores)
        versions.extend([model.version] * rows)
        variants.extend([arm.variant] * rows)
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
    answer = Answer(
        body=body,
        versions=versions,
        variants=variants,
        positions=np.concatenate(positions) if positions else np.empty(0, dtype=np.int64),
        predictions=predictions if classifiers else None,
        scores=scores,
    )
    return _with_classes(answer, routed.arms, multiclass) if multiclass else answer


def _with_classes(answer: Answer, arms: Sequence[Arm], multiclass: dict[int, Decoded]) -> Answer:
    """``answer`` with the probabilities per row and the class counts of its multiclass
    arms (the rows of other arms have no probabilities)."""
    probabilities: list[dict[str, float] | None] = []
    counts: list[tuple[str, str, str, int]] = []
    for index, arm in enumerate(arms):
        decoded = multiclass.get(index)
        if decoded is None or decoded.probabilities is None:
            probabilities.extend([None] * len(arm.positions))
            continue
        probabilities.extend(decoded.probabilities)
        model = arm.served.model
        counts.extend((model.version, arm.variant, name, n) for name, n in decoded.counts.items())
    return replace(answer, probabilities=probabilities, counts=counts)


def _scalar_answer(
    arm: Arm,
    raw: np.ndarray,
    results: list[dict[str, Any]],
    predictions: list[int | str | None],
    scores: list[float | None],
) -> None:
    """A binary or regression arm's rows into ``results`` (and the log's lists): one pass
    over the rows, the hot path of the endpoint."""
    model = arm.served.model
    decoded = model.preprocessor.decode_output(raw.reshape(len(arm.positions)))
    binary = model.task == "binary"
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
        if binary and value is not None:
            prediction = result["prediction"] = int(value >= model.threshold)
        results[position] = result
        predictions.append(prediction)
        scores.append(value)


def _multiclass_answer(arm: Arm, raw: np.ndarray, results: list[dict[str, Any]]) -> Decoded:
    """A multiclass arm's rows into ``results``: the class, its probability, every class's."""
    model = arm.served.model
    decoded = decode_rows(model, raw)
    assert decoded.predictions is not None and decoded.probabilities is not None
    for position, prediction, score, row in zip(
        arm.positions.tolist(),
        decoded.predictions,
        decoded.scores,
        decoded.probabilities,
        strict=True,
    ):
        result: dict[str, Any] = {"row": position}
        if score is not None:
            result.update(prediction=prediction, score=score, probabilities=row)
        else:
            result["score"] = None
        result.update(version=model.version, variant=arm.variant)
        results[position] = result
    return decoded
