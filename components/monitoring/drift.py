"""Drift: how far a production batch has moved from a model's reference profile.

For each monitored column the batch is compared with the :class:`~.profile.ReferenceProfile`
saved when the model was trained (statistics from :mod:`~.evaluation.statistics`):

* numeric columns: the two-sample Kolmogorov-Smirnov test against the profile's sorted
  sample, and PSI on the profile's quantile bins;
* categorical columns: the chi-square test of homogeneity (categories the batch cannot
  expect 5 rows of pooled into one), PSI on the category frequencies, or the
  Jensen-Shannon distance;
* every feature: a rise of its missing rate over the reference's (Fisher's exact test);
* prediction drift: the model's scores on the batch against its scores on the test split
  (as a numeric column), and a classifier's predicted classes against those it predicted
  on the test split (as a categorical column);
* once labels arrive (joined by the id column): label drift against the training labels
  (as a categorical column for a classifier), and performance decay, the model's metric on
  the batch against its test metric.

Tests decide by their p-values, Bonferroni-corrected across every test the batch runs, so
a batch drawn like the reference raises a false alarm at most at the threshold's rate
whatever its size. PSI is computed only where each bin can expect
``monitor.psi_min_expected`` rows, and decides only with ``monitor.thresholds.psi``: it has
no error rate, and on small batches it is large by chance.

:class:`DriftMonitor` takes the batch a chunk at a time and keeps only counts
(:mod:`.accumulators`). A column drifts when any of its deciding statistics crosses its
threshold; the batch has drift when at least ``min_drifted_features`` features drift, or
its scores or labels drift, or its performance decays (:class:`~.report.DriftReport`).
:func:`~.records.drift_event` then describes the Prefect event that the monitoring flow
emits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stemma.components.data import prediction_log
from stemma.components.errors import DataError
from stemma.components.evaluation.statistics import (
    CHI2_MIN_EXPECTED,
    chi_square,
    jensen_shannon,
    missing_rise_pvalue,
    pool_rare_categories,
    psi,
)
from stemma.components.monitoring.accumulators import (
    Accumulator,
    CategoricalAccumulator,
    NumericAccumulator,
    accumulator_for,
)
from stemma.components.monitoring.profile import (
    CATEGORICAL,
    NUMERIC,
    NumericProfile,
    ReferenceProfile,
    predicted_classes,
    rate_of_one,
)
from stemma.components.monitoring.report import (
    FEATURE,
    LABEL,
    PREDICTED_CLASS,
    PREDICTION,
    ColumnDrift,
    DriftReport,
    PerformanceCheck,
)
from stemma.components.runtime.loading import first_line
from stemma.components.spec import METRIC_DIRECTIONS, MonitorSpec

if TYPE_CHECKING:
    from stemma.components.runtime.loading import ScoringModel


#: Read buffer of the Parquet reader.
READ_BUFFER_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------
# Comparing a batch


class DriftMonitor:
    """Compares a batch, fed chunk by chunk, with a reference profile.

    Args:
        profile: the model's reference profile.
        settings: the spec's monitor section (statistics, thresholds, the features to
            compare: ``settings.features``, else every feature of the profile).
        prediction: whether scores will be added for prediction drift (they are compared
            only when the profile holds reference scores, and a classifier's predicted
            classes only when it holds those it predicted on the test split).

    Raises:
        DataError: a feature to compare is not in the profile.
    """

    def __init__(
        self,
        profile: ReferenceProfile,
        settings: MonitorSpec,
        *,
        prediction: bool = True,
    ) -> None:
        self.profile = profile
        self.settings = settings
        names = list(settings.features or profile.features)
        unknown = [name for name in names if name not in profile.features]
        if unknown:
            raise DataError(
                f"the reference profile has no {', '.join(unknown)}",
                [
                    f"profiled features: {', '.join(profile.features)}",
                    "monitor only features the model was trained on (monitor.features)",
                ],
            )
        self.features = {name: accumulator_for(profile.features[name]) for name in names}
        self.scores = (
            NumericAccumulator(profile.scores)
            if prediction and settings.prediction_drift and profile.scores is not None
            else None
        )
        predicting = prediction and settings.prediction_drift and profile.task != "regression"
        self.predicted = (
            CategoricalAccumulator(profile.predictions)
            if predicting and profile.predictions is not None
            else None
        )
        # A profile made before Stemma recorded predicted classes: said in the report.
        self._no_reference_classes = predicting and profile.predictions is None
        self.labels: Accumulator | None = None
        if settings.label_drift and profile.label is not None:
            self.labels = accumulator_for(profile.label)
        self._labelled_truth: list[np.ndarray] = []
        self._labelled_scores: list[np.ndarray] = []
        self.rows = 0

    @property
    def columns(self) -> list[str]:
        """The feature columns each chunk must hold."""
        return list(self.features)

    def add(self, columns: Mapping[str, Any], scores: np.ndarray | None = None) -> None:
        """Count one chunk: a mapping of feature name to its values, and the chunk's scores.

        Numeric columns may be numpy arrays or Arrow arrays (nulls are missing values);
        categorical ones anything :class:`~.accumulators.CategoricalAccumulator` takes.
        Scores are one per row, or for a multiclass model one per row and class (its
        score is then the likeliest class's probability); NaN where a row has none.
        """
        rows = None
        for name, accumulator in self.features.items():
            values = columns[name]
            if isinstance(accumulator, NumericAccumulator):
                values = _float_values(values)
            accumulator.add(values)
            rows = len(values)
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            if self.scores is not None:
                self.scores.add(scores.max(axis=1) if scores.ndim == 2 else scores)
            if self.predicted is not None:
                classes = predicted_classes(
                    scores, classes=self.profile.classes, threshold=self.profile.threshold
                )
                self.predicted.add(pa.array(classes.tolist()))
            rows = len(scores) if rows is None else rows
        self.rows += rows or 0

    def add_labels(self, truth: np.ndarray, scores: np.ndarray | None) -> None:
        """Count labelled rows of the batch: their labels and (when scored) their scores.

        Args:
            truth: the labels as numbers: a classifier's class codes (the model's
                ``Preprocessor.class_codes``: 0/1 for binary, the index of the class for
                multiclass), or a regression's values; missing ones are left out.
            scores: the rows' scores (see :meth:`add`), or None.
        """
        truth = np.asarray(truth, dtype=np.float64)
        finite = np.isfinite(truth)
        if self.labels is not None:
            if isinstance(self.labels, NumericAccumulator):
                self.labels.add(truth)
            else:
                codes = truth[finite].astype(np.int64)
                classes = self.profile.classes
                # A classifier's labels are profiled as its classes (binary: 0 and 1).
                named = np.asarray(classes, dtype=object)[codes] if classes else codes
                self.labels.add(pa.array(named.tolist()))
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float64)
            usable = finite & np.isfinite(scores.reshape(len(truth), -1)).all(axis=1)
            self._labelled_truth.append(truth[usable])
            self._labelled_scores.append(scores[usable])

    def report(self, *, metric: str | None = None, labelled: bool = False) -> DriftReport:
        """The report of everything added so far.

        Args:
            metric: the performance metric (``roc_auc``...); None skips the check.
            labelled: whether labels were given (the label and performance checks then
                appear in the report, assessed or with the reason they were not).
        """
        settings = self.settings
        truth = np.concatenate(self._labelled_truth) if self._labelled_truth else np.empty(0)
        # Statistics of an empty or tiny batch say nothing about the population; with no
        # rows every test would read as the largest possible shift: nothing is compared.
        assessed = self.rows > 0 and self.rows >= settings.min_rows
        compared: list[tuple[str, str, Accumulator]] = []
        if assessed:
            compared += [(name, FEATURE, column) for name, column in self.features.items()]
            if self.scores is not None and self.scores.rows:
                compared.append(("score", PREDICTION, self.scores))
            if self.predicted is not None and self.predicted.rows:
                compared.append(("class", PREDICTED_CLASS, self.predicted))
            if labelled and self.labels is not None and self.labels.finite:
                compared.append((self.profile.target, LABEL, self.labels))
        measured = [
            _measure(name, role, accumulator, settings) for name, role, accumulator in compared
        ]
        tests = sum(_tests_run(column) for column in measured)
        thresholds = _effective_thresholds(settings, tests)
        columns = [
            _judge(column, accumulator, settings, thresholds)
            for column, (_, _, accumulator) in zip(measured, compared, strict=True)
        ]
        features = tuple(column for column in columns if column.role == FEATURE)
        by_role = {column.role: column for column in columns if column.role != FEATURE}
        prediction = by_role.get(PREDICTION)
        if prediction is not None and self._no_reference_classes:
            prediction = dataclasses.replace(
                prediction,
                not_assessed={**prediction.not_assessed, "predicted class": NO_REFERENCE_CLASSES},
            )
        performance = None
        if assessed and labelled and metric is not None and settings.performance_decay:
            scores = np.concatenate(self._labelled_scores) if self._labelled_scores else np.empty(0)
            performance = _performance(self.profile, metric, truth, scores, settings)
        return DriftReport(
            rows=self.rows,
            features=features,
            prediction=prediction,
            predicted_class=by_role.get(PREDICTED_CLASS),
            label=by_role.get(LABEL),
            performance=performance,
            labelled_rows=int(truth.size) if labelled else 0,
            min_drifted_features=settings.min_drifted_features,
            thresholds=thresholds,
            statistics={
                NUMERIC: list(settings.statistics.numeric),
                CATEGORICAL: list(settings.statistics.categorical),
            },
            pvalue_correction=settings.pvalue_correction,
            min_rows=settings.min_rows,
            tests=tests,
        )


def _float_values(values: Any) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise DataError(f"expected a numeric column, got {values.type}")
        return np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False))
    return np.asarray(values, dtype=np.float64)


#: Why a classifier's predicted classes are not compared with an older profile.
NO_REFERENCE_CLASSES = (
    "the reference profile holds no predicted classes (the model was trained before Stemma "
    "recorded them): train it again to compare them"
)
#: The p-value of each test, by the breach it makes.
PVALUES = {"ks": "ks_pvalue", "chi2": "chi2_pvalue", "missing": "missing_pvalue"}


def _tests_run(column: ColumnDrift) -> int:
    """The p-value tests run on a column (a test that could not run has no p-value)."""
    return sum(
        math.isfinite(column.statistics.get(pvalue, math.nan)) for pvalue in PVALUES.values()
    )


def _effective_thresholds(settings: MonitorSpec, tests: int) -> dict[str, float]:
    """The thresholds the statistics are compared with, p-value ones corrected.

    With ``pvalue_correction: bonferroni`` every p-value threshold is divided by the number
    of p-value tests the batch ran (KS or chi-square and the missing rate per feature, the
    prediction's and the label's tests), so the chance that a batch drawn like the
    reference fails any of them is at most the threshold.
    """
    thresholds = settings.thresholds.model_dump()
    if settings.pvalue_correction == "bonferroni" and tests > 1:
        for pvalue in PVALUES.values():
            thresholds[pvalue] = thresholds[pvalue] / tests
    return thresholds


def _measure(name: str, role: str, accumulator: Accumulator, settings: MonitorSpec) -> ColumnDrift:
    """The column's statistics and shares, not yet judged (no breaches)."""
    statistics: dict[str, float] = {}
    not_assessed: dict[str, str] = {}
    minimum = settings.psi_min_expected
    reference_missing = None
    if isinstance(accumulator, NumericAccumulator):
        reference = accumulator.reference
        wanted = settings.statistics.numeric
        if "psi" in wanted:
            why = _psi_unassessable(reference, accumulator.finite, minimum)
            if why:
                not_assessed["psi"] = why
            else:
                statistics["psi"] = psi(reference.counts, accumulator.bins)
        if "ks" in wanted:
            statistics["ks_statistic"], statistics["ks_pvalue"] = accumulator.ks()
        bins = _bin_labels(reference.edges)
        reference_shares = _shares(reference.counts)
        current_shares = _shares(accumulator.bins)
        reference_mean, current_mean = reference.mean, accumulator.mean
        kind = NUMERIC
    else:
        categories, reference_counts, current_counts = accumulator.aligned()
        wanted = settings.statistics.categorical
        # Both on the categories each can expect enough rows of (rare ones pooled).
        for statistic, fewest in (("psi", minimum), ("chi2", CHI2_MIN_EXPECTED)):
            if statistic not in wanted:
                continue
            ref, cur, _ = pool_rare_categories(reference_counts, current_counts, fewest)
            if accumulator.finite and ref.size < 2:
                not_assessed[statistic] = _too_few_cells(accumulator.finite, fewest)
            elif statistic == "psi":
                statistics["psi"] = psi(ref, cur)
            else:
                statistics["chi2_statistic"], statistics["chi2_pvalue"] = chi_square(ref, cur)
        if "jensen_shannon" in wanted:
            statistics["jensen_shannon"] = jensen_shannon(reference_counts, current_counts)
        bins = tuple(str(value) for value in categories)
        reference_shares = _shares(reference_counts)
        current_shares = _shares(current_counts)
        reference_mean = current_mean = None
        if role == LABEL and set(categories) <= {0, 1}:  # a binary label: the rate of 1
            reference_mean = rate_of_one(categories, reference_counts)
            current_mean = rate_of_one(categories, current_counts)
        kind = CATEGORICAL
    if role == FEATURE:
        profiled = accumulator.reference
        reference_missing = profiled.missing / profiled.rows if profiled.rows else None
        if settings.missing_drift:
            statistics["missing_pvalue"] = missing_rise_pvalue(
                profiled.missing, profiled.rows, accumulator.missing, accumulator.rows
            )
    return ColumnDrift(
        name=name,
        role=role,
        kind=kind,
        rows=accumulator.rows,
        missing=accumulator.missing,
        statistics=statistics,
        breaches=(),
        bins=bins,
        reference=reference_shares,
        current=current_shares,
        reference_mean=reference_mean,
        current_mean=None if current_mean is None or math.isnan(current_mean) else current_mean,
        reference_missing_share=reference_missing,
        not_assessed=not_assessed,
    )


