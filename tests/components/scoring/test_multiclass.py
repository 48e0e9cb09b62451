"""Batch scoring of multiclass models: the predicted class, its probability and every
class's probability per row, as the registered pyfunc model answers (real MLflow)."""

from __future__ import annotations

import json
import pickle

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from sklearn import datasets

from stemma.components.errors import DataError
from stemma.components.platform.tags import WEIGHTS_SHA256 as WEIGHTS_TAG
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.scoring.engine import (
    SUCCESS_FILE,
    finish_scoring,
    input_files,
    load_scoring_model,
    plan_ranges,
    plan_scoring,
    score_files,
)
from stemma.components.scoring.job import score_range
from stemma.components.spec import FeaturesSpec
from tests.components.scoring.test_scoring import folder_bytes, read_parts, write_parquet
from tests.support import isolated_mlflow, log_trained_model

ID = "row_id"
#: Integer classes that are not their own positions, so a class is never mistaken for its index.
INT_CLASSES = (3, 7, 11)


def iris_frame() -> pd.DataFrame:
    """sklearn's iris with its species as text: 150 rows, 4 numeric features, 3 classes."""
    iris = datasets.load_iris(as_frame=True)
    frame = iris.frame.rename(columns=lambda name: name.replace(" (cm)", "").replace(" ", "_"))
    frame["species"] = frame.pop("target").map(dict(enumerate(iris.target_names)))
    frame.insert(0, ID, np.arange(len(frame), dtype=np.int64))
    return frame


def generated_frame(rows: int = 600, seed: int = 5) -> pd.DataFrame:
    """Seeded rows with a numeric and a categorical feature and integer classes."""
    rng = np.random.default_rng(seed)
    size = rng.normal(0.0, 1.0, rows)
    return pd.DataFrame(
        {
            ID: np.arange(rows, dtype=np.int64),
            "size": size,
            "weight": rng.uniform(1.0, 50.0, rows),
            "shade": rng.choice(["amber", "ruby", "straw"], rows),
            "grade": np.asarray(INT_CLASSES)[np.digitize(size, [-0.5, 0.5])],
        }
    )


