"""``POST /v1/labels``: the outcomes of logged rows, recorded in the endpoint's log.

A body is one label (``{"<data.id>": 7, "<data.target>": 1}``), a list of them, or
``{"columns": {"<data.id>": [...], "<data.target>": [...]}}``, as for predictions. Every
label is checked before any is recorded: an id (text or a whole number), and a target of
the model's task (0 or 1 for a binary model, a finite number for regression, text or a
number for a multiclass model). Labels join the logged predictions on the id (both are
logged as text). They are buffered like the predictions and written with the log's next
``labels`` part (after ``endpoint.log.rotate_s`` seconds or ``rotate_rows`` labels, and at
shutdown).

A multiclass label is a class or a raw label ``data.labels`` maps to one, matched by the
served model's preprocessing as training matched them (``Preprocessor.class_codes``). A
label of neither (a class the model never learnt, a typo) is still recorded, as sent:
production labels are the world's, and refusing them would lose the rest of the request.
It is counted instead, in the answer (``unknown``, ``unknown_labels``) and in the metric
``stemma_endpoint_unknown_labels``; the monitor counts it again when it reads the log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field

from stemma.components.data.labels import label_text
from stemma.components.data.prediction_log import id_text
from stemma.components.serving.rows import (
    COLUMNS_KEY,
    MAX_PROBLEMS_SHOWN,
    RequestError,
    body_schema,
    by_columns,
    check_count,
)

if TYPE_CHECKING:
    from stemma.components.model.preprocessing import Preprocessor
    from stemma.components.serving.predlog import PredictionLog

LABELS_PATH = "/v1/labels"
#: Characters of a value an error message quotes.
MAX_VALUE_SHOWN = 40
#: Seconds a caller is asked to wait when the log's buffer of labels is full.
RETRY_AFTER_S = 1
#: Distinct unknown labels an answer names.
MAX_UNKNOWN_SHOWN = 10
#: The answers of ``POST /v1/labels`` besides 200, for the OpenAPI page.
LABELS_ERRORS = {
    400: "malformed JSON",
    401: "missing or wrong bearer token",
    409: "the spec sets no id column (data.id), which labels are matched on",
    413: "body or labels over the limit",
    422: "a label without its id or target, or a target the model's task cannot have "
    "(a multiclass label of no class is recorded and counted, not refused)",
    503: "the endpoint has no log (endpoint.log), or its buffer is full (with Retry-After)",
}
LABELS_DESCRIPTION = (
    "Record the outcomes of scored rows, matched to them by the spec's id column. The "
    "labels are held in memory when the answer is sent and written with the log's next "
    "part: within endpoint.log.rotate_s seconds, when rotate_rows labels wait, and when "
    "the endpoint stops. A multiclass model's label is a class or a raw label data.labels "
    "maps to one; a label of neither is recorded too, and counted in the answer's unknown "
    "and in the metric stemma_endpoint_unknown_labels."
)


class LabelsResponse(BaseModel):
    """How many labels were recorded."""

    recorded: int = Field(description="Labels recorded (all those sent).")
    unknown: int | None = Field(
        default=None,
        description="Multiclass models only: labels recorded that are no class of the "
        "served model, neither directly nor through data.labels (also counted in the "
        "metric stemma_endpoint_unknown_labels).",
    )
    unknown_labels: list[str] | None = Field(
        default=None,
        description=f"Multiclass models only: the distinct unknown labels, as text (the "
        f"first {MAX_UNKNOWN_SHOWN}).",
    )


@dataclass(frozen=True)
class RecordedLabels:
    """What a labels request recorded: every label, and those of no known class."""

    recorded: int
    unknown: int | None = None  # multiclass only
    unknown_labels: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """The answer's JSON (:class:`LabelsResponse`)."""
        if self.unknown is None:
            return {"recorded": self.recorded}
        return {
            "recorded": self.recorded,
            "unknown": self.unknown,
            "unknown_labels": self.unknown_labels,
        }


class LogFull(RequestError):
    """The log holds as many labels as it may; the caller should try again shortly."""

    retry_after_s = RETRY_AFTER_S