def _psi_unassessable(reference: NumericProfile, rows: int, minimum: int) -> str | None:
    """Why PSI cannot be computed on a numeric column of ``rows`` values, or None."""
    counts = np.asarray(reference.counts, dtype=np.float64)
    if rows == 0 or counts.sum() <= 0:
        return None  # PSI is NaN: nothing to compare
    fewest = rows * counts[counts > 0].min() / counts.sum()
    if fewest >= minimum:
        return None
    return (
        f"{rows:,} values over {counts.size} bins: the smallest can expect {fewest:.1f} rows, "
        f"fewer than monitor.psi_min_expected ({minimum})"
    )


def _too_few_cells(rows: int, minimum: float) -> str:
    return (
        f"{rows:,} values: fewer than two categories (rare ones pooled) can expect {minimum:g} rows"
    )


def _judge(
    column: ColumnDrift,
    accumulator: Accumulator,
    settings: MonitorSpec,
    thresholds: Mapping[str, float],
) -> ColumnDrift:
    """The column with the statistics over their thresholds as its breaches: a test's
    p-value below its threshold, any other statistic at or above its own."""
    wanted = getattr(settings.statistics, column.kind)  # numeric or categorical

    def over(statistic: str) -> bool:
        name = PVALUES.get(statistic, statistic)
        value, threshold = column.statistics.get(name, math.nan), thresholds[name]
        if threshold is None or not math.isfinite(value):
            return False
        return value < threshold if statistic in PVALUES else value >= threshold

    if accumulator.finite == 0 and accumulator.reference.finite > 0:
        breaches = ["missing"]
    else:
        breaches = [statistic for statistic in (*wanted, "missing") if over(statistic)]
    return dataclasses.replace(column, breaches=tuple(breaches))


