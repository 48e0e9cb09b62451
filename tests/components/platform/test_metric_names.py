"""Metric names: sections, and reading runs an older Stemma logged with flat names."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from stemma.components.platform import metric_names
from stemma.components.platform.tracking import ensure_experiment


def test_a_section_prefixes_every_name():
    assert metric_names.in_section(metric_names.SHADOW, {"agreement": 0.98, "rows": 10}) == {
        "shadow/agreement": 0.98,
        "shadow/rows": 10,
    }
    assert metric_names.metric_name(metric_names.TEST, "roc_auc") == "test/roc_auc"


@pytest.mark.parametrize(
    ("name", "flat"),
    [
        ("test/roc_auc", "test_roc_auc"),
        ("train/loss", "train_loss"),
        ("val/loss", "val_loss"),
        ("train/epoch_seconds", "seconds"),
        ("train/best_epoch", "best_epoch"),
        ("data/checks_failed", "checks_failed"),
        ("gate/passed", "gate_passed"),
        ("quantize/bf16.speedup", "quantize.bf16.speedup"),
        ("shadow/agreement", "agreement"),
        ("canary/fraction", "fraction"),
        ("drift/detected", "drift_detected"),
        ("drift/feature.age.psi", "feature.age.psi"),
        ("score/seconds", "seconds"),
        ("retrain/new_rows", "new_rows"),
        ("epoch", None),
    ],
    ids=lambda value: str(value),
)
def test_each_sectioned_name_knows_the_flat_name_an_older_stemma_logged(name, flat):
    assert metric_names.flat_name(name) == flat


def test_a_run_an_older_stemma_logged_is_read_by_the_sectioned_names(tracking, tmp_path):
    client = MlflowClient()
    experiment = ensure_experiment("credit", tmp_path)
    older = client.create_run(experiment).info.run_id
    for name, value in {"test_roc_auc": 0.91, "best_epoch": 4, "train_loss": 0.3}.items():
        client.log_metric(older, name, value)
    newer = client.create_run(experiment).info.run_id
    client.log_metric(newer, "test/roc_auc", 0.93)
    client.log_metric(newer, "test_roc_auc", 0.5)  # the sectioned name wins

    logged = client.get_run(older).data.metrics
    assert metric_names.read_metric(logged, "test/roc_auc") == 0.91
    assert metric_names.read_metric(logged, metric_names.TRAIN_BEST_EPOCH) == 4.0
    assert metric_names.read_metric(logged, "test/f1") is None
    assert metric_names.sectioned_metrics(logged) == {
        "test/roc_auc": 0.91,
        "train/best_epoch": 4.0,
        "train/loss": 0.3,
    }
    assert metric_names.read_metric(client.get_run(newer).data.metrics, "test/roc_auc") == 0.93


def test_key_metrics_rank_decisions_first_whichever_names_a_run_has():
    names = [
        "train/loss",
        "shadow/challenger_error_rate",
        "val/loss",
        "gate/passed",
        "shadow/agreement",
        "test/roc_auc",
        "drift/feature.age.psi",
        "drift/detected",
    ]
    assert sorted(names, key=metric_names.metric_rank) == [
        "test/roc_auc",
        "gate/passed",
        "shadow/agreement",
        "drift/detected",
        "val/loss",
        "drift/feature.age.psi",
        "shadow/challenger_error_rate",
        "train/loss",
    ]
    # an older run's flat names rank as their sectioned names
    flat = ["train_loss", "val_loss", "gate_passed", "test_f1", "drift_detected"]
    assert sorted(flat, key=metric_names.metric_rank) == [
        "test_f1",
        "gate_passed",
        "drift_detected",
        "val_loss",
        "train_loss",
    ]
