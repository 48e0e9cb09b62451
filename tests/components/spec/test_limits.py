"""Metric limits in the metric's units or relative to a reference, and scaled row minimums."""

from __future__ import annotations

import math

import pytest

from stemma.components.spec import (
    CanaryGuardsSpec,
    MetricDrop,
    MonitorThresholdsSpec,
    QuantizeSpec,
    ShadowSpec,
    describe_drop,
    flatten,
    json_schema,
    load_spec,
    scaled_minimum,
)
from tests.components.spec.test_spec import VALID, make_project, problems_of

#: A regression pipeline on another table (scikit-learn's diabetes columns).
REGRESSION = (
    VALID.replace("target: approved", "target: progression\n  task: regression")
    .replace("numeric: [salary, age]", "numeric: [bmi, bp]")
    .replace("categorical: [car]", "categorical: []")
    .replace("column: salary", "column: bmi")
    .replace("metric: roc_auc\n  minimum: 0.5", "metric: rmse\n  maximum: 80.0")
)


@pytest.mark.parametrize(
    ("value", "amount", "relative", "written"),
    [
        ("0.005", 0.005, False, 0.005),
        ("2%", 2.0, True, "2%"),
        ("'2 %'", 2.0, True, "2%"),
        ("'0.5%'", 0.5, True, "0.5%"),
        ("1.3", 1.3, False, 1.3),
        ("'0.01'", 0.01, False, 0.01),
    ],
    ids=["absolute", "relative", "relative-spaced", "relative-fraction", "over-one", "quoted"],
)
def test_a_limit_is_read_as_a_number_or_a_percentage(tmp_path, value, amount, relative, written):
    text = VALID + f"quantize:\n  max_metric_drop: {value}\n"
    spec = load_spec(make_project(tmp_path, text)).spec
    assert spec.quantize is not None
    assert spec.quantize.max_metric_drop == MetricDrop(amount, relative=relative)
    # written back as the spec wrote it: MLflow params, the resolved spec, the Prefect form
    assert spec.model_dump(mode="json")["quantize"]["max_metric_drop"] == written
    assert flatten(spec)["quantize.max_metric_drop"] == str(written)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "quantize.max_metric_drop=2 %%",
            "quantize.max_metric_drop: must be a number in the metric's units (e.g. 0.005) or "
            "a percentage of the reference value (e.g. 2%), got '2 %%'",
        ),
        ("quantize.max_metric_drop=-1%", "quantize.max_metric_drop: must not be negative"),
        ("quantize.max_metric_drop=abc", "quantize.max_metric_drop: must be a number"),
        ("quantize.max_metric_drop=true", "quantize.max_metric_drop: must be a number"),
        ("quantize.max_metric_drop=.nan", "quantize.max_metric_drop: must be finite"),
        ("quantize.max_metric_drop=150%", "quantize.max_metric_drop: must be at most 100%"),
        ("monitor.thresholds.max_metric_drop=0%", "max_metric_drop: must be greater than 0"),
        (
            "evaluate.canary.guards.max_metric_drop=-0.01",
            "evaluate.canary.guards.max_metric_drop: must not be negative",
        ),
        ("evaluate.shadow.margin=-200%", "evaluate.shadow.margin: must be between -100%"),
    ],
    ids=["double-percent", "negative", "text", "boolean", "nan", "over-100", "monitor-zero",
         "canary-negative", "margin-bound"],
)  # fmt: skip
def test_a_bad_limit_is_a_clear_error_naming_the_field(tmp_path, override, expected):
    problems = problems_of(make_project(tmp_path), (override,))
    assert any(expected in problem for problem in problems), problems
    assert all("Traceback" not in problem for problem in problems)


def test_a_margin_may_be_negative_and_relative(tmp_path):
    loaded = load_spec(make_project(tmp_path), ("evaluate.shadow.margin=-1%",))
    assert loaded.spec.evaluate is not None
    margin = loaded.spec.evaluate.shadow.margin
    assert margin == MetricDrop(-1.0, relative=True)
    assert margin.limit(0.8) == pytest.approx(-0.008)


@pytest.mark.parametrize(
    ("drop", "reference", "limit", "described"),
    [
        (MetricDrop(2.0, relative=True), 65.1, 1.302, "2% = 1.3020"),
        (MetricDrop(0.005), 0.85, 0.005, "0.005 = 0.59%"),
        (MetricDrop(10.0, relative=True), -0.5, 0.05, "10% = 0.0500"),
        (MetricDrop(2.0, relative=True), 0.0, 0.0, "2% = 0.0000"),
        (MetricDrop(0.005), 0.0, 0.005, "0.005"),
    ],
    ids=["relative", "absolute", "negative-reference", "zero-reference", "absolute-of-zero"],
)
def test_a_limit_in_the_metrics_units_and_in_both_forms(drop, reference, limit, described):
    assert drop.limit(reference) == pytest.approx(limit)
    assert drop.describe(reference) == described