def labels_log(log: PredictionLog | None) -> PredictionLog:
    """The log labels go to, checked before the body is read.

    Raises:
        RequestError: 503 when the endpoint has no log, 409 when the spec has no id column.
    """
    if log is None:
        raise RequestError(
            503,
            "labels need endpoint.log: this endpoint keeps no log",
            ["set endpoint.log in the spec (log: {} takes the defaults) and restart it"],
        )
    if log.id_column is None:
        raise RequestError(
            409,
            "labels need data.id: the spec names no id column to match them to predictions",
            ["set data.id to the column that identifies a row, and send it with predictions"],
        )
    return log


def record_labels(
    log: PredictionLog, body: Any, *, max_rows: int, preprocessor: Preprocessor | None = None
) -> RecordedLabels:
    """Check a parsed body's labels and hand them to the log.

    Args:
        log: the endpoint's log.
        body: the parsed JSON body.
        max_rows: the most labels a request may hold.
        preprocessor: the served model's, which matches a multiclass label to its class
            (through ``data.labels``); the labels it cannot match are counted as unknown.

    Raises:
        RequestError: 422 naming what is wrong, 413 past ``max_rows`` labels, 503 when
            the log's buffer cannot take them (:class:`LogFull`).
    """
    unmapped: list[str] = []
    if log.task == "binary" and preprocessor is not None and preprocessor.labels is not None:
        body, unmapped = mapped_binary_labels(body, log.target_column, preprocessor, max_rows)
    table = label_table(
        body,
        id_column=str(log.id_column),
        target_column=log.target_column,
        task=log.task,
        max_rows=max_rows,
    )
    recorded = log.record_labels(table)
    if recorded < table.num_rows:
        raise LogFull(
            503,
            "the endpoint's log holds as many labels as it may; try again shortly",
            ["its writes may be failing: see the endpoint's log lines and metrics"],
        )
    if unmapped:
        shown = list(dict.fromkeys(unmapped))[:MAX_UNKNOWN_SHOWN]
        return RecordedLabels(recorded, len(unmapped), shown)
    if log.task != "multiclass":
        return RecordedLabels(recorded)
    unknown = unknown_labels(table.column(log.target_column).to_pylist(), preprocessor)
    return RecordedLabels(recorded, len(unknown), list(dict.fromkeys(unknown))[:MAX_UNKNOWN_SHOWN])


def mapped_binary_labels(
    body: Any, target_column: str, preprocessor: Preprocessor, max_rows: int
) -> tuple[dict[str, Any], list[str]]:
    """A binary model's raw labels mapped to 0 and 1 by its ``data.labels``: the body's
    columns with the mapped labels, less the rows whose label the map does not know
    (returned as text, to be counted as unknown, as the log holds 0 and 1 only)."""
    columns = dict(_label_columns(body, max_rows))
    targets = columns.get(target_column)
    if targets is None:
        return {"columns": columns}, []
    present = [value is not None for value in targets]
    codes = preprocessor.class_codes(pd.Series(targets, dtype=object)).tolist()
    keep = [not here or code >= 0 for here, code in zip(present, codes, strict=True)]
    unknown = [label_text(value) for value, kept in zip(targets, keep, strict=True) if not kept]
    mapped = [code if here else None for here, code in zip(present, codes, strict=True)]
    columns = {
        name: [value for value, kept in zip(values, keep, strict=True) if kept]
        for name, values in {**columns, target_column: mapped}.items()
    }
    return {"columns": columns}, unknown


def unknown_labels(labels: list[str], preprocessor: Preprocessor | None) -> list[str]:
    """The labels (as text) of no class of ``preprocessor``'s model, in order, repeated as
    sent; none without a multiclass preprocessor to match them."""
    if preprocessor is None or preprocessor.task != "multiclass" or not labels:
        return []
    codes = preprocessor.class_codes(pd.Series(labels, dtype=object))
    return [label for label, code in zip(labels, codes.tolist(), strict=True) if code < 0]


