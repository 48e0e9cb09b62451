"""The batch-scoring flow with a multiclass champion trained by the train flow on sklearn's
wine: each row's class, its probability and every class's, and what the run records."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.flows.cli.summaries import format_score_summary
from tests.components.scoring.test_scoring import folder_bytes, read_parts
from tests.support import build_multiclass_project

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

#: Each module's models have names of their own in the session's MLflow store.
TEXT = ["pipeline.name=mcscore", "pipeline.model_name=mcscore"]
INTEGER = ["pipeline.name=mcscore-int", "pipeline.model_name=mcscore-int"]


def trained(root: Path, names: list[str], *, text_classes: bool) -> Path:
    from stemma.flows.train import train_flow

    build_multiclass_project(root, text_classes=text_classes)
    train_flow(config=str(root / "configs" / "wine.yaml"), overrides=names)
    return root


@pytest.fixture(scope="module")
def text_project(tmp_path_factory) -> Path:
    """Wine with its cultivars named; the model `mcscore` has a champion."""
    return trained(tmp_path_factory.mktemp("mc-text") / "project", TEXT, text_classes=True)


@pytest.fixture(scope="module")
def integer_project(tmp_path_factory) -> Path:
    """Wine with its cultivars 0, 1, 2; the model `mcscore-int` has a champion."""
    return trained(tmp_path_factory.mktemp("mc-int") / "project", INTEGER, text_classes=False)


def run_score(project: Path, names: list[str], *overrides: str, **parameters) -> dict:
    from stemma.flows.score import score_flow

    return score_flow(
        config=str(project / "configs" / "wine.yaml"),
        overrides=[*names, "score.chunk_rows=40", *overrides],
        **parameters,
    )


def batches(project: Path) -> pd.DataFrame:
    days = sorted((project / "data/wine/batches").glob("*.parquet"))
    return pd.concat([pd.read_parquet(path) for path in days], ignore_index=True)


def test_the_champion_scores_each_class_and_the_run_counts_the_predictions(text_project, tmp_path):
    summary = run_score(text_project, TEXT)
    output = Path(summary["output"])
    inputs = batches(text_project)

    scored = read_parts(output)
    classes = ["barbera", "barolo", "grignolino"]  # inferred from the training split, sorted
    probabilities = [f"probability_{name}" for name in classes]
    assert list(scored.columns) == ["wine_id", "prediction", "score", *probabilities]
    assert summary["rows"] == {"input": len(inputs), "scored": len(inputs), "rejected": 0}
    assert pq.read_schema(next(output.glob("part-*.parquet"))).field("prediction").type == (
        pa.string()
    )

    # the numbers of the registered model loaded the standard way, row by row
    champion = mlflow.pyfunc.load_model("models:/mcscore@champion")
    expected = champion.predict(inputs).assign(wine_id=inputs["wine_id"].to_numpy())
    merged = expected.merge(scored, on="wine_id", suffixes=("_pyfunc", ""))
    assert len(merged) == len(inputs)
    for column in ["score", *probabilities]:
        np.testing.assert_allclose(
            merged[column], merged[f"{column}_pyfunc"], rtol=1e-5, atol=1e-7, err_msg=column
        )
    assert (merged["prediction"] == merged["prediction_pyfunc"]).all()
    # a trained model tells the cultivars apart: every class is predicted
    counts = scored["prediction"].value_counts()
    assert set(counts.index) == set(classes)

    # the run counts the rows per predicted class, in MLflow and in the summary
    per_class = [{"class": name, "rows": int(counts[name])} for name in classes]
    assert summary["prediction_counts"] == per_class
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    for name in classes:
        assert run.data.metrics[f"score/rows_predicted.{name}"] == counts[name]
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    )
    logged = json.loads((artifacts / "scores/predictions.json").read_text())
    assert logged == {"predictions": per_class}
    distribution = json.loads((artifacts / "scores/distribution.json").read_text())
    assert sum(distribution["counts"]) == len(inputs)
    assert distribution["edges"][0] == 0.0 and distribution["edges"][-1] == 1.0
    assert (artifacts / "scores/histogram.png").is_file()
    printed = format_score_summary(summary)
    assert (
        "rows per predicted class: " + ", ".join(f"{name} {counts[name]}" for name in classes)
        in printed
    )

    # scoring again finds the finished output and leaves it alone
    again = run_score(text_project, TEXT)
    assert again["already_complete"] and again["output_digest"] == summary["output_digest"]
    assert again["prediction_counts"] == per_class


def test_integer_classes_score_alike_on_one_process_and_on_dask(integer_project):
    # one worker process of two threads: the ranges still run apart, at half the start-up
    dask = ["score.runner=dask", "score.dask.workers=1", "score.dask.threads_per_worker=2"]
    local = run_score(integer_project, INTEGER, output=str(integer_project / "local"))
    fanned = run_score(integer_project, INTEGER, *dask, output=str(integer_project / "dask"))

    assert folder_bytes(integer_project / "dask") == folder_bytes(integer_project / "local")
    assert fanned["output_digest"] == local["output_digest"]
    scored = read_parts(integer_project / "dask")
    assert scored["prediction"].dtype == np.int64
    assert set(scored["prediction"]) <= {0, 1, 2}
    assert list(scored.columns[-3:]) == ["probability_0", "probability_1", "probability_2"]
    counts = scored["prediction"].value_counts()
    assert fanned["prediction_counts"] == [
        {"class": name, "rows": int(counts.get(name, 0))} for name in (0, 1, 2)
    ]
    run = mlflow.MlflowClient().get_run(fanned["run_id"])
    assert run.data.metrics["score/rows_predicted.1"] == counts.get(1, 0)
