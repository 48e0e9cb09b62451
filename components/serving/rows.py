"""A prediction request's rows: JSON in, the network's input matrix out, with each row's fate.

A body is one row (an object), a list of rows (records) or ``{"columns": {name: [values]}}``.
Its columns become an Arrow table, checked against the served model's signature with batch
scoring's rules (:func:`.scoring.inputs.signature_problems`), then encoded by batch
scoring's :class:`.scoring.inputs.ChunkEncoder`; rows with missing, non-finite or unknown
values meet the spec's ``score`` policies through :func:`.scoring.inputs.apply_policies`,
exactly as in a batch: rejected with a reason per row, or the whole request refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from stemma.components.errors import DataError, StemmaError
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.inputs import (
    ChunkEncoder,
    apply_policies,
    plural,
    reasons,
    signature_problems,
    signature_text,
)

#: The key of a body given by columns.
COLUMNS_KEY = "columns"
#: Problems a refusal lists before it summarises (one screen).
MAX_PROBLEMS_SHOWN = 20
#: What scoring's policy messages call the input when the input is a request.
REQUEST_INPUT = Path("request")


class RequestError(StemmaError):
    """A request the endpoint refuses, with the HTTP status that says why."""

    def __init__(self, status: int, headline: str, details: Sequence[str] = ()) -> None:
        self.status = status
        super().__init__(headline, details)

    def __reduce__(self):
        return (self.__class__, (self.status, self.headline, self.details))


@dataclass(frozen=True)
class ServedModel:
    """A loaded model with its encoder, as the endpoint serves it.

    Attributes:
        model: from :func:`.runtime.loading.load_scoring_model`.
        encoder: batch scoring's encoder of its preprocessor, built once per model.
        alias: the alias it is served under.
    """

    model: ScoringModel
    encoder: ChunkEncoder
    alias: str

    @classmethod
    def of(cls, model: ScoringModel, alias: str) -> ServedModel:
        return cls(model=model, encoder=ChunkEncoder(model.preprocessor), alias=alias)


@dataclass(frozen=True)
class PreparedRows:
    """A request's rows, ready for the model.

    Attributes:
        rows: rows in the request.
        matrix: the network's input for the rows kept, in request order.
        kept: row positions of ``matrix``'s rows in the request.
        rejected: ``{row position: reason}`` of the rows the policies rejected.
        ids: the id column's value per row, or None when the request has none.
        table: the request's columns the model reads (and the id column), as Arrow.
    """

    rows: int
    matrix: np.ndarray
    kept: np.ndarray
    rejected: dict[int, str]
    ids: list[Any] | None
    table: pa.Table


def prepare_rows(
    served: ServedModel,
    body: Any,
    *,
    max_rows: int,
    policies: Mapping[str, str],
    id_column: str | None,
) -> PreparedRows:
    """Check a parsed JSON body against the served model and encode its rows.

    Args:
        served: the model the rows will be scored with.
        body: the parsed JSON body.
        max_rows: the most rows a request may hold.
        policies: ``invalid_rows``, ``unknown_categories`` and ``extra_columns``, as the
            spec's ``score`` section sets them.
        id_column: the spec's id column, echoed back per row when the request has it.

    Raises:
        RequestError: 422 for a body of another shape, a missing column, a wrong type, an
            extra column under ``extra_columns: error`` or a row an ``error`` policy
            refuses (each named); 413 for more rows than ``max_rows``.
    """
    columns, _rows = _columns_of(body, max_rows)
    model = served.model
    wanted = [name for name, _ in model.signature_columns]
    if id_column is not None and id_column not in wanted:
        wanted.append(id_column)
    arrays, problems = _arrays(columns, wanted)
    present = {name: array.type for name, array in arrays.items()}
    problems.extend(signature_problems(present, model))
    extras = [name for name in columns if name not in wanted]
    if extras and policies.get("extra_columns") == "error":
        problems.append(f"extra {plural(len(extras), 'column')}: {', '.join(extras)}")
    if problems:
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            shown.append(f"and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        raise RequestError(
            422,
            f"the rows do not match the signature of {model.label}",
            [*shown, f"the model takes: {signature_text(model)}"],
        )
    ids = arrays[id_column].to_pylist() if id_column in arrays else None
    return encode_rows(served, pa.table(arrays), policies=policies, ids=ids)


def encode_rows(
    served: ServedModel, table: pa.Table, *, policies: Mapping[str, str], ids: list[Any] | None
) -> PreparedRows:
    """Rows whose columns fit ``served``'s signature, encoded for it, with each row's fate.

    The rows a request routes to a canary's challenger, or that a shadow scores, are
    encoded again here by that model's own encoder (its preprocessing was fitted on its
    own training data).

    Raises:
        RequestError: 422 when an ``error`` policy refuses a row.
    """
    model = served.model
    features = served.encoder.columns(table)
    try:
        reject_mask, relevant = apply_policies(
            features.problems, dict(policies), table, REQUEST_INPUT, 0
        )
    except DataError as error:
        raise RequestError(
            422, f"rows of the request cannot be scored by {model.label}", error.details
        ) from None
    kept = np.arange(table.num_rows)
    rejected: dict[int, str] = {}
    if reject_mask is not None:
        bad = np.flatnonzero(reject_mask)
        rejected = dict(zip(bad.tolist(), reasons(table, relevant, bad), strict=True))
        kept = np.flatnonzero(~reject_mask)
        features = features.take(~reject_mask)
    return PreparedRows(
        rows=table.num_rows,
        matrix=served.encoder.matrix(features, 0, features.rows),
        kept=kept,
        rejected=rejected,
        ids=ids,
        table=table,
    )


def encode_for(
    served: ServedModel, table: pa.Table, *, policies: Mapping[str, str], ids: list[Any] | None
) -> PreparedRows | None:
    """``table``'s rows encoded for another model than the one that checked the request (a
    canary's challenger, a shadow), or None when that model cannot take them: a column it
    needs is missing or of another type, or one of its ``error`` policies refuses a row."""
    present = {name: table.schema.field(name).type for name in table.column_names}
    if signature_problems(present, served.model):
        return None
    try:
        return encode_rows(served, table, policies=policies, ids=ids)
    except RequestError:
        return None


def _columns_of(body: Any, max_rows: int) -> tuple[dict[str, list[Any]], int]:
    """The body's values by column, and its row count."""
    if isinstance(body, dict) and COLUMNS_KEY in body:
        return by_columns(body, max_rows)
    records = [body] if isinstance(body, dict) else body
    if not isinstance(records, list):
        raise RequestError(
            422,
            'the body must be a row (an object), a list of rows, or {"columns": {name: [values]}}',
        )
    check_count(len(records), max_rows)
    not_rows = [index for index, row in enumerate(records) if not isinstance(row, dict)]
    if not_rows:
        raise RequestError(
            422, f"rows must be objects; {_listing(not_rows, 'row')} {_are(not_rows)} not"
        )
    names: dict[str, None] = {}
    for row in records:
        names.update(dict.fromkeys(row))
    # A key missing from some rows is a missing value in those rows (the policies decide).
    return {name: [row.get(name) for row in records] for name in names}, len(records)


