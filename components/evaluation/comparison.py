"""Comparing two models on the same rows: the statistics shadow and canary evaluation share.

* **Routing**: :func:`route_buckets` and :func:`route_to_challenger`, from
  :mod:`.registry.routing` (the online endpoint routes with them too).
* **Score distributions**: population stability index, Kolmogorov-Smirnov and
  Jensen-Shannon distance between two score vectors (:func:`score_distances`; for a
  multiclass model, of the probability of the predicted class), and how often the two
  models take the same decision (:func:`decision_agreement`; multiclass: the same class).
* **Failures**: rows a model did not score, scored as NaN or infinity, or a constant score
  (:func:`count_failures`).
* **Metric difference**: :func:`paired_bootstrap` resamples rows with replacement, the same
  resample for both models, and gives the primary metric of each and a percentile interval
  for their difference. Every metric is computed from bootstrap *weights* (how often each
  row was drawn), a whole block of resamples at once with numpy, seeded. A multiclass
  model's scores are its ``(rows, classes)`` probabilities and the labels class codes:
  accuracy and the log loss are weighted means, F1, precision and recall come from
  weighted confusion counts per class, ROC AUC is the macro mean of weighted one-vs-rest
  AUCs.
* **Plots**: champion-versus-challenger score scatter, and the metric difference with its
  interval overall and per segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stemma.components.evaluation.statistics import (
    finite_values,
    jensen_shannon,
    ks_test,
    quantile_psi,
)

# Routing lives with the registry, where the online endpoint reads it too.
from stemma.components.registry.routing import route_buckets as route_buckets
from stemma.components.registry.routing import route_to_challenger as route_to_challenger
from stemma.components.spec import CLASSIFICATION_TASKS, METRIC_DIRECTIONS, EvaluateSpec
from stemma.components.training.metrics import (
    MAX_SCATTER_POINTS,
    SCATTER_SEED,
    new_figure,
    save_figure,
)

#: Equal-width bins of the Jensen-Shannon distance (over [0, 1] for a binary model).
JS_BINS = 20
#: Two regression predictions "agree" when they differ by at most this share of the
#: reference scores' standard deviation.
REGRESSION_AGREEMENT_TOLERANCE = 0.1
#: Fewest scored rows for which "every score is the same" counts as a failure.
CONSTANT_MIN_ROWS = 10
#: Bootstrap weights held in memory at once (rows x resamples); bounds memory per block.
BOOTSTRAP_BLOCK_ELEMENTS = 1 << 20
#: Share of resamples whose metric must be defined (e.g. both classes drawn) to decide.
MIN_DEFINED_RESAMPLES = 0.9
#: Probabilities are clipped to [eps, 1 - eps] in the log loss, as scikit-learn does.
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------
# Score distributions


def score_distances(reference: np.ndarray, candidate: np.ndarray, *, task: str) -> dict[str, float]:
    """How far apart two score distributions are.

    Returns:
        ``psi`` (population stability index, reference quantile bins), ``ks`` and
        ``ks_pvalue`` (two-sample Kolmogorov-Smirnov), ``js`` (Jensen-Shannon distance,
        base 2, in [0, 1]); NaN where a side has no finite score.
    """
    ref = finite_values(reference)
    cand = finite_values(candidate)
    if ref.size == 0 or cand.size == 0:
        nan = float("nan")
        return {"psi": nan, "ks": nan, "ks_pvalue": nan, "js": nan}
    ks, ks_pvalue = ks_test(ref, cand)
    if task in CLASSIFICATION_TASKS:
        low, high = 0.0, 1.0
    else:
        low = float(min(ref.min(), cand.min()))
        high = float(max(ref.max(), cand.max()))
        high = high if high > low else low + 1.0
    p = np.histogram(ref, bins=JS_BINS, range=(low, high))[0]
    q = np.histogram(cand, bins=JS_BINS, range=(low, high))[0]
    return {
        "psi": quantile_psi(ref, cand),
        "ks": ks,
        "ks_pvalue": ks_pvalue,
        "js": jensen_shannon(p, q),
    }


def decision_agreement(
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    *,
    task: str,
    champion_threshold: float = 0.5,
    challenger_threshold: float = 0.5,
) -> float:
    """Share of rows on which the two models decide alike (NaN when there are none).

    Binary: the same predicted class, each at its own threshold. Multiclass (scores of
    shape ``(rows, classes)``): the same likeliest class. Regression: predictions within
    :data:`REGRESSION_AGREEMENT_TOLERANCE` standard deviations of the champion's. Rows
    where either score is not finite never agree.
    """
    a = np.asarray(champion_scores, dtype=np.float64)
    b = np.asarray(challenger_scores, dtype=np.float64)
    if a.size == 0:
        return float("nan")
    if task == "multiclass":
        finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
        same = _likeliest(a) == _likeliest(b)
        return float(np.mean(same & finite))
    finite = np.isfinite(a) & np.isfinite(b)
    if task == "binary":
        same = (a >= champion_threshold) == (b >= challenger_threshold)
    else:
        spread = float(np.std(a[finite])) if finite.any() else 0.0
        same = np.abs(a - b) <= REGRESSION_AGREEMENT_TOLERANCE * max(spread, 1e-12)
    return float(np.mean(same & finite))


@dataclass(frozen=True)
class FailureCounts:
    """Rows a model was asked to score and failed on.

    Attributes:
        rows: rows the model was asked to score.
        not_scored: rows it rejected (unknown category, missing value it cannot take).
        non_finite: rows scored as NaN or infinity.
        constant: every finite score is the same (over at least
            :data:`CONSTANT_MIN_ROWS` rows): the model ignores its input, so every row
            counts as failed.
    """

    rows: int
    not_scored: int
    non_finite: int
    constant: bool

    @property
    def failed(self) -> int:
        return self.rows if self.constant else self.not_scored + self.non_finite

    @property
    def error_rate(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    def describe(self) -> str:
        """One phrase: ``12 of 500 rows (2.40%): 2 not scored, 10 NaN/inf``."""
        if self.constant:
            return f"every score is the same over {self.rows:,} rows (constant output)"
        return (
            f"{self.failed:,} of {self.rows:,} rows ({self.error_rate:.2%}): "
            f"{self.not_scored:,} not scored, {self.non_finite:,} NaN/inf"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed, "error_rate": self.error_rate}


def count_failures(scores: np.ndarray, *, rows: int) -> FailureCounts:
    """Failures among ``rows`` rows of which ``scores`` are those the model scored."""
    values = np.asarray(scores, dtype=np.float64)
    finite = values[np.isfinite(values)]
    constant = finite.size >= CONSTANT_MIN_ROWS and float(np.ptp(finite)) == 0.0
    return FailureCounts(
        rows=int(rows),
        not_scored=int(rows - values.size),
        non_finite=int(values.size - finite.size),
        constant=bool(constant),
    )


# ---------------------------------------------------------------------------------------
# Metrics from bootstrap weights


def metric_values(
    metric: str,
    task: str,
    y_true: np.ndarray,
    scores: np.ndarray,
    weights: np.ndarray,
    *,
    threshold: float = 0.5,
) -> np.ndarray:
    """A metric for each row of ``weights`` (how often each row is counted).

    With ``weights`` a single row of ones this is the plain metric, equal to
    :func:`~.evaluation.evaluate_scores`; with bootstrap counts, one value per resample.

    Args:
        metric: a name of :data:`~.spec.METRIC_DIRECTIONS` for the task.
        task: ``binary``, ``multiclass`` or ``regression``.
        y_true: labels (0/1), class codes (multiclass: each row's class's position) or
            values, length ``n``.
        scores: probabilities of class 1, each class's probabilities (multiclass, shape
            ``(n, classes)``) or predicted values, length ``n``, finite.
        weights: shape ``(resamples, n)``.
        threshold: the decision threshold for the binary thresholded metrics.

    Returns:
        Shape ``(resamples,)``; NaN where the metric is undefined for a resample (e.g.
        ROC AUC with one class drawn).
    """
    if metric not in METRIC_DIRECTIONS.get(task, {}):
        raise ValueError(f"{metric!r} is not a {task} metric")
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    total = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if task == "multiclass":
            return _multiclass_values(metric, y.astype(np.int64), s, w, total)
        if task == "regression":
            error = s - y
            if metric == "rmse":
                return np.sqrt(w @ (error**2) / total)
            if metric == "mae":
                return w @ np.abs(error) / total
            residual = w @ (error**2)
            spread = w @ (y**2) - (w @ y) ** 2 / total
            return np.where(spread > 0, 1.0 - residual / spread, np.nan)
        positive = y >= 0.5
        if metric == "roc_auc":
            return _weighted_roc_auc(s, positive, w)
        if metric == "pr_auc":
            return _weighted_average_precision(s, positive, w)
        if metric == "log_loss":
            p = np.clip(s, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
            return w @ -np.where(positive, np.log(p), np.log1p(-p)) / total
        if metric == "brier":
            return w @ ((s - y) ** 2) / total
        predicted = s >= threshold
        tp = w @ (predicted & positive).astype(np.float64)
        fp = w @ (predicted & ~positive).astype(np.float64)
        fn = w @ (~predicted & positive).astype(np.float64)
        if metric == "accuracy":
            return (total - fp - fn) / total
        if metric == "precision":
            return np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        if metric == "recall":
            return np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        return np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)  # f1


def _likeliest(probabilities: np.ndarray) -> np.ndarray:
    """Each row's likeliest class (the first of equal ones, as ``argmax``)."""
    return np.asarray(probabilities).argmax(axis=1)


