"""The rows two models scored, joined by entity id: what shadow and canary compare.

Scores come from the scoring engine's outputs (:func:`read_scores`), ids and segment
columns from the batch (:func:`read_batch_columns`), labels from
:func:`~.data.labels.read_labels`. :func:`measure_latency` times both models on the same
requests through their runtimes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.data.labels import read_labels
from stemma.components.errors import DataError
from stemma.components.runtime.loading import ScoringModel, first_line
from stemma.components.scoring.job import ScoringResult
from stemma.components.scoring.output import SCORE_COLUMN

#: Columns of the joined rows besides the id, the label and the segment columns.
CHAMPION_SCORE = "champion_score"
CHALLENGER_SCORE = "challenger_score"
CHAMPION_SCORED = "champion_scored"
CHALLENGER_SCORED = "challenger_scored"
LABEL = "label"
#: How many ids an error message shows.
MAX_IDS_SHOWN = 3
#: Rows of one timed request, and requests timed per model (interleaved between models).
LATENCY_BATCH_ROWS = 256
LATENCY_REPEATS = 60


def read_scores(result: ScoringResult, id_column: str) -> pd.DataFrame:
    """The scored rows of a scoring output: the id and the score, in part order."""
    tables = [
        pq.read_table(result.output_dir / part["name"], columns=[id_column, SCORE_COLUMN])
        for part in result.manifest["parts"]
    ]
    if not tables:
        return pd.DataFrame({id_column: pd.Series(dtype="int64"), SCORE_COLUMN: []})
    return pa.concat_tables(tables).to_pandas()


def read_batch_columns(files: Sequence[Path], columns: Sequence[str]) -> pd.DataFrame:
    """The named columns of every row of the batch (ids and segment columns).

    Raises:
        DataError: a file lacks one of the columns.
    """
    frames = []
    for path in files:
        try:
            if path.suffix.lower() == ".csv":
                table = pacsv.read_csv(
                    path, convert_options=pacsv.ConvertOptions(include_columns=list(columns))
                )
            else:
                table = pq.read_table(path, columns=list(columns))
        except (pa.ArrowException, KeyError) as error:
            raise DataError(
                f"{path}: cannot read columns {', '.join(columns)}", [first_line(error)]
            ) from error
        frames.append(table.to_pandas())
    return pd.concat(frames, ignore_index=True)


def load_labels(path: Path, *, id_column: str, target: str, task: str) -> pd.DataFrame:
    """The labels of :func:`~.data.labels.read_labels` (empty ones not arrived yet), with the
    target named ``label``.

    Raises:
        DataError: as :func:`~.data.labels.read_labels`.
    """
    labels = read_labels(path, id_column, target, task=task)
    return labels.rename(columns={target: LABEL})


def build_shadow_rows(
    batch: pd.DataFrame,
    champion: pd.DataFrame,
    challenger: pd.DataFrame,
    *,
    id_column: str,
    labels: pd.DataFrame | None = None,
    labels_required: bool = False,
    labels_source: str = "the labels",
) -> pd.DataFrame:
    """One row per batch row: both models' scores (NaN where not scored), label, segments.

    Args:
        batch: the batch's id column and segment columns (:func:`read_batch_columns`).
        champion, challenger: :func:`read_scores` of each model's output.
        id_column: the entity id.
        labels: :func:`load_labels`, or None when none have arrived.
        labels_required: the labels were named explicitly: if none of their ids is in the
            batch, that is an error rather than labels still to come.
        labels_source: how to name the labels in an error.

    Raises:
        DataError: ids repeat in the batch, or labels named explicitly share no id with it.
    """
    repeated = batch[id_column][batch[id_column].duplicated()]
    if not repeated.empty:
        shown = ", ".join(str(value) for value in repeated.unique()[:MAX_IDS_SHOWN])
        raise DataError(
            f"the batch repeats {repeated.nunique()} ids in {id_column}",
            [f"e.g. {shown}", "shadow and canary evaluation join rows by id: ids must be unique"],
        )
    rows = batch.copy()
    add_scores(rows, id_column, champion, challenger)
    add_labels(rows, labels, id_column)
    if labels_required and labels is not None:
        require_label_overlap(batch[id_column], labels, id_column, labels_source)
    return rows


def add_scores(
    rows: pd.DataFrame, id_column: str, champion: pd.DataFrame, challenger: pd.DataFrame | None
) -> None:
    """Add each model's score of every row (NaN where it did not score it, or where there is
    no model) and whether it scored the row, from :func:`read_scores` frames."""
    for frame, score, scored in (
        (champion, CHAMPION_SCORE, CHAMPION_SCORED),
        (challenger, CHALLENGER_SCORE, CHALLENGER_SCORED),
    ):
        mapped = (
            pd.Series(dtype=np.float64)
            if frame is None
            else frame.set_index(id_column)[SCORE_COLUMN]
        )
        rows[scored] = rows[id_column].isin(mapped.index)
        rows[score] = rows[id_column].map(mapped).astype(np.float64)


def add_labels(rows: pd.DataFrame, labels: pd.DataFrame | None, id_column: str) -> None:
    """Add a ``label`` column to ``rows`` (NaN where no label has arrived)."""
    rows[LABEL] = np.nan
    if labels is not None and not labels.empty:
        rows[LABEL] = rows[id_column].map(labels.set_index(id_column)[LABEL]).astype(np.float64)


def require_label_overlap(
    ids: pd.Series, labels: pd.DataFrame, id_column: str, source: str
) -> None:
    """Labels named explicitly must label at least one row of the batch.

    Raises:
        DataError: none of the labelled ids is among ``ids`` (another batch's labels, or
            ids of another type), with both id ranges.
    """
    if labels.empty or ids.isin(labels[id_column]).any():
        return
    raise DataError(
        f"{source}: none of the {len(labels):,} labelled ids is in the batch",
        [
            f"batch {id_column}: {_id_range(ids)}",
            f"label {id_column}: {_id_range(labels[id_column])}",
            "pass the labels of this batch (same ids, same type)",
        ],
    )


def _id_range(ids: pd.Series) -> str:
    if ids.empty:
        return "(none)"
    try:
        return f"{ids.min()} to {ids.max()} ({ids.dtype})"
    except TypeError:
        return f"{ids.iloc[0]} ... ({ids.dtype})"


def measure_latency(
    models: dict[str, ScoringModel], files: Sequence[Path]
) -> dict[str, dict[str, float]]:
    """Per-request latency of each model on the batch's first rows, in milliseconds.

    A request is :data:`LATENCY_BATCH_ROWS` rows, encoded, run through the model's runtime and decoded, as
    an online caller would send them. The models take turns request by request, so a busy
    machine slows both alike; the first round warms up and is not counted.

    Returns:
        Per model ``latency_ms_p50``, ``latency_ms_p95`` and ``latency_ms_p99``; empty when
        the first rows hold no complete row.
    """
    columns = sorted({column for model in models.values() for column in model.feature_columns})
    return time_models(models, read_batch_columns(list(files)[:1], columns))


def time_models(
    models: dict[str, ScoringModel], frame: pd.DataFrame
) -> dict[str, dict[str, float]]:
    """:func:`measure_latency` on the first complete rows of ``frame`` (which holds every
    model's input columns): per model ``latency_ms_p50``/``p95``/``p99``, or empty."""
    columns = sorted({column for model in models.values() for column in model.feature_columns})
    if not set(columns) <= set(frame.columns):
        return {}
    sample = frame[columns].head(LATENCY_BATCH_ROWS).dropna()
    if sample.empty:
        return {}
    timings: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(LATENCY_REPEATS + 1):
        for name, model in models.items():
            began = time.perf_counter()
            model.preprocessor.decode_output(
                model.runtime.run(model.preprocessor.transform(sample))
            )
            if round_:
                timings[name].append((time.perf_counter() - began) * 1000.0)
    return {
        name: {f"latency_ms_p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}
        for name, values in timings.items()
    }
