"""Evaluation metrics against hand-computed values, refusals, and the plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from stemma.components.errors import DataError
from stemma.components.spec import METRIC_DIRECTIONS
from stemma.components.training.metrics import evaluate_scores, plot_evaluation, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def test_binary_metrics_match_hand_computed_values() -> None:
    metrics = evaluate_scores("binary", LABELS, SCORES)

    assert list(metrics) == list(METRIC_DIRECTIONS["binary"])
    assert all(type(value) is float for value in metrics.values())
    expected = {
        "roc_auc": 0.75,  # 3 of the 4 positive-negative pairs are ranked correctly
        "pr_auc": 0.5 * 1.0 + 0.5 * 2 / 3,  # precision 1 at recall 0.5, 2/3 at recall 1
        "accuracy": 0.75,  # predicted 0, 0, 0, 1
        "precision": 1.0,
        "recall": 0.5,
        "f1": 2 / 3,
        "log_loss": -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4,
        "brier": (0.1**2 + 0.4**2 + 0.65**2 + 0.2**2) / 4,
    }
    assert metrics == pytest.approx(expected)


def test_the_threshold_moves_the_decision_metrics_only() -> None:
    default = evaluate_scores("binary", LABELS, SCORES)
    lower = evaluate_scores("binary", LABELS, SCORES, threshold=0.3)

    # predicted 0, 1, 1, 1
    assert (lower["accuracy"], lower["precision"], lower["recall"]) == pytest.approx(
        (0.75, 2 / 3, 1.0)
    )
    for name in ("roc_auc", "pr_auc", "log_loss", "brier"):
        assert lower[name] == default[name]


def test_no_positive_prediction_gives_zero_precision_not_an_error() -> None:
    metrics = evaluate_scores("binary", LABELS, np.array([0.1, 0.2, 0.3, 0.4]))
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == (0.0, 0.0, 0.0)


def test_regression_metrics_match_hand_computed_values() -> None:
    metrics = evaluate_scores(
        "regression", np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0])
    )

    assert list(metrics) == list(METRIC_DIRECTIONS["regression"])
    # errors 0, 0, 0, 2; the labels' sum of squares around their mean is 5
    assert metrics == pytest.approx({"rmse": 1.0, "mae": 0.5, "r2": 1 - 4 / 5})


@pytest.mark.parametrize(
    ("task", "y_true", "scores", "message"),
    [
        ("binary", [1, 1, 1], [0.2, 0.5, 0.9], "the evaluation labels are all 1: ROC AUC"),
        ("binary", [0, 1, 1], [-2.0, 0.5, 3.0], r"must be probabilities in \[0, 1\].*not logits"),
        ("binary", [0, 1, 2], [0.1, 0.5, 0.9], "binary labels must be 0 or 1"),
        ("binary", [0, 1], [0.1, 0.5, 0.9], "2 labels but 3 predictions"),
        ("binary", [0, 1, 1], [0.1, np.nan, 0.9], "1 predictions are missing or infinite"),
        ("binary", [], [], "no rows to evaluate on"),
        ("regression", [1.0], [1.5], "need at least two rows"),
    ],
    ids=[
        "single-class",
        "logits",
        "labels-not-binary",
        "length-mismatch",
        "nan-score",
        "empty",
        "one-row",
    ],
)
def test_unusable_inputs_are_data_errors(
    task: str, y_true: list, scores: list, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        evaluate_scores(task, np.array(y_true), np.array(scores))


def _assert_pngs(paths: list[Path], names: list[str]) -> None:
    assert [path.name for path in paths] == names
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(names), (
        "no temporary files left behind"
    )


def test_binary_plots_are_written(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)

    paths = plot_evaluation("binary", labels, scores, tmp_path / "plots", threshold=0.6)

    _assert_pngs(paths, ["roc.png", "precision_recall.png", "confusion_matrix.png"])
    assert plt.get_fignums() == [], "no figure may stay open in pyplot"


def test_regression_plots_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    actual = rng.standard_normal(500)

    paths = plot_evaluation("regression", actual, actual + 0.1 * rng.standard_normal(500), tmp_path)

    _assert_pngs(paths, ["residuals.png", "predicted_vs_actual.png"])


def test_plots_refuse_what_the_metrics_refuse(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="the evaluation labels are all 0"):
        plot_evaluation("binary", np.zeros(5), np.full(5, 0.2), tmp_path)


def test_history_plot_is_written(tmp_path: Path) -> None:
    history = [
        {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "val_loss": loss,
            "seconds": 0.1,
            "samples_per_second": 10.0,
        }
        for epoch, loss in enumerate([0.9, 0.7, 0.75, 0.8], start=1)
    ]

    path = plot_history(history, tmp_path / "nested" / "history.png")

    assert path == tmp_path / "nested" / "history.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="empty training history"):
        plot_history([], tmp_path / "empty.png")


# Multiclass: three classes, the third missing from the predictions' argmax once.
CODES = np.array([0, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],  # 0: right
        [0.1, 0.6, 0.3],  # 1: right
        [0.2, 0.3, 0.5],  # 2: right
        [0.1, 0.5, 0.4],  # 2: predicted 1, class 2 second
    ]
)


def test_multiclass_metrics_match_hand_computed_values() -> None:
    metrics = evaluate_scores("multiclass", CODES, PROBABILITIES, classes=["a", "b", "c"])

    assert set(METRIC_DIRECTIONS["multiclass"]) <= set(metrics)
    expected = {
        "accuracy": 0.75,
        "top2_accuracy": 1.0,
        # per class (precision, recall): a (1, 1), b (1/2, 1), c (1, 1/2)
        "precision_macro": (1 + 0.5 + 1) / 3,
        "recall_macro": (1 + 1 + 0.5) / 3,
        "f1_macro": (1 + 2 / 3 + 2 / 3) / 3,
        "f1_weighted": (1 * 1 + 1 * 2 / 3 + 2 * 2 / 3) / 4,
        "log_loss": -(math.log(0.7) + math.log(0.6) + math.log(0.5) + math.log(0.4)) / 4,
        "precision_b": 0.5,
        "recall_c": 0.5,
    }
    assert {key: metrics[key] for key in expected} == pytest.approx(expected)
    # one-vs-rest: a and b rank perfectly; c's positives 0.5 and 0.4 against 0.1 and 0.3
    assert metrics["roc_auc"] == pytest.approx((1.0 + 1.0 + 1.0) / 3)


def test_multiclass_scores_must_be_probability_rows() -> None:
    with pytest.raises(DataError, match="summing to 1"):
        evaluate_scores("multiclass", CODES, PROBABILITIES * 2)
    with pytest.raises(DataError, match=r"\(rows, classes\) matrix"):
        evaluate_scores("multiclass", CODES, PROBABILITIES[:, 0])
    with pytest.raises(DataError, match=r"class codes 0\.\.2"):
        evaluate_scores("multiclass", np.array([0, 1, 2, 3]), PROBABILITIES)


def test_the_multiclass_confusion_matrix_is_drawn(tmp_path: Path) -> None:
    (path,) = plot_evaluation("multiclass", CODES, PROBABILITIES, tmp_path, classes=["a", "b", "c"])
    assert path.name == "confusion_matrix.png"
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_a_two_class_multiclass_model_has_every_metric() -> None:
    codes = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    metrics = evaluate_scores("multiclass", codes, probabilities)
    assert set(METRIC_DIRECTIONS["multiclass"]) <= set(metrics)
    assert metrics["top2_accuracy"] == 1.0 and metrics["accuracy"] == 0.75