def test_a_relative_limit_of_an_undefined_reference_is_undefined():
    assert math.isnan(MetricDrop(2.0, relative=True).limit(math.nan))
    assert MetricDrop(0.02).limit(math.nan) == 0.02


def test_a_change_is_described_in_the_metrics_units_and_in_percent():
    assert describe_drop("rmse", 0.0136, 65.1, higher_is_better=False) == (
        "rmse rose 0.0136 (0.02%)"
    )
    assert describe_drop("roc_auc", 0.02, 0.8, higher_is_better=True) == (
        "roc_auc fell 0.0200 (2.50%)"
    )
    assert describe_drop("r2", 0.0, 0.0, higher_is_better=True) == "r2 did not change"


@pytest.mark.parametrize(
    ("section", "metric", "expected"),
    [
        (QuantizeSpec(), "rmse", MetricDrop(1.0, relative=True)),
        (QuantizeSpec(), "mae", MetricDrop(1.0, relative=True)),
        (QuantizeSpec(), "roc_auc", MetricDrop(0.005)),
        (QuantizeSpec(), "r2", MetricDrop(0.005)),
        (QuantizeSpec(max_metric_drop=0.005), "rmse", MetricDrop(0.005)),
        (MonitorThresholdsSpec(), "rmse", MetricDrop(5.0, relative=True)),
        (MonitorThresholdsSpec(), "accuracy", MetricDrop(0.05)),
        (CanaryGuardsSpec(), "mae", MetricDrop(2.0, relative=True)),
        (CanaryGuardsSpec(), "log_loss", MetricDrop(0.02)),
        (CanaryGuardsSpec(max_metric_drop="3%"), "roc_auc", MetricDrop(3.0, relative=True)),
    ],
    ids=["quantize-rmse", "quantize-mae", "quantize-auc", "quantize-r2", "quantize-set",
         "monitor-rmse", "monitor-accuracy", "canary-mae", "canary-log-loss", "canary-set"],
)  # fmt: skip
def test_defaults_are_relative_for_metrics_in_the_targets_units(section, metric, expected):
    assert section.metric_drop(metric) == expected


def test_a_regression_spec_with_default_limits_judges_an_rmse_relative(tmp_path):
    spec = load_spec(make_project(tmp_path, REGRESSION), ("quantize.enabled=true",)).spec
    assert spec.data.task == "regression" and spec.quantize is not None
    drop = spec.quantize.metric_drop(spec.gate.metric)
    # an RMSE of 65: bf16's rise of 0.0136 is well within the default limit
    assert 0.0136 <= drop.limit(65.1) == pytest.approx(0.651)


def test_the_schema_offers_a_number_or_a_percentage():
    schema = json_schema()["$defs"]["QuantizeSpec"]["properties"]["max_metric_drop"]
    kinds = {option.get("type") for option in schema["anyOf"]}
    assert kinds == {"number", "string", "null"}
    assert "target's units" in schema["description"]
    margin = json_schema()["$defs"]["ShadowSpec"]["properties"]["margin"]
    assert margin["default"] == 0.0


@pytest.mark.parametrize(
    ("rows", "cap", "needed"),
    [(10, 2000, 30), (100, 2000, 30), (150, 2000, 30), (1000, 2000, 200), (9_999, 2000, 2000),
     (1_000_000, 2000, 2000), (600, 200, 120), (0, 200, 30)],
    ids=["tiny", "small", "floor", "share", "near-cap", "cap", "canary-cap", "empty"],
)  # fmt: skip
def test_the_labelled_row_minimum_scales_with_the_batch(rows, cap, needed):
    assert scaled_minimum(rows, cap) == needed


def test_a_set_labelled_row_minimum_is_kept_whatever_the_batch():
    assert ShadowSpec().labelled_rows_needed(500) == 100
    assert ShadowSpec().labelled_rows_needed(50_000) == 2000
    assert ShadowSpec(min_labelled_rows=2000).labelled_rows_needed(500) == 2000
    assert CanaryGuardsSpec().labelled_rows_needed(600) == 120
    assert CanaryGuardsSpec(min_labelled_rows=50).labelled_rows_needed(10_000) == 50