CASES = {
    "text-classes": (
        iris_frame,
        FeaturesSpec(numeric=["sepal_length", "sepal_width", "petal_length", "petal_width"]),
        "species",
    ),
    "int-classes": (
        generated_frame,
        FeaturesSpec(numeric=["size", "weight"], categorical=["shade"]),
        "grade",
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """One registered multiclass model per case, each its version 1 (@champion)."""
    root = tmp_path_factory.mktemp("multiclass-store")
    with isolated_mlflow():
        configure_tracking(root)
        experiment_id = ensure_experiment("multiclass", root)
        client = MlflowClient()
        for case, (make_frame, features, target) in CASES.items():
            _, _, info, sha256, run_id = log_trained_model(
                make_frame(),
                features,
                task="multiclass",
                target=target,
                experiment_id=experiment_id,
                workdir=root / case,
                hidden=(16,),
            )
            client.create_registered_model(case)
            version = client.create_model_version(
                case, source=info.model_uri, run_id=run_id, model_id=info.model_id
            )
            client.set_model_version_tag(case, version.version, WEIGHTS_TAG, sha256)
            client.set_registered_model_alias(case, "champion", version.version)
        yield root


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, store) -> dict:
    """The case's model, its rows without the label as an input file, and pyfunc's answer."""
    make_frame, _, target = CASES[request.param]
    model = load_scoring_model(f"models:/{request.param}@champion")
    rows = make_frame().drop(columns=target)
    source = write_parquet(rows, store / "inputs" / f"{request.param}.parquet")
    expected = mlflow.pyfunc.load_model(model.model_uri).predict(rows.drop(columns=ID))
    return {"model": model, "rows": rows, "files": input_files(source), "expected": expected}


def score(case: dict, output, **options):
    settings = {"id_column": ID, "chunk_rows": 64, "progress": False, **options}
    return score_files(case["model"], case["files"], output, **settings)


def test_parts_hold_each_class_probability_as_pyfunc_answers(case, tmp_path):
    model, expected = case["model"], case["expected"]
    classes = list(model.preprocessor.class_names())
    probabilities = [f"probability_{name}" for name in classes]

    result = score(case, tmp_path / "out", threads=2)

    assert result.manifest["columns"] == [ID, "prediction", "score", *probabilities]
    schema = pq.read_schema(tmp_path / "out" / result.manifest["parts"][0]["name"])
    text = isinstance(classes[0], str)
    assert schema.field("prediction").type == (pa.string() if text else pa.int64())
    for name in ["prediction", "score", *probabilities]:
        assert not schema.field(name).nullable
        assert name == "prediction" or schema.field(name).type == pa.float64()

    parts = read_parts(tmp_path / "out")
    assert parts[ID].tolist() == case["rows"][ID].tolist()  # input order, every row once
    np.testing.assert_allclose(
        parts[probabilities].to_numpy(), expected[probabilities].to_numpy(), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(parts["score"], expected["score"], rtol=1e-5, atol=1e-7)
    assert parts["prediction"].tolist() == expected["prediction"].tolist()
    assert set(parts["prediction"]) <= set(classes)
    assert parts["score"].to_numpy() == pytest.approx(parts[probabilities].max(axis=1).to_numpy())
    assert parts[probabilities].sum(axis=1).to_numpy() == pytest.approx(1.0)

    counts = parts["prediction"].value_counts()
    assert result.prediction_counts == [
        {"class": name, "rows": int(counts.get(name, 0))} for name in classes
    ]
    assert json.loads((tmp_path / "out" / SUCCESS_FILE).read_text())["prediction_counts"] == (
        result.prediction_counts
    )
    # the histogram is of the predicted class's probability, over [0, 1]
    histogram = result.score_histogram
    assert histogram["edges"][0] == 0.0 and histogram["edges"][-1] == 1.0
    expected_counts = np.histogram(parts["score"], bins=len(histogram["counts"]), range=(0, 1))[0]
    assert histogram["counts"] == expected_counts.tolist()


def test_a_killed_multiclass_scoring_resumes_to_the_bytes_and_counts_of_one_run(case, tmp_path):
    whole = score(case, tmp_path / "whole", threads=1)
    output = tmp_path / "resumed"
    first = score(case, output, threads=3)
    assert folder_bytes(output) == folder_bytes(tmp_path / "whole")  # any thread count

    # killed before the manifest, the last two parts not yet written
    (output / SUCCESS_FILE).unlink()
    names = [part["name"] for part in first.manifest["parts"]]
    for name in names[-2:]:
        (output / name).unlink()
    resumed = score(case, output)

    assert (resumed.parts_skipped, resumed.parts_written) == (len(names) - 2, 2)
    assert resumed.prediction_counts == whole.prediction_counts
    assert resumed.score_histogram == whole.score_histogram
    assert folder_bytes(output) == folder_bytes(tmp_path / "whole")
    again = score(case, output)
    assert again.already_complete and again.output_digest == whole.output_digest


def test_ranges_scored_apart_write_the_bytes_of_one_process(case, tmp_path):
    model, files = case["model"], case["files"]
    single = score(case, tmp_path / "single")
    plan = plan_scoring(model, files, tmp_path / "fanned", id_column=ID, chunk_rows=64)
    ranges = plan_ranges(plan, 2)
    # each range's result travels back from its worker pickled, as Dask sends it
    results = [pickle.loads(pickle.dumps(score_range(model, plan, item))) for item in ranges]

    fanned = finish_scoring(model, plan, results[::-1])

    assert len(ranges) > 1
    assert folder_bytes(tmp_path / "fanned") == folder_bytes(tmp_path / "single")
    assert fanned.prediction_counts == single.prediction_counts
    assert sum(item["rows"] for item in fanned.prediction_counts) == len(case["rows"])


def test_rejected_rows_are_left_out_of_the_counts_even_a_whole_chunk(case, tmp_path):
    model = case["model"]
    column = model.preprocessor.numeric[0]
    rows = case["rows"].astype({column: "float64"})
    rows.loc[rows.index[:64], column] = np.nan  # every row of the first chunk
    rows.loc[rows.index[100], column] = np.inf
    source = write_parquet(rows, tmp_path / "input" / "rows.parquet")

    result = score(case | {"files": input_files(source)}, tmp_path / "out")

    assert (result.rows_scored, result.rows_rejected) == (len(rows) - 65, 65)
    empty = pq.read_table(tmp_path / "out" / result.manifest["parts"][0]["name"])
    assert empty.num_rows == 0 and empty.column_names == result.manifest["columns"]
    assert sum(item["rows"] for item in result.prediction_counts) == result.rows_scored
    assert sum(result.score_histogram["counts"]) == result.rows_scored
    rejects = read_parts(tmp_path / "out" / "rejects")
    assert rejects[ID].tolist() == [*range(64), 100]
    assert rejects["reason"].str.startswith(column).all()


def test_an_id_column_named_like_an_output_column_is_refused(case, tmp_path):
    name = f"probability_{case['model'].preprocessor.class_names()[0]}"
    with pytest.raises(DataError) as caught:
        score(case, tmp_path / "out", id_column=name)
    text = caught.value.render()
    assert f"the id column cannot be called {name!r}" in text
    assert "probability_" in text and "prediction" in text  # the output's columns, named
    assert not (tmp_path / "out").exists()
