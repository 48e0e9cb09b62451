"""The rows two models scored, joined by entity id: what shadow and canary compare.

Scores come from the scoring engine's outputs (:func:`read_scores`), ids and segment
columns from the batch (:func:`read_batch_columns`), labels from
:func:`~.data.labels.read_labels`. :func:`measure_latency` times both models on the same
requests through their runtimes.

A multiclass model's score column is the probability of its predicted class (what the
score distances and failure counts look at); its probability of each class is a column
too (:func:`probability_columns`), by the class's position among the classes both models
predict (:func:`compared_classes`), and :func:`model_scores` gives them as a
``(rows, classes)`` matrix. Labels reach the comparison as the models' class codes
(:func:`encode_labels`, through the model's label map); a production label that is no
class of the model is :data:`UNKNOWN_LABEL`, counted and reported
(:func:`unknown_labels`), never compared and never an error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.data.labels import label_text, read_labels
from stemma.components.errors import DataError
from stemma.components.model.preprocessing import PROBABILITY_PREFIX, Preprocessor
from stemma.components.runtime.loading import ScoringModel, first_line
from stemma.components.scoring.job import ScoringResult
from stemma.components.scoring.output import SCORE_COLUMN
from stemma.components.spec import CLASSIFICATION_TASKS

#: Columns of the joined rows besides the id, the label and the segment columns.
CHAMPION_SCORE = "champion_score"
CHALLENGER_SCORE = "challenger_score"
CHAMPION_SCORED = "champion_scored"
CHALLENGER_SCORED = "challenger_scored"
LABEL = "label"
#: The label as it arrived (text), beside its class code, to name unknown labels.
LABEL_TEXT = "label_text"
#: The class code of a label that is no class of the model (``Preprocessor.class_codes``).
UNKNOWN_LABEL = -1.0
#: Each class's probability in the joined rows (multiclass), by the class's position.
PROBABILITY_COLUMN = {
    CHAMPION_SCORE: "champion_probability_{}",
    CHALLENGER_SCORE: "challenger_probability_{}",
}
#: How many ids an error message shows, and unknown labels a note names.
MAX_IDS_SHOWN = 3
MAX_LABELS_SHOWN = 3
#: Rows of one timed request, and requests timed per model (interleaved between models).
LATENCY_BATCH_ROWS = 256
LATENCY_REPEATS = 60


def read_scores(
    result: ScoringResult, id_column: str, classes: Sequence[object] | None = None
) -> pd.DataFrame:
    """The scored rows of a scoring output: the id and the score, in part order; with
    ``classes`` (multiclass) each class's probability too (``probability_<class>``)."""
    columns = [id_column, SCORE_COLUMN, *class_probability_columns(classes)]
    tables = [
        pq.read_table(result.output_dir / part["name"], columns=columns)
        for part in result.manifest["parts"]
    ]
    if not tables:
        return pd.DataFrame({id_column: pd.Series(dtype="int64"), **{c: [] for c in columns[1:]}})
    return pa.concat_tables(tables).to_pandas()


def class_probability_columns(classes: Sequence[object] | None) -> list[str]:
    """The columns of each class's probability in scored parts and in the prediction log
    (``probability_<class>``); none without classes."""
    return [f"{PROBABILITY_PREFIX}{name}" for name in classes or ()]


def compared_classes(
    champion: ScoringModel, challenger: ScoringModel | None = None
) -> tuple[object, ...] | None:
    """The classes two multiclass models are compared on, in the champion's order; None
    for another task.

    Raises:
        DataError: the challenger predicts other classes, or is of another task.
    """
    if challenger is not None and challenger.task != champion.task:
        raise DataError(
            f"the challenger v{challenger.version} is a {challenger.task} model and the "
            f"champion v{champion.version} a {champion.task} one: they cannot be compared",
            ["compare models of the same data.task"],
        )
    if champion.task != "multiclass":
        return None
    classes = tuple(champion.preprocessor.class_names())
    if challenger is not None:
        others = tuple(challenger.preprocessor.class_names())
        if sorted(map(str, others)) != sorted(map(str, classes)):
            raise DataError(
                f"the challenger v{challenger.version} predicts other classes than the "
                f"champion v{champion.version}: {_classes(others)} against {_classes(classes)}",
                ["compare models trained on the same classes (data.classes)"],
            )
    return classes


def _classes(classes: Sequence[object]) -> str:
    return ", ".join(str(name) for name in classes)


def probability_columns(score_column: str, classes: int) -> list[str]:
    """The joined rows' columns of a model's probability of each class (multiclass), by
    the class's position: ``champion_probability_0``, ... for :data:`CHAMPION_SCORE`."""
    return [PROBABILITY_COLUMN[score_column].format(k) for k in range(classes)]


def model_scores(rows: pd.DataFrame, score_column: str, classes: int | None) -> np.ndarray:
    """A model's scores of the joined rows: the score column, or with ``classes`` its
    ``(rows, classes)`` probabilities (NaN where it did not score a row)."""
    if not classes:
        return rows[score_column].to_numpy(dtype=np.float64)
    return rows[probability_columns(score_column, classes)].to_numpy(dtype=np.float64)


