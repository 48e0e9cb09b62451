"""Evaluation: the test-split metrics a gate compares, and the plots a reviewer looks at.

Metric names are exactly those of :data:`~.spec.METRIC_DIRECTIONS`, so any of them can be
named in ``gate.metric``. Plots are drawn with matplotlib's Agg canvas directly (no pyplot
state, nothing left open) and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stemma.components.errors import DataError
from stemma.components.platform.files import write_atomically
from stemma.components.spec import METRIC_DIRECTIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Most points a scatter plot draws; more only slows rendering and hides nothing.
MAX_SCATTER_POINTS = 20_000

#: Seed of the subsample drawn for scatter plots, so the same data gives the same picture.
SCATTER_SEED = 0

#: Figure size in inches and resolution of the written PNGs.
FIGURE_SIZE = (5.5, 4.5)
FIGURE_DPI = 110


def evaluate_scores(
    task: str,
    y_true: np.ndarray,
    scores: np.ndarray,
    threshold: float = 0.5,
    *,
    classes: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Compute every metric of the task.

    Args:
        task: ``binary``, ``multiclass`` or ``regression``.
        y_true: true labels (0/1), class codes (multiclass: the index of each row's class)
            or values.
        scores: predicted probabilities of class 1 (binary), of each class (multiclass,
            shape ``(n, classes)``) or predicted values.
        threshold: probability at or above which a row counts as predicted positive.
        classes: multiclass: the class names, in the columns' order, for the per-class
            metrics (default: the column indices).

    Returns:
        Binary: roc_auc, pr_auc (average precision), accuracy, f1, precision, recall,
        log_loss, brier. Multiclass: every metric of ``METRIC_DIRECTIONS["multiclass"]``
        plus ``precision_<class>`` and ``recall_<class>`` per class. Regression: rmse,
        mae, r2.

    Raises:
        DataError: the arrays are empty, differ in length or hold non-finite values;
            binary labels other than 0/1, probabilities outside [0, 1], or a single class
            (ROC AUC is undefined); fewer than two regression rows.
    """
    from sklearn import metrics

    if task not in METRIC_DIRECTIONS:
        raise ValueError(f"task must be one of {sorted(METRIC_DIRECTIONS)}, got {task!r}")
    if task == "multiclass":
        codes, probabilities = checked_multiclass(y_true, scores)
        return multiclass_metrics(codes, probabilities, classes)
    truth, predicted = _checked(y_true, scores)
    if task == "binary":
        _check_binary(truth, predicted)
        labels = (predicted >= threshold).astype(np.int64)
        truth_int = truth.astype(np.int64)
        results = {
            "roc_auc": metrics.roc_auc_score(truth_int, predicted),
            "pr_auc": metrics.average_precision_score(truth_int, predicted),
            "accuracy": metrics.accuracy_score(truth_int, labels),
            "f1": metrics.f1_score(truth_int, labels, zero_division=0),
            "precision": metrics.precision_score(truth_int, labels, zero_division=0),
            "recall": metrics.recall_score(truth_int, labels, zero_division=0),
            "log_loss": metrics.log_loss(truth_int, predicted, labels=[0, 1]),
            "brier": metrics.brier_score_loss(truth_int, predicted),
        }
    else:
        if len(truth) < 2:
            raise DataError(
                "regression metrics need at least two rows; the evaluation data has one"
            )
        results = {
            "rmse": float(np.sqrt(metrics.mean_squared_error(truth, predicted))),
            "mae": metrics.mean_absolute_error(truth, predicted),
            "r2": metrics.r2_score(truth, predicted),
        }
    return {name: float(value) for name, value in results.items()}