def _shares(counts: Sequence[float] | np.ndarray) -> tuple[float, ...]:
    values = np.asarray(counts, dtype=np.float64)
    total = values.sum()
    return tuple(float(v) for v in (values / total if total > 0 else values))


def _bin_labels(edges: Sequence[float]) -> tuple[str, ...]:
    if not edges:
        return ("all",)
    shown = [_short(edge) for edge in edges]
    labels = [f"<{shown[0]}"]
    labels += [f"{low}-{high}" for low, high in itertools.pairwise(shown)]
    labels.append(f">={shown[-1]}")
    return tuple(labels)


def _short(value: float) -> str:
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _performance(
    profile: ReferenceProfile,
    metric: str,
    truth: np.ndarray,
    scores: np.ndarray,
    settings: MonitorSpec,
) -> PerformanceCheck:
    from stemma.components.training.metrics import evaluate_scores

    reference = profile.performance.get(metric)
    # A relative limit is a share of the test-split metric, in the metric's units here.
    limit = settings.thresholds.metric_drop(metric)
    known = math.nan if reference is None else reference
    threshold, shown = limit.limit(known), limit.describe(known)

    def unassessed(note: str) -> PerformanceCheck:
        return PerformanceCheck(
            metric, reference, None, None, threshold, int(truth.size), False, note, shown
        )

    if reference is None:
        return unassessed(f"the reference profile holds no {metric} for the model")
    if truth.size < settings.min_labelled_rows:
        return unassessed(
            f"{truth.size} labelled rows with a score, fewer than monitor.min_labelled_rows "
            f"({settings.min_labelled_rows})"
        )
    try:
        classes = list(profile.classes) if profile.task == "multiclass" else None
        current = evaluate_scores(profile.task, truth, scores, classes=classes or None)[metric]
    except DataError as error:
        return unassessed(error.headline)
    if not math.isfinite(current):
        return unassessed(f"{metric} is not defined on these rows")
    higher_is_better = METRIC_DIRECTIONS[profile.task].get(metric, True)
    drop = reference - current if higher_is_better else current - reference
    return PerformanceCheck(
        metric, reference, current, drop, threshold, int(truth.size), drop >= threshold, "", shown
    )


