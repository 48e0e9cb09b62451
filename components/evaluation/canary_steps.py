"""One canary step's scoring: route the batch by id, score each arm, write what is served.

The control model scores every row (its arm, and the reference the guards compare the
challenger with); the challenger scores the rows routed to it. The served predictions hold
one row per entity, with the arm, the version that served it and whether the champion stood
in for a challenger that failed on the row (``fallback``).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.errors import DataError
from stemma.components.evaluation.comparison import route_to_challenger
from stemma.components.evaluation.rows import (
    CHALLENGER_SCORE,
    CHALLENGER_SCORED,
    CHAMPION_SCORE,
    CHAMPION_SCORED,
    add_scores,
    compared_classes,
    model_scores,
    read_batch_columns,
    read_scores,
)
from stemma.components.platform import tags
from stemma.components.platform.files import write_atomically
from stemma.components.runtime.loading import ScoringModel
from stemma.components.scoring.engine import score_files
from stemma.components.scoring.inputs import input_digest
from stemma.components.scoring.job import ScoringResult
from stemma.components.scoring.output import PREDICTION_COLUMN, SCORE_COLUMN

#: Arms, as the served predictions name them.
ARM_CHALLENGER = "challenger"
ARM_CHAMPION = "champion"
#: Columns of the served predictions besides the id, prediction and score.
ARM_COLUMN = "arm"
VERSION_COLUMN = "model_version"
FALLBACK_COLUMN = "fallback"
#: Files of a step folder.
PREDICTIONS_FILE = "predictions.parquet"
ARM_INPUT = "arm/challenger.parquet"
CONTROL_DIR = "control"
CHALLENGER_DIR = "challenger"


@dataclass(frozen=True)
class StepScores:
    """One batch scored by both arms.

    Attributes:
        batch: the batch file.
        digest: its md5.
        folder: the step folder.
        rows: one row per batch row: id, arm (``challenger``/``champion``), both models'
            scores (NaN where not scored) and whether each scored the row.
        control: the control model's scoring of the whole batch (of the challenger's
            arm for a day of the endpoint's log; None when there was nothing to score).
        challenger: the challenger's scoring of its arm (None when the arm is empty, and
            for a day of the log, where the endpoint scored it).
        predictions: the served predictions file (None for a day of the log: the endpoint
            served them).
        predictions_sha256: its sha256.
        latency: per model, request latency percentiles (ms) as served (a day of the log);
            None: the guards time both models.
        log: for a day of the log, the rows left out and why.
    """

    batch: Path
    digest: str
    folder: Path
    rows: pd.DataFrame
    control: ScoringResult | None
    challenger: ScoringResult | None
    predictions: Path | None
    predictions_sha256: str | None
    latency: dict[str, dict[str, float]] | None = None
    log: dict[str, Any] = field(default_factory=dict)


def score_step(
    control: ScoringModel,
    challenger: ScoringModel,
    batch: Path,
    folder: Path,
    *,
    fraction: float,
    salt: str,
    id_column: str,
    **scoring: Any,
) -> StepScores:
    """Route a batch, score each arm, and write the served predictions.

    The control scores every row (its arm, and the reference the guards compare the
    challenger with); the challenger scores the rows routed to it, read from a file of
    those rows (``arm/challenger.parquet``). Both are :func:`~.scoring.score_files` with
    ``id_column`` and the keyword arguments ``scoring`` (``chunk_rows``, ...). Every output
    is written atomically and, as the scoring is, resumes where a killed run stopped.

    Raises:
        DataError: the batch repeats ids, or as :func:`~.scoring.score_files`.
    """
    batch = Path(batch)
    folder = Path(folder)
    digest, _ = input_digest([batch])
    score = functools.partial(score_files, id_column=id_column, progress=False, **scoring)
    ids = read_batch_columns([batch], [id_column])[id_column]
    repeated = ids[ids.duplicated()]
    if not repeated.empty:
        raise DataError(
            f"{batch}: {repeated.nunique()} ids repeat in {id_column}",
            ["the canary routes entities by id: ids must be unique within a batch"],
        )
    routed = route_to_challenger(ids.to_numpy(), fraction, salt)
    classes = compared_classes(control, challenger)
    control_result = score(control, [batch], folder / CONTROL_DIR)
    challenger_result = challenger_scores = None
    if routed.any():
        arm_file = _write_arm_input(batch, folder / ARM_INPUT, id_column, ids[routed])
        challenger_result = score(challenger, [arm_file], folder / CHALLENGER_DIR)
        challenger_scores = read_scores(challenger_result, id_column, classes)

    rows = pd.DataFrame({id_column: ids.to_numpy(), ARM_COLUMN: ARM_CHAMPION})
    rows.loc[routed, ARM_COLUMN] = ARM_CHALLENGER
    control_scores = read_scores(control_result, id_column, classes)
    add_scores(rows, id_column, control_scores, challenger_scores, classes)
    predictions = folder / PREDICTIONS_FILE
    sha256 = _write_predictions(predictions, rows, id_column, control, challenger)
    return StepScores(
        batch=batch,
        digest=digest,
        folder=folder,
        rows=rows,
        control=control_result,
        challenger=challenger_result,
        predictions=predictions,
        predictions_sha256=sha256,
    )


def _write_arm_input(batch: Path, path: Path, id_column: str, ids: pd.Series) -> Path:
    """The batch rows routed to the challenger, as a Parquet file (rewritten only if changed)."""
    table = pacsv.read_csv(batch) if batch.suffix.lower() == ".csv" else pq.read_table(batch)
    chosen = table.filter(pc.is_in(table.column(id_column), value_set=pa.array(ids.to_numpy())))
    return write_table_if_changed(path, chosen)


def write_table_if_changed(path: Path, table: pa.Table) -> Path:
    """Write ``table`` as Parquet to ``path`` atomically, unless the file holds it already."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    # The same rows keep the file, so a scoring that read it stays valid and resumes.
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    return path