def multiclass_metrics(
    codes: np.ndarray, probabilities: np.ndarray, classes: Sequence[Any] | None = None
) -> dict[str, float]:
    """The multiclass metrics of checked class codes and probabilities (see
    :func:`evaluate_scores`). ROC AUC is the macro average of one-vs-rest over the classes
    the labels hold (a class absent from them has no AUC)."""
    from sklearn import metrics

    n_classes = probabilities.shape[1]
    names = list(classes) if classes is not None else list(range(n_classes))
    everyone = list(range(n_classes))
    predicted = probabilities.argmax(axis=1)
    present = [k for k in everyone if (codes == k).any() and (codes != k).any()]
    results: dict[str, float] = {
        "roc_auc": float(
            np.mean([metrics.roc_auc_score(codes == k, probabilities[:, k]) for k in present])
        )
        if present
        else float("nan"),
        "accuracy": metrics.accuracy_score(codes, predicted),
        "f1_macro": metrics.f1_score(
            codes, predicted, labels=everyone, average="macro", zero_division=0
        ),
        "f1_weighted": metrics.f1_score(
            codes, predicted, labels=everyone, average="weighted", zero_division=0
        ),
        "precision_macro": metrics.precision_score(
            codes, predicted, labels=everyone, average="macro", zero_division=0
        ),
        "recall_macro": metrics.recall_score(
            codes, predicted, labels=everyone, average="macro", zero_division=0
        ),
        # With two classes every label is among the top two.
        "top2_accuracy": metrics.top_k_accuracy_score(codes, probabilities, k=2, labels=everyone)
        if n_classes > 2
        else 1.0,
        "log_loss": metrics.log_loss(codes, probabilities, labels=everyone),
    }
    precision = metrics.precision_score(
        codes, predicted, labels=everyone, average=None, zero_division=0
    )
    recall = metrics.recall_score(codes, predicted, labels=everyone, average=None, zero_division=0)
    for position, name in enumerate(names):
        key = metric_safe(str(name))
        results[f"precision_{key}"] = precision[position]
        results[f"recall_{key}"] = recall[position]
    return {name: float(value) for name, value in results.items()}


def metric_safe(text: str) -> str:
    """``text`` with the characters MLflow refuses in a metric name replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in text)[:100]


def checked_multiclass(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class codes as int64 and class probabilities as float64 ``(n, classes)``.

    Raises:
        DataError: empty or mismatched arrays, codes outside the classes, or scores that
            are not probability rows.
    """
    probabilities = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(y_true, dtype=np.float64).reshape(-1)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise DataError(
            f"multiclass scores must be a (rows, classes) matrix, got shape {probabilities.shape}"
        )
    if len(truth) == 0:
        raise DataError("no rows to evaluate on")
    if len(truth) != len(probabilities):
        raise DataError(f"{len(truth)} labels but {len(probabilities)} predictions")
    if not np.isfinite(probabilities).all():
        raise DataError("some predicted probabilities are missing or infinite")
    n_classes = probabilities.shape[1]
    if not (np.isfinite(truth).all() and np.isin(truth, np.arange(n_classes)).all()):
        raise DataError(f"multiclass labels must be class codes 0..{n_classes - 1}")
    if probabilities.min() < 0.0 or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
        raise DataError("multiclass scores must be probabilities summing to 1 per row")
    return truth.astype(np.int64), probabilities