def _multiclass_values(
    metric: str, codes: np.ndarray, probabilities: np.ndarray, w: np.ndarray, total: np.ndarray
) -> np.ndarray:
    """:func:`metric_values` of a multiclass model, as scikit-learn computes each metric
    (every class counted in the macro means, 0 where a ratio has no denominator)."""
    rows, classes = probabilities.shape
    truth = codes[:, None] == np.arange(classes)
    if metric == "log_loss":
        p = np.clip(probabilities[np.arange(rows), codes], LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
        return w @ -np.log(p) / total
    if metric == "top2_accuracy":
        # scikit-learn's top_k_accuracy_score: a stable sort, ties to the later class.
        ranked = np.argsort(probabilities, axis=1, kind="mergesort")[:, ::-1]
        hits = (ranked[:, : min(2, classes)] == codes[:, None]).any(axis=1)
        return w @ hits.astype(np.float64) / total
    if metric == "roc_auc":
        # The macro mean over the classes whose one-vs-rest AUC is defined in the resample.
        per_class = np.stack(
            [_weighted_roc_auc(probabilities[:, k], truth[:, k], w) for k in range(classes)]
        )
        defined = np.isfinite(per_class)
        counted = defined.sum(axis=0)
        summed = np.where(defined, per_class, 0.0).sum(axis=0)
        return np.where(counted > 0, summed / counted, np.nan)
    predicted = _likeliest(probabilities)[:, None] == np.arange(classes)
    actual = w @ truth.astype(np.float64)  # (resamples, classes)
    chosen = w @ predicted.astype(np.float64)
    hits = w @ (truth & predicted).astype(np.float64)
    if metric == "accuracy":
        return hits.sum(axis=1) / total
    precision = np.where(chosen > 0, hits / chosen, 0.0)
    recall = np.where(actual > 0, hits / actual, 0.0)
    if metric == "precision_macro":
        return precision.mean(axis=1)
    if metric == "recall_macro":
        return recall.mean(axis=1)
    f1 = np.where(actual + chosen > 0, 2.0 * hits / (actual + chosen), 0.0)
    if metric == "f1_weighted":
        return (f1 * actual).sum(axis=1) / total
    return f1.mean(axis=1)  # f1_macro


def _tie_groups(
    scores: np.ndarray, positive: np.ndarray, w: np.ndarray, *, descending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per run of equal scores, in score order."""
    order = np.argsort(-scores if descending else scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    weights = w[:, order]
    pos = np.add.reduceat(weights * positive[order], starts, axis=1)
    neg = np.add.reduceat(weights * ~positive[order], starts, axis=1)
    return pos, neg


def _weighted_roc_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(score of a positive > score of a negative) + half the ties, weighted (Mann-Whitney)."""
    pos, neg = _tie_groups(scores, positive, w, descending=False)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs, np.nan)


def _weighted_average_precision(
    scores: np.ndarray, positive: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """Sum over thresholds of (recall gained) x precision, as scikit-learn computes it."""
    pos, neg = _tie_groups(scores, positive, w, descending=True)
    true_positives = np.cumsum(pos, axis=1)
    predicted = true_positives + np.cumsum(neg, axis=1)
    total = pos.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positives / predicted, 0.0)
        return np.where(total > 0, (pos * precision).sum(axis=1) / total, np.nan)


def bootstrap_weights(rows: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, rows)`` counts: how often each row is drawn in each resample."""
    drawn = rng.integers(0, rows, size=(resamples, rows))
    offsets = (np.arange(resamples, dtype=np.int64) * rows)[:, None]
    counts = np.bincount((drawn + offsets).ravel(), minlength=resamples * rows)
    return counts.reshape(resamples, rows).astype(np.float64)


@dataclass(frozen=True)
class MetricComparison:
    """The primary metric of two models on the same labelled rows, and their difference.

    Attributes:
        metric: the metric (``gate.metric``).
        higher_is_better: its direction.
        rows: labelled rows compared.
        champion: the champion's value on them.
        challenger: the challenger's value.
        difference: ``challenger - champion``.
        low, high: the percentile interval of the difference.
        champion_low, champion_high, challenger_low, challenger_high: each model's
            interval from the same resamples.
        confidence: the interval's level.
        resamples: bootstrap resamples drawn.
        defined: resamples in which the metric was defined for both models.
        seed: the seed of the resampling.
    """

    metric: str
    higher_is_better: bool
    rows: int
    champion: float
    challenger: float
    difference: float
    low: float
    high: float
    champion_low: float
    champion_high: float
    challenger_low: float
    challenger_high: float
    confidence: float
    resamples: int
    defined: int
    seed: int

    @property
    def improvement(self) -> float:
        """The difference in the metric's better direction (positive: challenger better)."""
        return self.difference if self.higher_is_better else -self.difference

    @property
    def improvement_low(self) -> float:
        """Lower end of the improvement's interval."""
        return self.low if self.higher_is_better else -self.high

    @property
    def improvement_high(self) -> float:
        """Upper end of the improvement's interval."""
        return self.high if self.higher_is_better else -self.low

    @property
    def decidable(self) -> bool:
        """Whether the interval is defined (enough resamples had a defined metric)."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    def describe(self) -> str:
        """``roc_auc: challenger 0.9120 vs champion 0.8870, difference +0.0250 (95% CI ...)``."""
        return (
            f"{self.metric}: challenger {self.challenger:.4f} vs champion {self.champion:.4f}, "
            f"difference {self.difference:+.4f} ({self.confidence:.0%} CI {self.low:+.4f} to "
            f"{self.high:+.4f}) over {self.rows:,} labelled rows"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "improvement": self.improvement,
            "improvement_low": self.improvement_low,
            "improvement_high": self.improvement_high,
        }


def comparison_metrics(
    name: str, comparison: MetricComparison | None, *, prefix: str = ""
) -> dict[str, float]:
    """``<prefix>.<name>_champion``, ``_challenger``, ``_difference`` and its interval."""
    if comparison is None:
        return {}
    base = f"{prefix}." if prefix else ""
    return {
        f"{base}{name}_champion": comparison.champion,
        f"{base}{name}_challenger": comparison.challenger,
        f"{base}{name}_difference": comparison.difference,
        f"{base}{name}_difference_low": comparison.low,
        f"{base}{name}_difference_high": comparison.high,
    }


def as_dict(report: Any) -> dict[str, Any]:
    """A report dataclass's fields as JSON-able data, field by field, nested ones included
    (through their ``to_dict`` where they have one)."""
    return {item.name: _plain(getattr(report, item.name)) for item in fields(report)}


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def paired_bootstrap(
    metric: str,
    task: str,
    y_true: np.ndarray,
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    *,
    champion_threshold: float = 0.5,
    challenger_threshold: float = 0.5,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> MetricComparison:
    """The metric of both models and a paired percentile-bootstrap interval of the difference.

    Each resample draws ``n`` rows with replacement and scores *both* models on the same
    draw, so the interval reflects the models' difference rather than the rows' luck. The
    same seed and rows give the same interval. When fewer than
    :data:`MIN_DEFINED_RESAMPLES` of the resamples define the metric for both models (one
    class drawn, say), the interval is NaN: not enough evidence. A multiclass model's
    scores are ``(rows, classes)`` probabilities and ``y_true`` the class codes.

    Raises:
        ValueError: arrays of different lengths, no rows, a non-finite score or label, a
            multiclass label that is no class code, a metric unknown for the task, or a
            confidence outside (0, 1).
    """
    y, a, b = _checked_rows(task, y_true, champion_scores, challenger_scores, confidence, resamples)
    higher_is_better = METRIC_DIRECTIONS[task][metric]

    def both(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (
            metric_values(metric, task, y, a, weights, threshold=champion_threshold),
            metric_values(metric, task, y, b, weights, threshold=challenger_threshold),
        )

    ones = np.ones((1, y.size))
    point_a, point_b = (float(values[0]) for values in both(ones))
    rng = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_BLOCK_ELEMENTS // y.size)
    blocks = [
        both(bootstrap_weights(y.size, min(block, resamples - start), rng))
        for start in range(0, resamples, block)
    ]
    boot_a, boot_b = (np.concatenate(side) for side in zip(*blocks, strict=True))
    defined = np.isfinite(boot_a) & np.isfinite(boot_b)
    alpha = (1.0 - confidence) / 2.0
    quantiles = [alpha, 1.0 - alpha]
    nan = float("nan")
    if defined.sum() >= MIN_DEFINED_RESAMPLES * resamples:
        low, high = (float(v) for v in np.quantile(boot_b[defined] - boot_a[defined], quantiles))
        a_low, a_high = (float(v) for v in np.quantile(boot_a[defined], quantiles))
        b_low, b_high = (float(v) for v in np.quantile(boot_b[defined], quantiles))
    else:
        low = high = a_low = a_high = b_low = b_high = nan
    return MetricComparison(
        metric=metric,
        higher_is_better=higher_is_better,
        rows=int(y.size),
        champion=point_a,
        challenger=point_b,
        difference=point_b - point_a,
        low=low,
        high=high,
        champion_low=a_low,
        champion_high=a_high,
        challenger_low=b_low,
        challenger_high=b_high,
        confidence=confidence,
        resamples=resamples,
        defined=int(defined.sum()),
        seed=seed,
    )


def bootstrap_settings(settings: EvaluateSpec) -> dict[str, Any]:
    """The keyword arguments of :func:`paired_bootstrap` the spec's ``evaluate`` sets: the
    interval's confidence, the resamples and the seed."""
    return {
        "confidence": settings.confidence,
        "resamples": settings.bootstrap_resamples,
        "seed": settings.seed,
    }


def _checked_rows(
    task: str,
    y_true: np.ndarray,
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    confidence: float,
    resamples: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    a = np.asarray(champion_scores, dtype=np.float64)
    b = np.asarray(challenger_scores, dtype=np.float64)
    # A multiclass model's scores are (rows, classes); every other model's one per row.
    rows = a.shape[:1] if task == "multiclass" and a.ndim == 2 else a.shape
    if not (y.shape == rows and a.shape == b.shape) or y.ndim != 1:
        raise ValueError(f"labels and scores differ in shape: {y.shape}, {a.shape}, {b.shape}")
    if task == "multiclass" and a.ndim != 2:
        raise ValueError(f"multiclass scores must be (rows, classes), got shape {a.shape}")
    if y.size == 0:
        raise ValueError("no labelled rows to compare on")
    if not (np.isfinite(y).all() and np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("labels and scores must be finite")
    if task == "multiclass" and not np.isin(y, np.arange(a.shape[1])).all():
        raise ValueError(f"multiclass labels must be class codes 0 to {a.shape[1] - 1}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    return y, a, b


# ---------------------------------------------------------------------------------------
# Plots


def plot_score_scatter(
    champion_scores: np.ndarray,
    challenger_scores: np.ndarray,
    out_path: Path,
    *,
    title: str,
    champion_label: str = "champion",
    challenger_label: str = "challenger",
) -> Path:
    """Scatter of the challenger's score against the champion's, row by row, with y = x.

    At most :data:`~.evaluation.MAX_SCATTER_POINTS` rows are drawn (a seeded sample).
    """
    a = np.asarray(champion_scores, dtype=np.float64)
    b = np.asarray(challenger_scores, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size > MAX_SCATTER_POINTS:
        sample = np.random.default_rng(SCATTER_SEED).choice(
            a.size, MAX_SCATTER_POINTS, replace=False
        )
        a, b = a[sample], b[sample]
    figure, axes = new_figure()
    axes.scatter(a, b, s=4, alpha=0.35, linewidths=0)
    if a.size:
        low = float(min(a.min(), b.min()))
        high = float(max(a.max(), b.max()))
        axes.plot([low, high], [low, high], color="grey", linestyle="--", label="same score")
        axes.legend(loc="upper left")
    axes.set(xlabel=f"{champion_label} score", ylabel=f"{challenger_label} score", title=title)
    return save_figure(figure, Path(out_path))


def plot_metric_differences(
    rows: Sequence[tuple[str, MetricComparison]],
    out_path: Path,
    *,
    margin: float,
    title: str,
) -> Path:
    """The difference (challenger - champion) with its interval, one line per group.

    Args:
        rows: ``(label, comparison)`` pairs, e.g. ``("overall", ...)``, ``("elevel=2", ...)``;
            a comparison without a defined interval is drawn as a point only.
        out_path: the PNG to write.
        margin: the improvement the decision asks for, drawn as a line (in the metric's
            better direction, so at ``-margin`` for a metric where lower is better).
        title: the figure's title.
    """
    figure, axes = new_figure()
    labels = [label for label, _ in rows]
    positions = np.arange(len(rows))[::-1]
    for position, (_, comparison) in zip(positions, rows, strict=True):
        if comparison.decidable:
            axes.plot([comparison.low, comparison.high], [position, position], color="C0")
        axes.plot([comparison.difference], [position], "o", color="C0")
    axes.axvline(0.0, color="grey", linestyle="-", linewidth=0.8)
    if rows:
        direction = 1.0 if rows[0][1].higher_is_better else -1.0
        axes.axvline(direction * margin, color="C3", linestyle="--", label=f"margin {margin:g}")
        axes.legend(loc="best")
        metric = rows[0][1].metric
        confidence = rows[0][1].confidence
        axes.set_xlabel(f"{metric}: challenger - champion ({confidence:.0%} interval)")
    axes.set_yticks(positions, labels)
    axes.margins(y=0.15)
    axes.set_title(title)
    return save_figure(figure, Path(out_path))
