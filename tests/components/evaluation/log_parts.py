"""Parts of the online endpoint's prediction log, written the way the endpoint writes them.

The layout and the columns are the endpoint's (``components/serving/predlog.py``): one
folder per kind and UTC day, parts named ``part-<stamp>-<8 hex>.parquet``, ids as text,
``stemma_row`` int32, ``stemma_time`` timestamp[us, UTC].
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TIME_TYPE = pa.timestamp("us", tz="UTC")
#: Rows per logged request.
REQUEST_ROWS = 10


def day_name(days_ago: int) -> str:
    """The UTC day ``days_ago`` days before today, as a day folder is named."""
    return (datetime.now(UTC) - timedelta(days=days_ago)).strftime("%Y-%m-%d")


def write_part(log: Path, kind: str, day: str, table: pa.Table) -> Path:
    """Write ``table`` as one part of ``<log>/<kind>/<day>``, as the endpoint names parts."""
    folder = Path(log) / kind / day
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(day).strftime("%Y%m%dT%H%M%S%f")
    path = folder / f"part-{stamp}-{secrets.token_hex(4)}.parquet"
    pq.write_table(table, path)
    return path


def request_columns(
    positions: np.ndarray,
    day: str,
    *,
    request_prefix: str,
    versions: Sequence[str],
    variant: str | Sequence[str],
) -> dict[str, pa.Array]:
    """The columns the endpoint adds to the rows at ``positions`` of a day's requests
    (:data:`REQUEST_ROWS` rows each): the request id, the row's place in it, a time within
    the day, the version and the variant that answered."""
    start = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(hours=1)
    variants = [variant] * len(positions) if isinstance(variant, str) else list(variant)
    return {
        "stemma_request_id": pa.array(
            [f"{request_prefix}-{p // REQUEST_ROWS:06d}" for p in positions], pa.string()
        ),
        "stemma_row": pa.array(positions % REQUEST_ROWS, pa.int32()),
        "stemma_time": pa.array([start + timedelta(seconds=int(p)) for p in positions], TIME_TYPE),
        "stemma_model_version": pa.array([str(v) for v in versions], pa.string()),
        "stemma_variant": pa.array(variants, pa.string()),
    }


def predictions_table(
    frame: pd.DataFrame,
    features: Sequence[str],
    *,
    id_column: str,
    scores: np.ndarray,
    versions: Sequence[str],
    variants: Sequence[str],
    day: str,
    request_prefix: str = "req",
    latency_ms: Sequence[float] | float = 3.0,
) -> pa.Table:
    """Rows of ``predictions/``: the features, the id as text, the answer and the request."""
    rows = len(frame)
    columns: dict[str, pa.Array] = {
        name: pa.Array.from_pandas(frame[name].reset_index(drop=True)) for name in features
    }
    columns[id_column] = pa.array([str(value) for value in frame[id_column]], pa.string())
    columns["prediction"] = pa.array((np.asarray(scores) >= 0.5).astype(np.int64))
    columns["score"] = pa.array(np.asarray(scores, dtype=np.float64))
    columns.update(
        request_columns(
            np.arange(rows), day, request_prefix=request_prefix, versions=versions, variant=variants
        )
    )
    latency = np.broadcast_to(np.asarray(latency_ms, dtype=np.float64), (rows,))
    columns["stemma_latency_ms"] = pa.array(latency)
    return pa.table(columns)


def shadow_table(
    ids: Sequence[object],
    *,
    id_column: str,
    scores: np.ndarray,
    version: str,
    day: str,
    request_prefix: str = "req",
    positions: np.ndarray | None = None,
) -> pa.Table:
    """Rows of ``shadow/``: ``version``'s scores of the rows at ``positions`` (default: all)
    of the requests :func:`predictions_table` logged with the same prefix and day."""
    positions = np.arange(len(ids)) if positions is None else np.asarray(positions)
    scores = np.asarray(scores, dtype=np.float64)[positions]
    return pa.table(
        {
            id_column: pa.array([str(ids[p]) for p in positions], pa.string()),
            **request_columns(
                positions,
                day,
                request_prefix=request_prefix,
                versions=[version] * len(positions),
                variant="shadow",
            ),
            "prediction": pa.array((scores >= 0.5).astype(np.int64)),
            "score": pa.array(scores),
        }
    )


def labels_table(
    ids: Sequence[object], values: Sequence[int], *, id_column: str, target: str, day: str
) -> pa.Table:
    """Rows of ``labels/``: the id as text, the label and when it arrived."""
    arrived = datetime.fromisoformat(day).replace(tzinfo=UTC) + timedelta(hours=20)
    return pa.table(
        {
            id_column: pa.array([str(value) for value in ids], pa.string()),
            target: pa.array(np.asarray(values, dtype=np.int64)),
            "stemma_time": pa.array([arrived] * len(ids), TIME_TYPE),
        }
    )
