"""Limits that fit the metric: a change in the metric's units or relative to a reference.

A metric-drop limit is written as a number in the metric's units (``0.005``: the ROC AUC
may lose 0.005) or as a percentage of a reference value (``2%``: the RMSE may rise by 2%
of the parent's or champion's RMSE). The spec holds it as a :class:`MetricDrop`;
:meth:`MetricDrop.limit` turns it into the metric's units once the reference is known.

Metrics in the target's own units (:data:`TARGET_UNIT_METRICS`) default to relative
limits: an absolute amount means nothing across tables (an RMSE of 65 against one of
0.3). Metrics without units (ROC AUC, accuracy, log loss, r2) keep absolute defaults.

Minimums of labelled rows default to a share of the batch (:func:`scaled_minimum`), so
that a small batch can be decided.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

#: Metrics in the target's own units, whose default limits are relative.
TARGET_UNIT_METRICS = frozenset({"rmse", "mae"})
#: Largest absolute limit, in the metric's units.
MAX_ABSOLUTE = 1_000_000.0
#: Largest relative limit, in percent of the reference (100%: all of it).
MAX_PERCENT = 100.0
#: Decimals of metric values in decisions and reports.
SHOWN_DECIMALS = 4
#: The fewest labelled rows a default minimum asks for: on fewer, a bootstrap interval of
#: a metric is no longer trustworthy.
LABELLED_FLOOR = 30
#: Share of the batch's rows a default minimum asks for: labels that cover a small share
#: of a batch are seldom a random sample of it (the first labels often come from one kind
#: of row, e.g. the quickly resolved cases).
LABELLED_SHARE = 0.2

_PERCENT = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*%\s*$")
_SYNTAX = (
    "must be a number in the metric's units (e.g. 0.005) or a percentage of the reference "
    "value (e.g. 2%)"
)


@dataclass(frozen=True)
class MetricDrop:
    """How much a metric may change: ``amount`` in its units, or, when ``relative``, in
    percent of a reference value (the parent's or the champion's metric)."""

    amount: float
    relative: bool = False

    def limit(self, reference: float) -> float:
        """The limit in the metric's units, for a metric whose reference value is ``reference``.

        A relative limit is a share of the reference's magnitude (``abs(reference)``), so it
        reads the same for a metric below 0 (an r2, say). A reference of 0 gives a limit of
        0 (any change is infinitely many percent of 0): write an absolute limit for a metric
        that can be 0. A non-finite reference gives NaN, which no comparison passes.
        """
        if not self.relative:
            return self.amount
        if not math.isfinite(reference):
            return math.nan
        return abs(reference) * self.amount / 100.0

    def describe(self, reference: float) -> str:
        """The limit in both forms: ``2% = 1.3020`` (of a reference of 65.1), or
        ``0.005 = 0.59%`` (of one of 0.85)."""
        if self.amount == 0:
            return str(self)
        if self.relative:
            return f"{self} = {shown(self.limit(reference))}"
        if not math.isfinite(reference) or reference == 0:
            return str(self)
        return f"{self} = {percent_of(self.amount, reference)}"

    def to_spec(self) -> float | str:
        """The value as a spec holds it: a number, or a string ending in ``%``."""
        return str(self) if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.amount:g}%" if self.relative else f"{self.amount:g}"


def parse_metric_drop(value: Any, *, signed: bool = False, positive: bool = False) -> MetricDrop:
    """A :class:`MetricDrop` from a spec value: a number, a numeric string or ``"<n>%"``.

    Args:
        value: what the YAML (or a ``--set`` override) holds.
        signed: negative amounts are allowed (a margin that tolerates a worse model).
        positive: the amount must be above 0.

    Raises:
        ValueError: the value is neither form, not finite, or out of bounds; the message
            names both forms.
    """
    if isinstance(value, MetricDrop):
        drop = value
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{_SYNTAX}, got {value!r}")
    elif isinstance(value, str) and (match := _PERCENT.match(value)):
        drop = MetricDrop(float(match.group(1)), relative=True)
    else:
        try:
            drop = MetricDrop(float(value))
        except ValueError:
            raise ValueError(f"{_SYNTAX}, got {value!r}") from None
    if not math.isfinite(drop.amount):
        raise ValueError(f"must be finite, got {value!r}")
    if drop.amount < 0 and not signed:
        raise ValueError(f"must not be negative, got {value!r}")
    if drop.amount <= 0 and positive:
        raise ValueError(f"must be greater than 0, got {value!r}")
    bound, unit = (MAX_PERCENT, "%") if drop.relative else (MAX_ABSOLUTE, "")
    if abs(drop.amount) > bound:
        within = (
            f"between -{bound:g}{unit} and {bound:g}{unit}"
            if signed
            else f"at most {bound:g}{unit}"
        )
        raise ValueError(f"must be {within}, got {value!r}")
    return drop


def _drop_type(*, signed: bool = False, positive: bool = False) -> Any:
    """The pydantic type of a metric-drop field: parsed, written back as the spec wrote it,
    and described in the JSON Schema as a number or a percentage."""
    number: dict[str, Any] = {"type": "number", "maximum": MAX_ABSOLUTE}
    if not signed:
        number["exclusiveMinimum" if positive else "minimum"] = 0
    sign = "[-+]?" if signed else r"\+?"
    return Annotated[
        MetricDrop,
        PlainValidator(partial(parse_metric_drop, signed=signed, positive=positive)),
        PlainSerializer(MetricDrop.to_spec, return_type=float | str),
        WithJsonSchema(
            {
                "anyOf": [
                    number,
                    {"type": "string", "pattern": rf"^\s*{sign}(\d+(\.\d*)?|\.\d+)\s*%\s*$"},
                ]
            }
        ),
    ]


#: A limit on how much worse a metric may get (0 or more).
MetricDropLimit = _drop_type()
#: A limit that must be above 0.
PositiveMetricDrop = _drop_type(positive=True)
#: A margin that may be negative (a worse model within it still counts).
MetricMargin = _drop_type(signed=True)


def default_drop(metric: str, *, percent: float, absolute: float) -> MetricDrop:
    """The default limit for ``metric``: ``percent`` of the reference for a metric in the
    target's units (:data:`TARGET_UNIT_METRICS`), ``absolute`` for the others."""
    if metric in TARGET_UNIT_METRICS:
        return MetricDrop(percent, relative=True)
    return MetricDrop(absolute)