# ---------------------------------------------------------------------------------------
# Reading a batch


def read_chunks(
    files: Sequence[Path], columns: Sequence[str], chunk_rows: int
) -> Iterator[pa.Table]:
    """The files' rows, ``columns`` only, as tables of at most ``chunk_rows`` rows."""
    for path in files:
        try:
            if path.suffix.lower() == ".parquet":
                # A small read buffer and no pre-buffering: pyarrow otherwise holds whole
                # column chunks of a row group, and more of them the longer the file.
                parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
                try:
                    for batch in parquet.iter_batches(
                        batch_size=chunk_rows, columns=list(columns), use_threads=False
                    ):
                        yield pa.Table.from_batches([batch])
                        del batch
                        # Arrow's allocator keeps freed chunks for reuse; measured on 10M
                        # rows x 20 columns, that made peak memory grow with the file.
                        pa.default_memory_pool().release_unused()
                finally:
                    parquet.close()
            else:
                options = pacsv.ConvertOptions(
                    include_columns=list(columns), strings_can_be_null=True
                )
                with pacsv.open_csv(path, convert_options=options) as reader:
                    for batch in reader:
                        yield pa.Table.from_batches([batch])
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: cannot read it", [first_line(error)]) from error


def make_scorer(model: ScoringModel) -> Callable[[pa.Table], np.ndarray]:
    """A function giving the model's score for each row of a chunk (a multiclass model's:
    each class's probability, one column per class).

    Rows with a missing or non-finite numeric feature get NaN (left out of the prediction
    comparison); an unknown category encodes as unknown, as ``score.unknown_categories:
    score`` does.
    """
    preprocessor = model.preprocessor
    numeric = list(preprocessor.numeric)
    means = dict(zip(numeric, preprocessor.means, strict=True))

    def score(table: pa.Table) -> np.ndarray:
        frame = table.select(model.feature_columns).to_pandas()
        usable = np.ones(len(frame), dtype=bool)
        for column in numeric:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
            finite = np.isfinite(values)
            usable &= finite
            frame[column] = np.where(finite, values, means[column])
        raw = model.runtime.run(preprocessor.transform(frame))
        scores = np.asarray(preprocessor.decode_output(raw), dtype=np.float64)
        if preprocessor.task != "multiclass":
            scores = scores.reshape(len(frame))
        scores[~usable] = np.nan
        return scores

    return score