def by_columns(
    body: dict[str, Any], max_rows: int, noun: str = "rows"
) -> tuple[dict[str, list[Any]], int]:
    """The values of a body given by columns (``{"columns": {name: [values]}}``), checked,
    and its count of ``noun``."""
    columns = body[COLUMNS_KEY]
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise RequestError(422, '"columns" must map each column name to a list of values')
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        sizes = ", ".join(f"{name}: {len(values)}" for name, values in columns.items())
        raise RequestError(422, "the columns have different lengths", [sizes])
    count = lengths.pop() if lengths else 0
    check_count(count, max_rows, noun)
    return columns, count


def body_schema(
    properties: dict[str, Any], required: list[str], *, one: str, many: str
) -> dict[str, Any]:
    """The JSON Schema of a body that is one item (an object of ``properties``), a list of
    them, or their values by column, for the OpenAPI page; ``one`` and ``many`` title
    them."""
    item = {"type": "object", "title": one, "properties": properties, "required": required}
    columns = {
        "type": "object",
        "title": f"{many} by column",
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
    return {"anyOf": [item, {"type": "array", "items": item, "title": many}, columns]}


def check_count(count: int, max_rows: int, noun: str = "rows") -> None:
    """Refuse a request of no ``noun`` (422) or of more than ``max_rows`` (413)."""
    if count == 0:
        raise RequestError(422, f"the request holds no {noun}")
    if count > max_rows:
        raise RequestError(
            413,
            f"the request holds {count} {noun}; the limit is {max_rows} {noun} per request",
            ["send smaller requests, or raise endpoint.max_rows_per_request"],
        )


def _arrays(
    columns: Mapping[str, list[Any]], wanted: Sequence[str]
) -> tuple[dict[str, pa.Array], list[str]]:
    """The wanted columns as Arrow arrays, and the columns whose values cannot be one."""
    arrays: dict[str, pa.Array] = {}
    problems: list[str] = []
    for name in wanted:
        if name not in columns:
            continue
        values = columns[name]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            array = None
        # Lists and objects are looked for only when Arrow did not make a flat column of
        # the values, so the common case costs one pass in C.
        if array is None or pa.types.is_nested(array.type):
            nested = [i for i, value in enumerate(values) if isinstance(value, dict | list)]
            if nested:
                problems.append(f"column {name}: {_listing(nested, 'row')} hold a list or object")
                continue
        if array is None:
            kinds = sorted({_json_kind(value) for value in values if value is not None})
            problems.append(f"column {name} mixes {' and '.join(kinds)} values")
            continue
        arrays[name] = array
    return arrays, problems


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "text" if isinstance(value, str) else type(value).__name__


def _listing(positions: Sequence[int], noun: str) -> str:
    shown = ", ".join(str(position) for position in positions[:5])
    more = f" and {len(positions) - 5} more" if len(positions) > 5 else ""
    return f"{plural(len(positions), noun)} {shown}{more}"


def _are(items: Sequence[Any]) -> str:
    return "is" if len(items) == 1 else "are"
