"""``POST /v1/labels``: the outcomes of logged rows, recorded in the endpoint's log.

A body is one label (``{"<data.id>": 7, "<data.target>": 1}``), a list of them, or
``{"columns": {"<data.id>": [...], "<data.target>": [...]}}``, as for predictions. Every
label is checked before any is recorded: an id (text or a whole number), and a target of
the model's task (0 or 1 for a binary model, a finite number for regression). Labels join
the logged predictions on the id (both are logged as text). They are buffered like the
predictions and written with the log's next ``labels`` part (after ``endpoint.log.rotate_s``
seconds or ``rotate_rows`` labels, and at shutdown).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from stemma.components.data.prediction_log import id_text
from stemma.components.serving.rows import (
    COLUMNS_KEY,
    MAX_PROBLEMS_SHOWN,
    RequestError,
    check_count,
)

if TYPE_CHECKING:
    from stemma.components.serving.predlog import PredictionLog

LABELS_PATH = "/v1/labels"
#: Characters of a value an error message quotes.
MAX_VALUE_SHOWN = 40
#: Seconds a caller is asked to wait when the log's buffer of labels is full.
RETRY_AFTER_S = 1
#: The answers of ``POST /v1/labels`` besides 200, for the OpenAPI page.
LABELS_ERRORS = {
    400: "malformed JSON",
    401: "missing or wrong bearer token",
    409: "the spec sets no id column (data.id), which labels are matched on",
    413: "body or labels over the limit",
    422: "a label without its id or target, or a target the model's task cannot have",
    503: "the endpoint has no log (endpoint.log), or its buffer is full (with Retry-After)",
}
LABELS_DESCRIPTION = (
    "Record the outcomes of scored rows, matched to them by the spec's id column. The "
    "labels are held in memory when the answer is sent and written with the log's next "
    "part: within endpoint.log.rotate_s seconds, when rotate_rows labels wait, and when "
    "the endpoint stops."
)


class LabelsResponse(BaseModel):
    """How many labels were recorded."""

    recorded: int = Field(description="Labels recorded (all those sent).")


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


def record_labels(log: PredictionLog, body: Any, *, max_rows: int) -> int:
    """Check a parsed body's labels and hand them to the log; the number recorded.

    Raises:
        RequestError: 422 naming what is wrong, 413 past ``max_rows`` labels, 503 when
            the log's buffer cannot take them (:class:`LogFull`).
    """
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
    return recorded


def label_table(
    body: Any, *, id_column: str, target_column: str, task: str, max_rows: int
) -> pa.Table:
    """A body's labels as a table of the id (text) and the target, every label checked.

    Raises:
        RequestError: 422 for a body of another shape, a label without its id or target,
            an id that is neither text nor a whole number, a binary target other than 0
            or 1, or a regression target that is not a finite number (each named); 413
            past ``max_rows`` labels.
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
    check = _binary_target if task == "binary" else _regression_target
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
    target_type = pa.int64() if task == "binary" else pa.float64()
    return pa.table(
        {
            id_column: pa.array(ids, pa.string()),
            target_column: pa.array(
                [int(value) if task == "binary" else float(value) for value in targets],
                target_type,
            ),
        }
    )


def labels_refusal(error: RequestError, request_id: str, request_id_header: str) -> JSONResponse:
    """A refused labels request's answer: its status, the error and its details."""
    headers = {request_id_header: request_id}
    if isinstance(error, LogFull):
        headers["Retry-After"] = str(error.retry_after_s)
    body = {"error": error.headline, "details": error.details, "request_id": request_id}
    return JSONResponse(body, status_code=error.status, headers=headers)


def labels_request_schema(log: PredictionLog | None) -> dict[str, Any]:
    """The JSON Schema of a labels body (for the OpenAPI page)."""
    if log is None or log.id_column is None:
        return {"type": "object", "description": "Labels need endpoint.log and data.id."}
    target = {"enum": [0, 1]} if log.task == "binary" else {"type": "number"}
    properties = {
        log.id_column: {"type": ["string", "integer"], "description": "The row's id."},
        log.target_column: {**target, "description": "The row's outcome."},
    }
    label = {
        "type": "object",
        "title": "A label",
        "properties": properties,
        "required": list(properties),
    }
    columns = {
        "type": "object",
        "title": "Labels by column",
        "properties": {
            COLUMNS_KEY: {
                "type": "object",
                "properties": {
                    name: {"type": "array", "items": schema} for name, schema in properties.items()
                },
            }
        },
        "required": [COLUMNS_KEY],
    }
    return {"anyOf": [label, {"type": "array", "items": label, "title": "Labels"}, columns]}


def _label_columns(body: Any, max_rows: int) -> Mapping[str, list[Any]]:
    """The body's values by column (a label, a list of labels, or columns)."""
    if isinstance(body, dict) and COLUMNS_KEY in body:
        columns = body[COLUMNS_KEY]
        if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
            raise RequestError(422, '"columns" must map each column name to a list of values')
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            sizes = ", ".join(f"{name}: {len(values)}" for name, values in columns.items())
            raise RequestError(422, "the columns have different lengths", [sizes])
        check_count(lengths.pop() if lengths else 0, max_rows, "labels")
        return columns
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


def _regression_target(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number (the model is a regression)"
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past the range of a double
        finite = False
    return None if finite else "must be a finite number"