def _write_predictions(
    path: Path,
    rows: pd.DataFrame,
    id_column: str,
    control: ScoringModel,
    challenger: ScoringModel,
) -> str:
    """One served prediction per row: the challenger's on its arm unless it failed there
    (a multiclass prediction as batch scoring writes it: the class, its probability and
    each class's probability)."""
    by_challenger = (
        (rows[ARM_COLUMN] == ARM_CHALLENGER)
        & rows[CHALLENGER_SCORED]
        & np.isfinite(rows[CHALLENGER_SCORE])
    )
    by_control = ~by_challenger & rows[CHAMPION_SCORED]
    served = by_challenger | by_control
    score = np.where(by_challenger, rows[CHALLENGER_SCORE], rows[CHAMPION_SCORE])[served]
    threshold = np.where(by_challenger, challenger.threshold, control.threshold)[served]
    columns: dict[str, Any] = {id_column: pa.array(rows.loc[served, id_column].to_numpy())}
    if control.task == "binary":
        columns[PREDICTION_COLUMN] = pa.array((score >= threshold).astype(np.int64))
    columns[SCORE_COLUMN] = pa.array(score.astype(np.float64))
    if control.task == "multiclass":
        width = control.preprocessor.n_outputs
        probabilities = np.where(
            by_challenger.to_numpy()[:, None],
            model_scores(rows, CHALLENGER_SCORE, width),
            model_scores(rows, CHAMPION_SCORE, width),
        )[served.to_numpy()]
        answers = control.preprocessor.output_frame(probabilities)
        columns = {id_column: columns[id_column]}
        columns.update({name: pa.array(answers[name].to_numpy()) for name in answers.columns})
    columns[ARM_COLUMN] = pa.array(rows.loc[served, ARM_COLUMN].to_numpy(), pa.string())
    columns[VERSION_COLUMN] = pa.array(
        np.where(by_challenger, challenger.version, control.version)[served], pa.string()
    )
    columns[FALLBACK_COLUMN] = pa.array(
        ((rows[ARM_COLUMN] == ARM_CHALLENGER) & ~by_challenger)[served].to_numpy()
    )
    table = pa.table(columns).replace_schema_metadata(
        {
            tags.CONTROL_MODEL_URI: control.model_uri,
            tags.CHALLENGER_MODEL_URI: challenger.model_uri,
        }
    )
    write_table_if_changed(path, table)
    return hashlib.sha256(path.read_bytes()).hexdigest()
