"""`POST /v1/labels` through a real endpoint: uvicorn on a free loopback port, a model registered
in the session's SQLite MLflow store, the prediction log in a real folder read back with pyarrow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from stemma.components.data.prediction_log import LABELS, PREDICTIONS
from stemma.components.platform.tags import WEIGHTS_SHA256
from stemma.components.serving.labels import label_table
from stemma.components.serving.rows import RequestError
from stemma.components.serving.server import EndpointServer, build_endpoint, max_connections
from stemma.components.spec import load_spec
from tests.support import log_trained_model

pytestmark = pytest.mark.usefixtures("mlflow_uri")

MODEL = "labelled"
ID = "application_id"
TARGET = "approved"
SPEC = f"""
pipeline: {{name: {MODEL}}}
data:
  path: data/train.parquet
  task: binary
  target: {TARGET}
  id: {ID}
  features: {{numeric: [salary, age], categorical: [car]}}
endpoint: {{port: 0, max_rows_per_request: 30, max_body_bytes: 8192}}
"""
LOGGED = ["endpoint.log.path=logs", "endpoint.log.rotate_s=3600"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A project with a binary model registered @champion (seeded weights, not trained)."""
    import mlflow

    root = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            ID: np.arange(400),
            "salary": rng.normal(50_000, 10_000, 400),
            "age": rng.integers(18, 80, 400),
            "car": rng.choice(["a", "b", "c"], 400),
            TARGET: rng.integers(0, 2, 400),
        }
    )
    (root / "data").mkdir()
    frame.to_parquet(root / "data" / "train.parquet", index=False)
    (root / "data.dvc").write_text("outs: []\n")  # marks the project root
    config = root / "spec.yaml"
    config.write_text(SPEC)
    spec = load_spec(config).spec
    experiment = mlflow.create_experiment(f"{MODEL}-{root.name}")
    _, _, info, sha256, run_id = log_trained_model(
        frame,
        spec.data.features,
        task="binary",
        target=TARGET,
        experiment_id=experiment,
        workdir=root / "model",
    )
    client = MlflowClient()
    client.create_registered_model(MODEL)
    version = client.create_model_version(
        MODEL, info.model_uri, run_id=run_id, model_id=info.model_id, tags={WEIGHTS_SHA256: sha256}
    )
    client.set_registered_model_alias(MODEL, "champion", version.version)
    rows = json.loads(frame.drop(columns=[TARGET]).head(3).to_json(orient="records"))
    return {"root": root, "config": config, "client": client, "rows": rows}


@contextmanager
def serving(
    project: dict, root: Path, *settings: str, environ: dict | None = None
) -> Iterator[httpx.Client]:
    """The spec's endpoint on a free loopback port, its log (if any) under ``root``; the log
    is flushed when the block ends, as the endpoint stops."""
    spec = load_spec(project["config"], list(settings)).spec
    endpoint = build_endpoint(spec, client=project["client"], environ=environ or {}, root=root)
    server = EndpointServer(
        endpoint.app, "127.0.0.1", 0, max_connections=max_connections(endpoint.settings)
    )
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def read(root: Path, kind: str) -> list[dict]:
    folder = root / "logs" / kind
    if not any(folder.glob("*/*.parquet")):
        return []
    return pq.read_table(folder).to_pylist()


# ---------------------------------------------------------------------------------------


