"""Shadow margins and canary guards that fit the metric: relative to the champion's RMSE.

The models are linear regressions registered in a real MLflow store, scoring a progression
around 150 whose RMSE is about 40: an amount like 0.02 in the RMSE's units is noise there,
2% of it is not. The champion is fitted but off by a bias (6, about 0.15 of the RMSE's
40); the challenger is unbiased (better, an RMSE about 0.45 lower) or off by 8.5 (worse,
about 0.45 higher); ``way_off`` is off by a whole RMSE. With 6,000 rows each comparison is several standard errors from the limits
it is checked against, so the outcomes follow from the design, not from a seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.evaluation import canary_guards, canary_steps
from stemma.components.evaluation.rows import (
    build_shadow_rows,
    load_labels,
    read_batch_columns,
    read_scores,
)
from stemma.components.evaluation.shadow import PROMOTE, REJECT, WAIT, score_pair, shadow_evaluate
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import EvaluateSpec, FeaturesSpec
from tests.components.evaluation.test_shadow import register_linear_model
from tests.support import isolated_mlflow

MODEL = "progression"
ID = "patient"
TARGET = "progression"
FEATURES = FeaturesSpec(numeric=["x0", "x1"])
ROWS = 6_000
NOISE = 40.0
#: The target's spread: 50 per standard deviation of x0, and the noise.
TARGET_STD = float(np.hypot(50.0, NOISE))
#: Biases in the target's units, as (weight on x0, bias) in standard deviations of it.
BIAS = 6.0
MODELS = {
    "champion": (50.0 / TARGET_STD, BIAS / TARGET_STD),
    "better": (50.0 / TARGET_STD, 0.0),
    "worse": (50.0 / TARGET_STD, np.sqrt(2) * BIAS / TARGET_STD),
    "way_off": (50.0 / TARGET_STD, NOISE / TARGET_STD),
}


def progression_frame(rows: int, seed: int, first_id: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x0, x1 = rng.normal(size=rows), rng.normal(size=rows)
    return pd.DataFrame(
        {
            ID: np.arange(first_id, first_id + rows, dtype=np.int64),
            "x0": x0,
            "x1": x1,
            TARGET: 150.0 + 50.0 * x0 + rng.normal(0.0, NOISE, rows),
        }
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("limits-store")
    with isolated_mlflow():
        configure_tracking(root)
        experiment_id = ensure_experiment("limits", root)
        client = MlflowClient()
        # a large training table, so that the fitted target scale is the design's
        train = progression_frame(50_000, seed=1)
        versions = {
            kind: register_linear_model(
                client,
                experiment_id,
                root / kind,
                name=MODEL,
                weights=(weight,),
                bias=bias,
                frame=train,
                features=FEATURES,
                task="regression",
                target=TARGET,
            )
            for kind, (weight, bias) in MODELS.items()
        }
        batch = progression_frame(ROWS, seed=2, first_id=100_000)
        batch_path = root / "batches" / "day_01.parquet"
        batch_path.parent.mkdir()
        batch.drop(columns=[TARGET]).to_parquet(batch_path, index=False)
        labels_path = root / "labels.parquet"
        batch[[ID, TARGET]].to_parquet(labels_path, index=False)
        yield {
            "root": root,
            "batch_path": batch_path,
            "models": {
                kind: load_scoring_model(f"models:/{MODEL}/{version}")
                for kind, version in versions.items()
            },
            "labels": load_labels(labels_path, id_column=ID, target=TARGET, task="regression"),
        }


def evaluate(**changes) -> EvaluateSpec:
    return EvaluateSpec.model_validate({"bootstrap_resamples": 400, **changes})


# ---------------------------------------------------------------------------------------
# Shadow


@pytest.fixture(scope="module")
def shadow_rows(store, tmp_path_factory):
    """Both pairs' rows: the champion against the better challenger, and way_off against it."""
    models, out = store["models"], tmp_path_factory.mktemp("shadow")

    def rows(champion: str, challenger: str) -> pd.DataFrame:
        pair = score_pair(
            models[champion],
            models[challenger],
            [store["batch_path"]],
            out / f"{champion}-{challenger}",
            id_column=ID,
            chunk_rows=2_000,
        )
        return build_shadow_rows(
            read_batch_columns(pair.files, [ID]),
            read_scores(pair.served, ID),
            read_scores(pair.shadow, ID),
            id_column=ID,
            labels=store["labels"],
        )

    return {"better": rows("champion", "better"), "way_off": rows("way_off", "better")}


def shadow(store, rows, settings, champion="champion"):
    models = store["models"]
    return shadow_evaluate(
        rows,
        task="regression",
        metric="rmse",
        settings=settings,
        champion=models[champion],
        challenger=models["better"],
    )