def plot_evaluation(
    task: str,
    y_true: np.ndarray,
    scores: np.ndarray,
    out_dir: Path,
    *,
    threshold: float = 0.5,
    classes: Sequence[Any] | None = None,
) -> list[Path]:
    """Draw the task's evaluation plots into ``out_dir``.

    Binary: ``roc.png``, ``precision_recall.png``, ``confusion_matrix.png`` (counts
    annotated). Multiclass: ``confusion_matrix.png`` (counts, classes named by
    ``classes``). Regression: ``residuals.png``, ``predicted_vs_actual.png``.

    Returns:
        The written files, in that order.

    Raises:
        DataError: as :func:`evaluate_scores`.
    """
    out = Path(out_dir)
    if task == "multiclass":
        codes, probabilities = checked_multiclass(y_true, scores)
        names = list(classes) if classes is not None else list(range(probabilities.shape[1]))
        figure = confusion_figure(codes, probabilities.argmax(axis=1), names, "Confusion matrix")
        return [save_figure(figure, out / "confusion_matrix.png")]
    truth, predicted = _checked(y_true, scores)
    if task == "binary":
        _check_binary(truth, predicted)
        figures = [
            ("roc.png", _roc_figure(truth, predicted)),
            ("precision_recall.png", _precision_recall_figure(truth, predicted)),
            (
                "confusion_matrix.png",
                confusion_figure(
                    truth.astype(np.int64),
                    (predicted >= threshold).astype(np.int64),
                    [0, 1],
                    f"Confusion matrix (threshold {threshold:g})",
                ),
            ),
        ]
    elif task == "regression":
        sample = _scatter_sample(len(truth))
        figures = [
            ("residuals.png", _residuals_figure(truth[sample], predicted[sample])),
            (
                "predicted_vs_actual.png",
                _predicted_vs_actual_figure(truth[sample], predicted[sample]),
            ),
        ]
    else:
        raise ValueError(f"task must be one of {sorted(METRIC_DIRECTIONS)}, got {task!r}")
    return [save_figure(figure, out / name) for name, figure in figures]


def plot_history(history: Sequence[dict[str, Any]], out_path: Path) -> Path:
    """Plot training and validation loss per epoch, with the best epoch marked (the one
    with the lowest validation loss).

    Args:
        history: the rows of :attr:`~.training.TrainResult.history`.
        out_path: the PNG to write.

    Returns:
        ``out_path``.
    """
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("cannot plot an empty training history")
    epochs = [int(row["epoch"]) for row in history]
    val_losses = [float(row["val_loss"]) for row in history]
    best_epoch = epochs[int(np.argmin(val_losses))]
    figure, axes = new_figure()
    axes.plot(
        epochs, [float(row["train_loss"]) for row in history], marker="o", label="training loss"
    )
    axes.plot(epochs, val_losses, marker="o", label="validation loss")
    axes.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    axes.set(xlabel="epoch", ylabel="loss", title="Training history")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return save_figure(figure, Path(out_path))


def plot_score_histogram(
    edges: Sequence[float], counts: Sequence[int], out_path: Path, *, title: str
) -> Path:
    """Plot a batch's score distribution from its histogram (bin edges and counts).

    Args:
        edges: the ``n + 1`` bin edges.
        counts: the ``n`` bin counts.
        out_path: the PNG to write.
        title: the figure's title (the model and the batch).

    Returns:
        ``out_path``.
    """
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{len(edges)} edges do not bound {len(counts)} bins")
    edge_values = np.asarray(edges, dtype=np.float64)
    figure, axes = new_figure()
    axes.bar(
        edge_values[:-1],
        np.asarray(counts, dtype=np.int64),
        width=np.diff(edge_values),
        align="edge",
        edgecolor="white",
    )
    axes.set(xlabel="score", ylabel="rows", title=title)
    return save_figure(figure, Path(out_path))


# ---------------------------------------------------------------------------------------
# Checks