def scaled_minimum(rows: int, cap: int) -> int:
    """A default minimum of labelled rows for a batch of ``rows`` rows:
    ``min(cap, max(LABELLED_FLOOR, ceil(LABELLED_SHARE * rows)))``."""
    return min(cap, max(LABELLED_FLOOR, math.ceil(LABELLED_SHARE * max(rows, 0))))


def shown(value: float) -> str:
    """A metric value as decisions and reports show it."""
    return f"{value:.{SHOWN_DECIMALS}f}"


def percent_of(value: float, reference: float, *, signed: bool = False) -> str:
    """``value``'s size (or, ``signed``, the value) as a percentage of ``reference``'s
    magnitude; ``"n/a"`` for a reference of 0 or not finite."""
    if not (math.isfinite(reference) and math.isfinite(value)) or reference == 0:
        return "n/a"
    return f"{value / abs(reference):+.2%}" if signed else f"{abs(value) / abs(reference):.2%}"


def describe_drop(metric: str, drop: float, reference: float, *, higher_is_better: bool) -> str:
    """How a metric moved from ``reference``, in both forms: ``rmse rose 0.0136 (0.02%)``.

    ``drop`` is how much worse the metric got (positive: worse) in its units.
    """
    change = -drop if higher_is_better else drop
    if not math.isfinite(change):
        return f"{metric} changed by {change}"
    if change == 0:
        return f"{metric} did not change"
    verb = "rose" if change > 0 else "fell"
    return f"{metric} {verb} {shown(abs(change))} ({percent_of(change, reference)})"