class LoggedScores:
    """Scores a chunk of the prediction log: the score the endpoint logged where the row's
    model version is the monitored one, the model's score (``scorer``) elsewhere.

    Rows another version scored (a canary, the champion before a swap) are scored again,
    so every score compared comes from the monitored model.

    Attributes:
        columns: the log's columns besides the features that a chunk must hold.
        logged: rows whose logged score was taken so far; ``rescored``: rows scored again.
    """

    columns = (prediction_log.SCORE_COLUMN, prediction_log.MODEL_VERSION_COLUMN)

    def __init__(self, scorer: Callable[[pa.Table], np.ndarray], version: str) -> None:
        self.scorer = scorer
        self.version = str(version)
        self.logged = 0
        self.rescored = 0

    @classmethod
    def fits(cls, files: Sequence[Path]) -> bool:
        """Whether every file is a prediction log part (holds a score and a model version)."""
        for path in files:
            if path.suffix.lower() != ".parquet":
                return False
            try:
                names = set(pq.read_schema(path).names)
            except (pa.ArrowException, OSError) as error:
                raise DataError(f"{path}: cannot read it", [first_line(error)]) from error
            if not set(cls.columns) <= names:
                return False
        return True

    def __call__(self, table: pa.Table) -> np.ndarray:
        versions = pc.cast(table.column(prediction_log.MODEL_VERSION_COLUMN), pa.string())
        same = pc.fill_null(pc.equal(versions, self.version), False).to_numpy(zero_copy_only=False)
        scores = _float_values(table.column(prediction_log.SCORE_COLUMN)).copy()
        others = ~same
        if others.any():
            scores[others] = self.scorer(table.filter(pa.array(others)))
        self.logged += int(same.sum())
        self.rescored += int(others.sum())
        return scores