def test_labels_land_in_the_log_beside_the_predictions_they_label(project, tmp_path):
    with serving(project, tmp_path, *LOGGED) as endpoint:
        one = endpoint.post("/v1/labels", json={ID: 0, TARGET: 1})
        listed = endpoint.post("/v1/labels", json=[{ID: 1, TARGET: 0}, {ID: "x-2", TARGET: 1.0}])
        columns = endpoint.post("/v1/labels", json={"columns": {ID: [3, 4], TARGET: [0, 1]}})
        refused = endpoint.post("/v1/labels", json=[{ID: 5, TARGET: 1}, {ID: 6, TARGET: 7}])
        predicted = endpoint.post(
            "/v1/predict", json=project["rows"], headers={"X-Request-Id": "scored-1"}
        )
        schema = endpoint.get("/openapi.json").json()["paths"]["/v1/labels"]["post"]
        for response, count in ((one, 1), (listed, 2), (columns, 2)):
            assert response.status_code == 200, response.text
            assert response.json() == {"recorded": count}
        assert refused.status_code == 422  # all or none: label 5 is not recorded either
        assert predicted.status_code == 200, predicted.text

    labels = read(tmp_path, LABELS)
    assert [(row[ID], row[TARGET]) for row in labels] == [
        ("0", 1),
        ("1", 0),
        ("x-2", 1),
        ("3", 0),
        ("4", 1),
    ]
    assert all(row["stemma_time"] is not None for row in labels)
    scored = read(tmp_path, PREDICTIONS)
    assert [(row["stemma_request_id"], row[ID]) for row in scored] == [
        ("scored-1", "0"),
        ("scored-1", "1"),
        ("scored-1", "2"),
    ]  # the ids labels join on
    body = schema["requestBody"]["content"]["application/json"]["schema"]
    assert body["anyOf"][0]["required"] == [ID, TARGET]
    assert "held in memory when the answer is sent" in schema["description"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ([{ID: 1, TARGET: 1}, {TARGET: 0}], 422, "label 1: no application_id"),
        ({ID: 1}, 422, "labels need the columns application_id and approved"),
        ({ID: 1, TARGET: 2}, 422, "label 0: approved must be 0 or 1 (the model is binary), not 2"),
        ({ID: 1, TARGET: "yes"}, 422, "label 0: approved must be 0 or 1"),
        ({ID: 1, TARGET: None}, 422, "label 0: no approved"),
        ({ID: 1.5, TARGET: 1}, 422, "label 0: application_id must be text or a whole number"),
        ({ID: True, TARGET: 1}, 422, "label 0: application_id must be text or a whole number"),
        ("a label", 422, "the body must be a label (an object), a list of labels"),
        ([], 422, "the request holds no labels"),
        ({"columns": {ID: [1, 2], TARGET: [1]}}, 422, "the columns have different lengths"),
        ([{ID: n, TARGET: 1} for n in range(31)], 413, "the request holds 31 labels"),
        ([{ID: "x" * 300, TARGET: 1}] * 29, 413, "the body is larger than the limit"),
        (b"{not json", 400, "the body is not valid JSON"),
    ],
    ids=[
        "missing-id",
        "missing-target-column",
        "target-2",
        "target-text",
        "target-null",
        "fractional-id",
        "boolean-id",
        "not-a-label",
        "no-labels",
        "ragged-columns",
        "too-many-labels",
        "too-many-bytes",
        "not-json",
    ],
)
def test_bad_labels_get_a_4xx_naming_what_is_wrong(labelled, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = labelled.post(
        "/v1/labels", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    answer = response.json()
    assert message in " ".join([answer["error"], *answer["details"]]), answer
    assert answer["request_id"] == response.headers["X-Request-Id"]


@pytest.fixture(scope="module")
def labelled(project, tmp_path_factory) -> Iterator[httpx.Client]:
    with serving(project, tmp_path_factory.mktemp("labelled"), *LOGGED) as endpoint:
        yield endpoint


def test_labels_without_a_log_or_an_id_column_are_refused_saying_what_to_set(project, tmp_path):
    with serving(project, tmp_path) as endpoint:
        response = endpoint.post("/v1/labels", json={ID: 1, TARGET: 1})
    assert response.status_code == 503
    assert response.json()["error"] == "labels need endpoint.log: this endpoint keeps no log"

    with serving(project, tmp_path, *LOGGED, "data.id=null") as endpoint:
        response = endpoint.post("/v1/labels", json={ID: 1, TARGET: 1})
    assert response.status_code == 409
    assert response.json()["error"].startswith("labels need data.id")
    assert read(tmp_path, LABELS) == []


def test_labels_need_the_bearer_token_when_the_spec_names_one(project, tmp_path):
    settings = [*LOGGED, "endpoint.token_env=LABELS_TOKEN"]
    with serving(project, tmp_path, *settings, environ={"LABELS_TOKEN": "s3cret"}) as endpoint:
        label = {ID: 1, TARGET: 1}
        missing = endpoint.post("/v1/labels", json=label)
        wrong = endpoint.post("/v1/labels", json=label, headers={"Authorization": "Bearer no"})
        right = endpoint.post("/v1/labels", json=label, headers={"Authorization": "Bearer s3cret"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error"].startswith("a bearer token is required")
    assert [row[ID] for row in read(tmp_path, LABELS)] == ["1"]


def test_a_full_label_buffer_answers_503_with_retry_after_and_counts(project, tmp_path):
    settings = [*LOGGED, "endpoint.log.rotate_rows=4", "endpoint.log.max_buffered_rows=4"]
    with serving(project, tmp_path, *settings) as endpoint:
        taken = endpoint.post("/v1/labels", json=[{ID: n, TARGET: 1} for n in range(3)])
        full = endpoint.post("/v1/labels", json=[{ID: n, TARGET: 0} for n in range(3, 5)])
        metrics = text_string_to_metric_families(endpoint.get("/metrics").text)
        dropped = {
            sample.labels["kind"]: sample.value
            for family in metrics
            if family.name == "stemma_endpoint_log_dropped_rows"
            for sample in family.samples
            if sample.name.endswith("_total")
        }
    assert taken.json() == {"recorded": 3}
    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
    assert full.json()["error"].startswith("the endpoint's log holds as many labels as it may")
    assert dropped[LABELS] == 2
    assert [row[ID] for row in read(tmp_path, LABELS)] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------
# The checks alone


def test_a_regression_target_must_be_a_finite_number():
    values = [1.5, 7, math.nan, math.inf, "x", True, 10**400]
    with pytest.raises(RequestError) as raised:
        label_table(
            {"columns": {ID: list(range(len(values))), "y": values}},
            id_column=ID,
            target_column="y",
            task="regression",
            max_rows=100,
        )
    assert raised.value.status == 422
    assert raised.value.details == [
        "label 2: y must be a finite number, not nan",
        "label 3: y must be a finite number, not inf",
        "label 4: y must be a number (the model is a regression), not 'x'",
        "label 5: y must be a number (the model is a regression), not True",
        f"label 6: y must be a finite number, not {str(10**400)[:37]}...",
    ]
    table = label_table(
        [{ID: 7.0, "y": 2}, {ID: "b", "y": -0.5}],
        id_column=ID,
        target_column="y",
        task="regression",
        max_rows=100,
    )
    assert table.to_pylist() == [{ID: "7", "y": 2.0}, {ID: "b", "y": -0.5}]


def test_a_multiclass_label_is_text_or_a_number_and_logged_as_text():
    values = ["setosa", 2, 2.0, True, ["x"], {"a": 1}, math.nan, None, 10**400]
    with pytest.raises(RequestError) as raised:
        label_table(
            {"columns": {ID: list(range(len(values))), "species": values}},
            id_column=ID,
            target_column="species",
            task="multiclass",
            max_rows=100,
        )
    assert raised.value.status == 422
    assert raised.value.details == [
        "label 4: species must be a class: text or a number (the model is multiclass), not ['x']",
        "label 5: species must be a class: text or a number (the model is multiclass), "
        "not {'a': 1}",
        "label 6: species must be a class: text or a finite number, not nan",
        "label 7: no species",
    ]
    fine = [*values[:4], values[-1]]
    table = label_table(
        {"columns": {ID: list(range(len(fine))), "species": fine}},
        id_column=ID,
        target_column="species",
        task="multiclass",
        max_rows=100,
    )
    assert table.column("species").to_pylist() == ["setosa", "2", "2", "true", str(10**400)]


@pytest.mark.parametrize(
    ("target", "labels", "sent", "unknown"),
    [
        (
            "species",
            None,
            ["setosa", "virginica", "Setosa", "rose", "rose"],
            ["Setosa", "rose", "rose"],
        ),
        (
            "species",
            {"S": "setosa", "VE": "versicolor", "VI": "virginica"},
            ["S", "VI", "setosa", "X"],
            ["setosa", "X"],
        ),
        ("code", None, ["0", "2", "2.0", "3", "two"], ["3", "two"]),
    ],
    ids=["classes", "label-map", "whole-number-classes"],
)
def test_unknown_multiclass_labels_are_those_the_model_cannot_match(target, labels, sent, unknown):
    """Matched by the served model's preprocessing, as training matches raw labels; iris
    with text classes, the same through a label map, and the class codes 0, 1, 2."""
    from sklearn.datasets import load_iris

    from stemma.components.model.preprocessing import fit_preprocessor
    from stemma.components.serving.labels import unknown_labels
    from stemma.components.spec import FeaturesSpec

    iris = load_iris(as_frame=True)
    frame = iris.frame.rename(columns={"target": "code"})
    names = dict(enumerate(iris.target_names))
    raw = {name: key for key, name in (labels or {}).items()}
    frame["species"] = frame["code"].map(lambda code: raw.get(names[code], names[code]))
    features = FeaturesSpec(numeric=list(iris.feature_names), categorical=[])
    preprocessor = fit_preprocessor(
        frame, features, task="multiclass", target=target, labels=labels
    )
    assert unknown_labels(sent, preprocessor) == unknown


def test_many_bad_labels_are_listed_on_one_screen():
    with pytest.raises(RequestError) as raised:
        label_table(
            [{ID: n, TARGET: 5} for n in range(50)],
            id_column=ID,
            target_column=TARGET,
            task="binary",
            max_rows=100,
        )
    assert len(raised.value.details) == 21
    assert raised.value.details[-1] == "and 30 more"


def test_a_binary_label_map_turns_raw_labels_into_0_and_1_and_counts_the_unmapped():
    """A binary model trained with ``data.labels: {yes: 1, no: 0}`` takes yes and no on
    /v1/labels as training did; a label the map does not know is counted, not logged."""
    import pandas as pd

    from stemma.components.model.preprocessing import fit_preprocessor
    from stemma.components.serving.labels import mapped_binary_labels
    from stemma.components.spec import FeaturesSpec

    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "answer": ["yes", "no", "yes", "no"]})
    preprocessor = fit_preprocessor(
        frame,
        FeaturesSpec(numeric=["x"]),
        task="binary",
        target="answer",
        labels={"yes": 1, "no": 0},
    )
    body = [
        {ID: "a", "answer": "yes"},
        {ID: "b", "answer": "maybe"},
        {ID: "c", "answer": "no"},
        {ID: "d", "answer": 1},
    ]
    mapped, unknown = mapped_binary_labels(body, "answer", preprocessor, 100)

    assert unknown == ["maybe", "1"]
    table = label_table(mapped, id_column=ID, target_column="answer", task="binary", max_rows=100)
    assert table.to_pylist() == [{ID: "a", "answer": 1}, {ID: "c", "answer": 0}]