@dataclass(frozen=True)
class RowScores:
    """Both models' scores of the joined rows and their labels, as the comparisons take them.

    Attributes:
        champion, challenger: each model's scores (:func:`model_scores`): one per row, or
            a multiclass model's ``(rows, classes)`` probabilities; NaN where not scored.
        champion_row, challenger_row: one score per row, what failure counts and score
            distances look at: the score column, NaN for a multiclass row whose
            probabilities are not all finite.
        labels: the label of each row as the models' class code or value (NaN: none yet).
        unknown: rows whose label is no class of the models (:data:`UNKNOWN_LABEL`).
        note: :func:`unknown_labels`, or ``""``.
    """

    champion: np.ndarray
    challenger: np.ndarray
    champion_row: np.ndarray
    challenger_row: np.ndarray
    labels: np.ndarray
    unknown: np.ndarray
    note: str

    @property
    def known(self) -> np.ndarray:
        """Rows whose label has arrived and is a class (or value) of the models."""
        return ~np.isnan(self.labels) & ~self.unknown

    def at(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labels and both models' scores of the rows of ``mask``, as
        :func:`~.comparison.paired_bootstrap` takes them."""
        return self.labels[mask], self.champion[mask], self.challenger[mask]


def scores_of(rows: pd.DataFrame, champion: ScoringModel, challenger: ScoringModel) -> RowScores:
    """Both models' scores and the labels of joined rows (:func:`add_scores`,
    :func:`add_labels`).

    Raises:
        DataError: the two models cannot be compared (:func:`compared_classes`).
    """
    classes = compared_classes(champion, challenger)
    width = len(classes) if classes is not None else None
    full = [model_scores(rows, column, width) for column in (CHAMPION_SCORE, CHALLENGER_SCORE)]
    single = [
        np.where(np.isfinite(scores).all(axis=1), rows[column].to_numpy(np.float64), np.nan)
        if width
        else scores
        for scores, column in zip(full, (CHAMPION_SCORE, CHALLENGER_SCORE), strict=True)
    ]
    unknown, note = unknown_labels(rows, champion.task)
    champion_scores, challenger_scores = full
    champion_row, challenger_row = single
    labels = rows[LABEL].to_numpy(np.float64)
    return RowScores(
        champion_scores, challenger_scores, champion_row, challenger_row, labels, unknown, note
    )


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


def load_labels(
    path: Path, *, id_column: str, target: str, task: str, classes: bool = False
) -> pd.DataFrame:
    """The labels of :func:`~.data.labels.read_labels` (empty ones not arrived yet), with the
    target named ``label``; with ``classes`` (a multiclass task, or a label map) as they
    arrived, text or numbers, for :func:`encode_labels`.

    Raises:
        DataError: as :func:`~.data.labels.read_labels`.
    """
    labels = read_labels(path, id_column, target, task=task, classes=classes)
    return labels.rename(columns={target: LABEL})


def encode_labels(
    labels: pd.DataFrame | None, preprocessor: Preprocessor, *, column: str = LABEL
) -> pd.DataFrame | None:
    """Labels as a model is compared on them: the one way production labels reach a
    comparison or a metric.

    A classifier's labels become its class codes through its label map and classes
    (``Preprocessor.class_codes``: 0/1, or the class's position), as float, with
    :data:`UNKNOWN_LABEL` for a label that is no class of the model, and the label's text
    in :data:`LABEL_TEXT` to name it; a regression's are its values. Once joined to rows,
    count the unknown ones with :func:`unknown_labels`; never compare them.

    Args:
        labels: a table with the label in ``column`` (:func:`load_labels`, or the frame of
            :func:`~.data.labels.read_labels` with ``column`` the target), or None.
        preprocessor: the preprocessor of the model whose classes the labels are (the
            champion's, or the control's).
        column: the label column.

    Returns:
        A new table (the input is not changed), or None for None.
    """
    if labels is None or preprocessor.task not in CLASSIFICATION_TASKS:
        return labels
    raw = labels[column]
    codes = preprocessor.class_codes(raw).astype(np.float64)
    codes[raw.isna().to_numpy()] = np.nan  # not arrived yet: no label, not an unknown one
    return labels.assign(
        **{column: codes, LABEL_TEXT: raw.map(label_text, na_action="ignore").astype(object)}
    )


def known_labels(
    labels: pd.DataFrame, preprocessor: Preprocessor, *, column: str
) -> tuple[pd.DataFrame, int, str]:
    """:func:`encode_labels` for a consumer that takes only labels of the model's classes
    (the drift monitor's performance check): those left out are counted and named.

    Returns:
        The labels whose class the model knows (``column`` as codes, or values for
        regression), how many were left out, and a sentence saying so (``""`` if none).
    """
    encoded = encode_labels(labels, preprocessor, column=column)
    assert encoded is not None
    if LABEL_TEXT not in encoded:
        return encoded, 0, ""
    unknown = (encoded[column] == UNKNOWN_LABEL).to_numpy()
    note = _unknown_note("labels are", encoded.loc[unknown, LABEL_TEXT])
    return encoded.loc[~unknown].drop(columns=[LABEL_TEXT]), int(unknown.sum()), note


def unknown_labels(rows: pd.DataFrame, task: str) -> tuple[np.ndarray, str]:
    """The rows holding a label that is no class of the model (:data:`UNKNOWN_LABEL`),
    and a sentence that counts them and names a few (``""`` when none; none for
    regression).

    Args:
        rows: joined rows with ``label`` (and :data:`LABEL_TEXT`) from :func:`add_labels`.
        task: the models' task.
    """
    if task not in CLASSIFICATION_TASKS or LABEL not in rows:
        return np.zeros(len(rows), dtype=bool), ""
    unknown = (rows[LABEL] == UNKNOWN_LABEL).to_numpy()
    texts = rows.loc[unknown, LABEL_TEXT] if LABEL_TEXT in rows else pd.Series(dtype=object)
    return unknown, _unknown_note("rows hold a label that is", texts, count=int(unknown.sum()))


def _unknown_note(what: str, texts: pd.Series, *, count: int | None = None) -> str:
    count = len(texts) if count is None else count
    if not count:
        return ""
    shown = ", ".join(repr(str(text)) for text in pd.unique(texts.dropna())[:MAX_LABELS_SHOWN])
    return (
        f"{count:,} {what} no class of the model ({shown or 'values not kept'}): counted as "
        "unknown_labels, not compared; map them with data.labels, or retrain with their class"
    )


def build_shadow_rows(
    batch: pd.DataFrame,
    champion: pd.DataFrame,
    challenger: pd.DataFrame,
    *,
    id_column: str,
    labels: pd.DataFrame | None = None,
    labels_required: bool = False,
    labels_source: str = "the labels",
    classes: Sequence[object] | None = None,
) -> pd.DataFrame:
    """One row per batch row: both models' scores (NaN where not scored), label, segments.

    Args:
        batch: the batch's id column and segment columns (:func:`read_batch_columns`).
        champion, challenger: :func:`read_scores` of each model's output.
        id_column: the entity id.
        labels: :func:`load_labels` through :func:`encode_labels`, or None when none have
            arrived.
        labels_required: the labels were named explicitly: if none of their ids is in the
            batch, that is an error rather than labels still to come.
        labels_source: how to name the labels in an error.
        classes: multiclass: the classes compared (:func:`compared_classes`), whose
            probabilities ``champion`` and ``challenger`` hold.

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
    add_scores(rows, id_column, champion, challenger, classes)
    add_labels(rows, labels, id_column)
    if labels_required and labels is not None:
        require_label_overlap(batch[id_column], labels, id_column, labels_source)
    return rows


def add_scores(
    rows: pd.DataFrame,
    id_column: str,
    champion: pd.DataFrame,
    challenger: pd.DataFrame | None,
    classes: Sequence[object] | None = None,
) -> None:
    """Add each model's score of every row (NaN where it did not score it, or where there is
    no model) and whether it scored the row, from :func:`read_scores` frames; with
    ``classes`` (multiclass) each class's probability too (:func:`probability_columns`)."""
    sources = [SCORE_COLUMN, *class_probability_columns(classes)]
    for frame, score, scored in (
        (champion, CHAMPION_SCORE, CHAMPION_SCORED),
        (challenger, CHALLENGER_SCORE, CHALLENGER_SCORED),
    ):
        indexed = None if frame is None else frame.set_index(id_column)
        targets = [score, *probability_columns(score, len(classes or ()))]
        for source, target in zip(sources, targets, strict=True):
            mapped = pd.Series(dtype=np.float64) if indexed is None else indexed[source]
            rows[target] = rows[id_column].map(mapped).astype(np.float64)
        rows[scored] = rows[id_column].isin(pd.Index([]) if indexed is None else indexed.index)


def add_labels(rows: pd.DataFrame, labels: pd.DataFrame | None, id_column: str) -> None:
    """Add a ``label`` column to ``rows`` (NaN where no label has arrived), and the label's
    text where :func:`encode_labels` kept it.

    Raises:
        DataError: labels that are not numbers (text classes not yet encoded).
    """
    rows[LABEL] = np.nan
    if labels is None or labels.empty:
        return
    if not pd.api.types.is_numeric_dtype(labels[LABEL]):
        raise DataError(
            f"labels such as {labels[LABEL].iloc[0]!r} are not class codes",
            ["labels are compared as the model's class codes: pass them through encode_labels"],
        )
    indexed = labels.set_index(id_column)
    rows[LABEL] = rows[id_column].map(indexed[LABEL]).astype(np.float64)
    if LABEL_TEXT in indexed:
        rows[LABEL_TEXT] = rows[id_column].map(indexed[LABEL_TEXT])


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