@pytest.mark.parametrize(
    ("margin", "decision"),
    [(0.0, PROMOTE), ("0.25%", PROMOTE), ("2%", REJECT)],
    ids=["absolute-zero", "relative-small", "relative-large"],
)
def test_a_relative_shadow_margin_is_a_share_of_the_champions_rmse(
    store, shadow_rows, margin, decision
):
    report = shadow(store, shadow_rows["better"], evaluate(shadow={"margin": margin}))
    comparison = report.comparison
    assert comparison is not None and comparison.champion > 30  # an RMSE in the target's units
    assert report.decision == decision, report.reasons
    expected = float(margin.rstrip("%")) / 100 * comparison.champion if margin else 0.0
    assert report.settings["margin"] == pytest.approx(expected)
    assert report.settings["margin_spec"] == margin
    # the reason states the margin in the metric's units, and as the spec wrote it
    assert f"margin {expected:+.4f}" in report.reasons[1]
    if isinstance(margin, str):
        assert f"({margin})" in report.reasons[1]
    assert "of the champion's" in report.reasons[1]


def test_the_labelled_row_minimum_scales_with_the_batch(store, shadow_rows):
    rows = shadow_rows["better"]
    unlabelled = rows.assign(label=rows["label"].where(rows.index < 1_000))
    report = shadow(store, unlabelled, evaluate())
    # 20% of 6,000 rows: 1,000 labelled rows are not enough for this batch
    assert report.decision == WAIT
    assert "1,000 labelled rows so far" in report.reasons[0]
    assert "min_labelled_rows 1,200 (20% of the batch" in report.reasons[0]
    assert report.settings["min_labelled_rows"] == 1_200
    # a small batch, all labelled, is decided on its own evidence: it does not wait forever
    small = shadow(store, shadow_rows["way_off"].head(150), evaluate(), champion="way_off")
    assert small.settings["min_labelled_rows"] == 30
    assert small.decision == PROMOTE, small.reasons
    # a minimum in the spec is kept as it is
    kept = shadow(
        store,
        shadow_rows["way_off"].head(150),
        evaluate(shadow={"min_labelled_rows": 2000}),
        champion="way_off",
    )
    assert kept.decision == WAIT and "min_labelled_rows 2,000" in kept.reasons[0]
    assert "20% of the batch" not in kept.reasons[0]


# ---------------------------------------------------------------------------------------
# Canary


def canary_step(store, tmp_path, kind, *, fraction=1.0, **guards):
    models = store["models"]
    settings = evaluate(
        canary={"guards": {"min_rows": 50, "max_score_psi": 50.0, **guards}},
    )
    scores = canary_steps.score_step(
        models["champion"],
        models[kind],
        store["batch_path"],
        tmp_path / "step",
        fraction=fraction,
        salt=f"{MODEL}/v{models[kind].version}",
        id_column=ID,
        chunk_rows=2_000,
    )
    evaluation = canary_guards.evaluate_step(
        scores,
        labels=store["labels"],
        id_column=ID,
        task="regression",
        metric="rmse",
        settings=settings,
        control=models["champion"],
        challenger=models[kind],
        promoting=False,
    )
    return evaluation, next(g for g in evaluation.guards if g.name == "metric")


def test_a_slightly_worse_rmse_is_within_the_default_relative_guard(store, tmp_path):
    evaluation, guard = canary_step(store, tmp_path, "worse")
    comparison = evaluation.comparison
    assert comparison is not None
    # worse with confidence, but by far less than 2% of the champion's RMSE
    limit = 0.02 * comparison.champion
    assert -limit < comparison.improvement_high < 0
    assert guard.status == canary_guards.GUARD_OK and guard.limit == pytest.approx(-limit)
    assert f"limit 2% = {limit:.4f}: within it" in guard.detail
    assert "at best rmse rose" in guard.detail
    assert evaluation.decision == canary_guards.ADVANCE


def test_an_absolute_guard_keeps_its_meaning_in_the_metrics_units(store, tmp_path):
    evaluation, guard = canary_step(store, tmp_path, "worse", max_metric_drop=0.02)
    assert evaluation.comparison is not None
    assert evaluation.comparison.improvement_high < -0.02
    assert guard.status == canary_guards.GUARD_BREACH and guard.limit == -0.02
    assert "limit 0.02 = " in guard.detail and "beyond it" in guard.detail
    assert evaluation.decision == canary_guards.ROLLBACK


def test_a_small_arm_is_judged_on_the_labels_it_has(store, tmp_path):
    evaluation, guard = canary_step(store, tmp_path, "better", fraction=0.02)
    # about 120 rows in the arm: 20% of them (at least 30) labelled is enough
    assert 50 <= evaluation.arm_rows < 200
    assert evaluation.comparison is not None and evaluation.comparison.rows == evaluation.arm_rows
    assert guard.status == canary_guards.GUARD_OK
    evaluation, guard = canary_step(store, tmp_path, "better", fraction=0.02, min_labelled_rows=200)
    assert guard.status == canary_guards.GUARD_PENDING
    assert f"{evaluation.arm_rows:,} labelled rows" in guard.detail
    assert "guards.min_labelled_rows 200" in guard.detail