def _checked(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(y_true, dtype=np.float64).reshape(-1)
    predicted = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(truth) == 0:
        raise DataError("no rows to evaluate on")
    if len(truth) != len(predicted):
        raise DataError(f"{len(truth)} labels but {len(predicted)} predictions")
    for name, values in (("labels", truth), ("predictions", predicted)):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise DataError(f"{bad} {name} are missing or infinite")
    return truth, predicted


def _check_binary(truth: np.ndarray, predicted: np.ndarray) -> None:
    if not np.isin(truth, (0.0, 1.0)).all():
        raise DataError("binary labels must be 0 or 1")
    if predicted.min() < 0.0 or predicted.max() > 1.0:
        raise DataError(
            f"binary scores must be probabilities in [0, 1], got values from {predicted.min():.4g} "
            f"to {predicted.max():.4g} (pass decoded outputs, not logits)"
        )
    if len(np.unique(truth)) < 2:
        only = int(truth[0])
        raise DataError(
            f"the evaluation labels are all {only}: ROC AUC and the other ranking metrics need both classes",
            ["use a larger or stratified test split, or evaluate on data that holds both classes"],
        )


# ---------------------------------------------------------------------------------------
# Figures


def new_figure() -> tuple[Figure, Any]:
    """A figure of the standard size with one axes, on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas is not registered with pyplot: nothing global to
    # close, and safe in a worker thread.
    figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_figure(figure: Figure, path: Path) -> Path:
    """Write the figure as a PNG, atomically, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomically(path, buffer.getvalue())


def _roc_figure(truth: np.ndarray, predicted: np.ndarray) -> Figure:
    from sklearn.metrics import roc_auc_score, roc_curve

    false_positive_rate, true_positive_rate, _ = roc_curve(truth, predicted)
    figure, axes = new_figure()
    axes.plot(
        false_positive_rate,
        true_positive_rate,
        label=f"model (AUC {roc_auc_score(truth, predicted):.3f})",
    )
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
    axes.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC curve",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower right")
    return figure


def _precision_recall_figure(truth: np.ndarray, predicted: np.ndarray) -> Figure:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(truth, predicted)
    figure, axes = new_figure()
    axes.step(
        recall,
        precision,
        where="post",
        label=f"model (AP {average_precision_score(truth, predicted):.3f})",
    )
    axes.axhline(
        truth.mean(), color="grey", linestyle="--", label=f"prevalence ({truth.mean():.3f})"
    )
    axes.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall curve",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower left")
    return figure


def confusion_figure(
    truth: np.ndarray, predicted: np.ndarray, names: Sequence[Any], title: str
) -> Figure:
    """Counts of actual (rows) against predicted (columns) class codes, annotated."""
    from sklearn.metrics import confusion_matrix

    size = len(names)
    counts = confusion_matrix(truth, predicted, labels=list(range(size)))
    figure, axes = new_figure()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    # Beyond a dozen classes the numbers would overlap; the colours still tell.
    annotate = range(size) if size <= 12 else range(0)
    for row in annotate:
        for column in range(size):
            # Dark cells get light text so the count stays readable.
            dark = counts[row, column] > counts.max() / 2
            axes.text(
                column,
                row,
                f"{counts[row, column]:,}",
                ha="center",
                va="center",
                color="white" if dark else "black",
            )
    labels = [str(name)[:16] for name in names]
    axes.set(
        xticks=list(range(size)),
        yticks=list(range(size)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="actual",
        title=title,
    )
    if size > 4:
        axes.tick_params(axis="x", labelrotation=45)
    return figure


def _scatter_sample(rows: int) -> np.ndarray:
    if rows <= MAX_SCATTER_POINTS:
        return np.arange(rows)
    return np.sort(
        np.random.default_rng(SCATTER_SEED).choice(rows, MAX_SCATTER_POINTS, replace=False)
    )


def _residuals_figure(truth: np.ndarray, predicted: np.ndarray) -> Figure:
    figure, axes = new_figure()
    axes.scatter(predicted, truth - predicted, s=4, alpha=0.4)
    axes.axhline(0.0, color="grey", linestyle="--")
    axes.set(xlabel="predicted", ylabel="actual - predicted", title="Residuals")
    return figure


def _predicted_vs_actual_figure(truth: np.ndarray, predicted: np.ndarray) -> Figure:
    figure, axes = new_figure()
    axes.scatter(truth, predicted, s=4, alpha=0.4)
    low, high = float(min(truth.min(), predicted.min())), float(max(truth.max(), predicted.max()))
    axes.plot([low, high], [low, high], color="grey", linestyle="--", label="perfect prediction")
    axes.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual")
    axes.legend(loc="upper left")
    return figure
