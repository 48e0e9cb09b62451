"""Quantizing a regression model: the drop's limit is relative to the fp32 model's RMSE.

An RMSE is in the target's units (here scikit-learn's diabetes progression, around 150):
the default limit is 1% of the parent's RMSE, and an absolute limit in the spec still
means what it says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import dvc_add

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "diabetes-quant"
SPEC = f"""\
pipeline: {{name: {NAME}, model_name: {NAME}}}
data:
  path: data/diabetes/train.parquet
  task: regression
  target: progression
  id: patient
  features: {{numeric: [age, sex, bmi, bp, s1, s2, s3, s4, s5, s6]}}
model: {{hidden: [16]}}
train: {{epochs: 30, batch_size: 64, early_stopping: null, learning_rate: 0.01}}
gate: {{metric: rmse}}
quantize:
  methods: [bf16, int8_weight_only]
  min_speedup: 0.01
  repeats: 3
  warmup: 1
"""


@pytest.fixture(scope="module")
def diabetes(template_project, tmp_path_factory) -> Path:
    """A project whose regression model (diabetes progression) passed its gate."""
    from sklearn.datasets import load_diabetes

    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("quantize-regression") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    frame = load_diabetes(as_frame=True, scaled=False).frame.rename(
        columns={"target": "progression"}
    )
    frame.insert(0, "patient", range(len(frame)))
    (root / "data" / "diabetes").mkdir()
    frame.to_parquet(root / "data" / "diabetes" / "train.parquet", index=False)
    dvc_add(root)
    (root / "configs" / "diabetes.yaml").write_text(SPEC)
    train_flow(config=str(root / "configs" / "diabetes.yaml"))
    return root


def quantize(root: Path, *overrides: str) -> dict:
    from stemma.flows.quantize import quantize_flow

    return quantize_flow(
        config=str(root / "configs" / "diabetes.yaml"), overrides=[*overrides], model=None
    )


def test_a_regression_variant_is_judged_against_a_share_of_the_parents_rmse(diabetes):
    from stemma.flows.cli import format_quantize_summary

    summary = quantize(diabetes)
    assert summary["metric"] == "rmse"
    parent = summary["parent_value"]
    assert parent > 10  # in the target's units: an absolute 0.005 would mean nothing here
    limit = 0.01 * parent
    assert summary["max_metric_drop"] == pytest.approx(limit)
    assert summary["metric_drop_limit"] == f"1% = {limit:.4f}"
    measured = [v for v in summary["variants"] if v["metric_drop"] is not None]
    assert measured
    for variant in measured:
        # the gate passes exactly the variants within 1% of the parent's RMSE
        assert (variant["status"] == "passed") is (variant["metric_drop"] <= limit)
        reason = variant["reasons"][0]
        assert reason.startswith("rmse rose" if variant["metric_drop"] > 0 else "rmse ")
        assert f"limit 1% = {limit:.4f}" in reason
    # bf16 moves a prediction of ~150 by well under 1%: its RMSE stays within the limit
    bf16 = next(v for v in summary["variants"] if v["method"] == "bf16")
    assert bf16["status"] == "passed", bf16["reasons"]
    assert f"rmse drop <= 1% = {limit:.4f}" in format_quantize_summary(summary)


def test_an_absolute_limit_in_the_spec_keeps_its_meaning(diabetes):
    summary = quantize(diabetes, "quantize.max_metric_drop=0.0", "quantize.methods=[bf16]")
    (bf16,) = summary["variants"]
    assert summary["max_metric_drop"] == 0.0
    assert (bf16["status"] == "passed") is (bf16["metric_drop"] <= 0.0)
    assert "limit 0: " in bf16["reasons"][0]