def label_table(
    body: Any, *, id_column: str, target_column: str, task: str, max_rows: int
) -> pa.Table:
    """A body's labels as a table of the id (text) and the target, every label checked.

    Raises:
        RequestError: 422 for a body of another shape, a label without its id or target,
            an id that is neither text nor a whole number, a binary target other than 0
            or 1, a regression target that is not a finite number, or a multiclass target
            that is neither text nor a finite number (each named); 413 past ``max_rows``
            labels.
    """
    columns = _label_columns(body, max_rows)
    missing = [name for name in (id_column, target_column) if name not in columns]
    if missing:
        raise RequestError(
            422,
            f"labels need the columns {id_column} and {target_column}",
            [f"missing: {', '.join(missing)}"],
        )
    problems = []
    ids = []
    for row, value in enumerate(columns[id_column]):
        if value is None:
            problems.append(f"label {row}: no {id_column}")
        elif not _is_id(value):
            problems.append(
                f"label {row}: {id_column} must be text or a whole number, not {_shown(value)}"
            )
        ids.append(id_text(value))
    check = _TARGET_CHECKS.get(task, _regression_target)
    targets = columns[target_column]
    for row, value in enumerate(targets):
        if value is None:
            problems.append(f"label {row}: no {target_column}")
        elif problem := check(value):
            problems.append(f"label {row}: {target_column} {problem}, not {_shown(value)}")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            shown.append(f"and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        raise RequestError(422, "the labels cannot be recorded", shown)
    if task == "binary":
        target = pa.array([int(value) for value in targets], pa.int64())
    elif task == "multiclass":  # as sent, as text: matched to classes as training matches
        target = pa.array([label_text(value) for value in targets], pa.string())
    else:
        target = pa.array([float(value) for value in targets], pa.float64())
    return pa.table({id_column: pa.array(ids, pa.string()), target_column: target})


def labels_request_schema(log: PredictionLog | None) -> dict[str, Any]:
    """The JSON Schema of a labels body (for the OpenAPI page)."""
    if log is None or log.id_column is None:
        return {"type": "object", "description": "Labels need endpoint.log and data.id."}
    if log.task == "binary":
        target: dict[str, Any] = {"enum": [0, 1], "description": "The row's outcome."}
    elif log.task == "multiclass":
        classes = ", ".join(map(str, log.classes[:MAX_UNKNOWN_SHOWN]))
        more = ", ..." if len(log.classes) > MAX_UNKNOWN_SHOWN else ""
        target = {
            "type": ["string", "number", "boolean"],
            "description": f"The row's outcome: a class ({classes}{more}) or a raw label "
            "data.labels maps to one; any other is recorded and counted as unknown.",
        }
    else:
        target = {"type": "number", "description": "The row's outcome."}
    properties = {
        log.id_column: {"type": ["string", "integer"], "description": "The row's id."},
        log.target_column: target,
    }
    return body_schema(properties, list(properties), one="A label", many="Labels")


def _label_columns(body: Any, max_rows: int) -> Mapping[str, list[Any]]:
    """The body's values by column (a label, a list of labels, or columns)."""
    if isinstance(body, dict) and COLUMNS_KEY in body:
        return by_columns(body, max_rows, "labels")[0]
    labels = [body] if isinstance(body, dict) else body
    if not isinstance(labels, list) or not all(isinstance(label, dict) for label in labels):
        raise RequestError(
            422,
            "the body must be a label (an object), a list of labels, or "
            '{"columns": {name: [values]}}',
        )
    check_count(len(labels), max_rows, "labels")
    names = {name for label in labels for name in label}
    return {name: [label.get(name) for label in labels] for name in names}


def _shown(value: Any) -> str:
    """A value as an error message quotes it: JSON-like, cut short."""
    text = repr(value)
    return text if len(text) <= MAX_VALUE_SHOWN else text[: MAX_VALUE_SHOWN - 3] + "..."


def _is_id(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _binary_target(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        return "must be 0 or 1 (the model is binary)"
    return None


def _class_label(value: Any) -> str | None:
    if isinstance(value, bool | str):
        return None
    if not isinstance(value, int | float):
        return "must be a class: text or a number (the model is multiclass)"
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past the range of a double: still a label as text
        finite = True
    return None if finite else "must be a class: text or a finite number"


def _regression_target(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number (the model is a regression)"
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past the range of a double
        finite = False
    return None if finite else "must be a finite number"


#: The check of a label's target for each task (None: it fits).
_TARGET_CHECKS = {
    "binary": _binary_target,
    "multiclass": _class_label,
    "regression": _regression_target,
}
