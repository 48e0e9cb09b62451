"""A multiclass pipeline end to end, as a new user would run it on their own table:
``stemma init`` on scikit-learn's wine table with the grape names as labels, then validate,
train, quantize, score, monitor, shadow, canary, lineage and a bit-identical reproduce.

Real parts only: git and DVC in the project, the session's SQLite MLflow store and Prefect
API, the flows as `stemma run` calls them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn import datasets

from stemma.flows.cli import main
from tests.support import git

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAME = "grapes"
CLASSES = ["barbera", "barolo", "grignolino"]
#: Enough epochs for the tiny table to separate its classes; a small resample count.
TRAIN = ["train.epochs=40", "train.learning_rate=0.01", "train.early_stopping=null"]
FAST = ["evaluate.bootstrap_resamples=200"]
DAY_ROWS = 300


def wine_table(folder: Path) -> Path:
    """Wine with an id column and the grape names as labels, as a CSV a user brings."""
    bunch = datasets.load_wine(as_frame=True)
    frame = bunch.frame.rename(columns=lambda column: column.replace("/", "_"))
    frame["target"] = frame["target"].map(dict(enumerate(["barolo", "grignolino", "barbera"])))
    frame.insert(0, "wine_id", range(1, len(frame) + 1))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "wine.csv"
    frame.to_csv(path, index=False)
    return path


def production_day(root: Path, day: int, source: pd.DataFrame) -> tuple[Path, Path]:
    """A day of production rows drawn from the training population (resampled, 2% noise on
    each numeric column), and their labels, under production/."""
    rng = np.random.default_rng(day)
    rows = source.sample(DAY_ROWS, replace=True, random_state=day).reset_index(drop=True)
    features = [column for column in rows.columns if column not in ("wine_id", "target")]
    for column in features:
        spread = float(source[column].std()) * 0.02
        rows[column] = rows[column].astype("float64") + rng.normal(0.0, spread, len(rows))
    rows["wine_id"] = np.arange(len(rows)) + 100_000 * day
    batches, labels = root / "production" / "batches", root / "production" / "labels"
    batches.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    batch = batches / f"day_{day:02d}.parquet"
    rows.drop(columns=["target"]).to_parquet(batch, index=False)
    rows[["wine_id", "target"]].to_parquet(labels / f"day_{day:02d}.parquet", index=False)
    return batch, labels


def test_a_multiclass_table_goes_through_the_whole_lifecycle(tmp_path, capsys):
    from stemma.flows.canary import canary_flow
    from stemma.flows.lineage import run_lineage
    from stemma.flows.monitor import monitor_flow
    from stemma.flows.quantize import quantize_flow
    from stemma.flows.reproduce import run_reproduce
    from stemma.flows.score import score_flow
    from stemma.flows.shadow import shadow_flow
    from stemma.flows.train import train_flow

    source = wine_table(tmp_path / "downloads")
    root = tmp_path / "project"
    assert main(["init", str(source), "--target", "target", "--id", "wine_id",
                 "--name", NAME, "--root", str(root)]) == 0  # fmt: skip
    config = root / "configs" / f"{NAME}.yaml"
    data = yaml.safe_load(config.read_text())["data"]
    assert data["task"] == "multiclass" and data["classes"] == CLASSES
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "Start the project")
    assert main(["validate", str(config)]) == 0
    capsys.readouterr()

    # train: the first version becomes champion, with a confusion matrix among its plots
    trained = train_flow(config=str(config), overrides=TRAIN)
    assert trained["gate"]["alias"] == "champion", trained["gate"]
    assert trained["metrics"]["accuracy"] >= 0.8
    client = __import__("mlflow").MlflowClient()
    plots = {item.path for item in client.list_artifacts(trained["run_id"], "plots")}
    assert "plots/confusion_matrix.png" in plots

    # quantize: parity judged on the multiclass metric of the gate
    quantized = quantize_flow(
        config=str(config),
        overrides=[
            "quantize.methods=[int8_dynamic]",
            "quantize.repeats=3",
            "quantize.min_speedup=0.01",
        ],
        model=f"models:/{NAME}/1",
    )
    assert quantized["metric"] == yaml.safe_load(config.read_text())["gate"]["metric"]
    assert np.isfinite(quantized["parent_value"])

    # score: the class, its probability and each class's probability
    table = pd.read_csv(source)
    day_1, labels = production_day(root, 1, table)
    day_2, _ = production_day(root, 2, table)
    scored = score_flow(config=str(config), input=str(day_1))
    parts = sorted(Path(scored["output"]).glob("*.parquet"))
    output = pd.concat([pq.read_table(part).to_pandas() for part in parts])
    assert len(output) == DAY_ROWS
    assert {f"probability_{name}" for name in CLASSES} <= set(output.columns)
    assert set(output["prediction"]) <= set(CLASSES)
    probabilities = output[[f"probability_{name}" for name in CLASSES]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    truth = pd.read_parquet(labels / "day_01.parquet").set_index("wine_id")["target"]
    accuracy = (output.set_index("wine_id")["prediction"] == truth).mean()
    assert accuracy >= 0.8

    # monitor: an unshifted day raises no drift
    monitored = monitor_flow(config=str(config), batch=str(day_1), labels=str(labels))
    assert monitored["drift_detected"] is False, monitored

    # a second version as challenger, then shadow and canary judge it on labelled days
    challenger = train_flow(
        config=str(config), overrides=[*TRAIN, "train.seed=8", "gate.margin_over_champion=-1"]
    )
    assert challenger["gate"]["alias"] == "challenger", challenger["gate"]
    shadow = shadow_flow(config=str(config), overrides=FAST, batch=str(day_1), labels=str(labels))
    assert shadow["decision"] in ("promote", "reject", "wait")
    assert shadow["compared_rows"] == DAY_ROWS and shadow["unknown_labels"] == 0
    comparison = shadow["comparison"]
    assert comparison["metric"] == trained["gate"]["metric"]
    assert np.isfinite(comparison["low"]) and comparison["low"] <= comparison["high"]
    canary = canary_flow(
        config=str(config),
        overrides=FAST,
        challenger=f"models:/{NAME}/2",
        batches=[str(day_1), str(day_2)],
        labels=str(labels),
    )
    assert canary["steps"], canary

    # lineage and a bit-identical rebuild of the first version
    text = run_lineage(f"models:/{NAME}/1", root)
    assert "data" in text and f"{NAME}" in text
    report = run_reproduce(f"models:/{NAME}/1", root)
    assert report.reproduced, report.render()