def scorer_for(
    model: ScoringModel, files: Sequence[Path]
) -> tuple[Callable[[pa.Table], np.ndarray], list[str]]:
    """The scorer of a batch and the columns it reads: :func:`make_scorer`, or for parts of
    the endpoint's prediction log :class:`LoggedScores` around it (not for a multiclass
    model: the log holds its likeliest class's probability only, and every class's is
    compared)."""
    scorer = make_scorer(model)
    if model.preprocessor.task == "multiclass" or not LoggedScores.fits(files):
        return scorer, list(model.feature_columns)
    logged = LoggedScores(scorer, model.version)
    return logged, [*model.feature_columns, *LoggedScores.columns]


def monitor_batch(
    files: Sequence[Path],
    profile: ReferenceProfile,
    settings: MonitorSpec,
    *,
    scorer: Callable[[pa.Table], np.ndarray] | None = None,
    score_columns: Sequence[str] = (),
    labels: pd.DataFrame | pd.Series | None = None,
    id_column: str | None = None,
    metric: str | None = None,
) -> DriftReport:
    """Compare a batch (files read a chunk at a time) with a reference profile.

    Args:
        files: the batch's Parquet or CSV files (columns already checked).
        profile: the model's reference profile.
        settings: the spec's monitor section.
        scorer: scores a chunk (from :func:`make_scorer`), for prediction drift and the
            performance check; None skips both.
        score_columns: the columns the scorer reads.
        labels: the batch's labels as numbers (a classifier's class codes, a regression's
            values), a table with the id column or a series by id; or None.
        id_column: the column the labels join on.
        metric: the performance metric (``roc_auc``...).

    Returns:
        The report.
    """
    monitor = DriftMonitor(profile, settings, prediction=scorer is not None)
    columns = list(dict.fromkeys([*monitor.columns, *score_columns]))
    if labels is not None:
        if id_column is None:
            raise DataError("labels need an id column to join on (data.id)")
        columns.append(id_column)
        if isinstance(labels, pd.DataFrame):
            labels = labels.set_index(id_column).iloc[:, 0]
    for chunk in read_chunks(files, columns, settings.chunk_rows):
        scores = scorer(chunk) if scorer is not None else None
        monitor.add({name: chunk.column(name) for name in monitor.columns}, scores)
        if labels is not None and id_column is not None:
            ids = _ids_like(chunk.column(id_column), labels.index)
            truth = labels.reindex(ids).to_numpy(dtype=np.float64, na_value=np.nan)
            known = np.isfinite(truth)
            if known.any():
                monitor.add_labels(truth[known], None if scores is None else scores[known])
    return monitor.report(metric=metric, labelled=labels is not None)


def _ids_like(ids: pa.ChunkedArray, index: pd.Index) -> np.ndarray:
    """A chunk's ids as the labels hold them. The endpoint logs ids as text and label files
    often hold numbers: a whole number matches its digits (7 and 7.0 match "7")."""
    values = ids.to_numpy(zero_copy_only=False)
    numeric_ids = pa.types.is_integer(ids.type) or pa.types.is_floating(ids.type)
    numeric_index = pd.api.types.is_numeric_dtype(index.dtype)
    if numeric_ids == numeric_index:
        return values
    if numeric_index:
        return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy()
    return np.array([prediction_log.id_text(value) for value in values], dtype=object)
