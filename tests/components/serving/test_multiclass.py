"""A multiclass model on the endpoint: real uvicorn on a free loopback port, a real MLflow
store, a model of sklearn's wine with text classes and a label map trained by the train
flow (``wine_registry``, in conftest.py): answers, the OpenAPI schema, metrics, the
prediction log and the shadow's part of it, and labels by class or by raw code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.components.data.prediction_log import LABELS, PREDICTIONS, SHADOW
from stemma.components.runtime.loading import ScoringModel, load_scoring_model
from stemma.components.serving.routing import decode_rows
from stemma.components.serving.server import EndpointServer, build_endpoint, max_connections
from stemma.components.spec import load_spec
from tests.components.serving.conftest import (
    WINE_CODES,
    WINE_ID,
    WINE_MODEL,
    WINE_OVERRIDES,
    WINE_TARGET,
)
from tests.components.serving.test_endpoint import metric_samples, records
from tests.components.serving.test_live_routing import wait_for
from tests.support import WINE_CLASSES

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

#: The classes in the model's output order (the training split's, sorted).
CLASSES = sorted(WINE_CLASSES)
PROBABILITY_COLUMNS = [f"probability_{name}" for name in CLASSES]
ANSWER_COLUMNS = ["prediction", "score", *PROBABILITY_COLUMNS]


@contextmanager
def serving(registry: dict, *settings: str) -> Iterator[httpx.Client]:
    """The wine spec's endpoint on a free loopback port, with overrides; a log (if any)
    is written under the project and flushed when the block ends."""
    spec = load_spec(registry["config"], [*WINE_OVERRIDES, *settings]).spec
    endpoint = build_endpoint(spec, client=registry["client"], environ={}, root=registry["root"])
    server = EndpointServer(
        endpoint.app, "127.0.0.1", 0, max_connections=max_connections(endpoint.settings)
    )
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def endpoint(wine_registry) -> Iterator[httpx.Client]:
    with serving(wine_registry) as client:
        yield client


@pytest.fixture(scope="module")
def model(wine_registry) -> ScoringModel:
    return load_scoring_model(
        f"models:/{WINE_MODEL}/{wine_registry['version']}", client=wine_registry["client"]
    )


def expected_answers(model: ScoringModel, frame: pd.DataFrame) -> pd.DataFrame:
    """The model's own answer table for the rows (score, prediction, probability_<class>),
    outside the endpoint."""
    preprocessor = model.preprocessor
    raw = model.runtime.run(preprocessor.transform(frame))
    return preprocessor.output_frame(preprocessor.decode_output(raw))


def answered(results: list[dict]) -> pd.DataFrame:
    """The answer's rows as the model's answer table."""
    return pd.DataFrame(
        {
            "prediction": [row["prediction"] for row in results],
            "score": [row["score"] for row in results],
            **{
                column: [row["probabilities"][name] for row in results]
                for name, column in zip(CLASSES, PROBABILITY_COLUMNS, strict=True)
            },
        }
    )


def log_table(registry: dict, folder: str, kind: str) -> pa.Table:
    return pq.read_table(registry["root"] / folder / kind)


def counted_predictions(client: httpx.Client, version: str) -> dict[str, float]:
    return {
        sample.labels["class"]: sample.value
        for sample in metric_samples(client).get("stemma_endpoint_predictions", [])
        if sample.name.endswith("_total") and sample.labels["version"] == version
    }


# ---------------------------------------------------------------------------------------
# Answers


def test_each_row_gets_its_class_that_class_probability_and_every_class(
    endpoint, wine_registry, model
):
    rows = wine_registry["rows"].head(30)
    expected = expected_answers(model, rows)
    listed = records(rows)
    bodies = {
        "row": listed[0],
        "list": listed,
        "columns": {"columns": {name: [row[name] for row in listed] for name in listed[0]}},
    }
    before = counted_predictions(endpoint, wine_registry["version"])

    for shape, body in bodies.items():
        response = endpoint.post("/v1/predict", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == (1 if shape == "row" else 30)
        for result in results:
            assert list(result["probabilities"]) == CLASSES  # the model's output order
            assert result["score"] == max(result["probabilities"].values())
            assert result["prediction"] == max(
                result["probabilities"], key=result["probabilities"].get
            )
            assert sum(result["probabilities"].values()) == pytest.approx(1.0)
            assert result["version"] == wine_registry["version"]
        pd.testing.assert_frame_equal(
            answered(results),
            expected.head(len(results))[ANSWER_COLUMNS],
            check_exact=False,
            rtol=1e-5,
        )
        assert [row["id"] for row in results] == rows[WINE_ID].head(len(results)).tolist()

    # A trained model tells the cultivars apart: more than one class among 30 wines.
    assert len(set(expected["prediction"])) > 1
    # Counted by class: each of the 30 rows twice (a list, columns), and the first once more.
    counted = counted_predictions(endpoint, wine_registry["version"])
    grown = {name: counted[name] - before.get(name, 0) for name in counted}
    want = (expected["prediction"].value_counts() * 2).to_dict()
    want[expected["prediction"].iloc[0]] += 1
    assert {name: rows for name, rows in grown.items() if rows} == want


def test_the_openapi_page_describes_the_multiclass_answer(endpoint):
    schema = endpoint.get("/openapi.json").json()
    row = schema["components"]["schemas"]["RowResult"]["properties"]
    assert row["probabilities"]["anyOf"][0] == {
        "type": "object",
        "additionalProperties": {"type": "number"},
    }
    assert {"type": "string"} in row["prediction"]["anyOf"]
    assert "likeliest class" in row["prediction"]["description"]
    labels = schema["paths"]["/v1/labels"]["post"]["requestBody"]["content"]["application/json"]
    # No log here: the labels body says what it needs.
    assert "endpoint.log" in labels["schema"]["description"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf
def test_a_non_finite_output_answers_no_class_and_counts_none(model):
    """A diverged network's row: no class, no number, and no count; the others as usual."""
    raw = np.array([[2.0, 0.5, -1.0], [np.nan, 0.0, 0.0], [0.0, np.inf, 0.0]])
    decoded = decode_rows(model, raw)
    assert decoded.predictions == [CLASSES[0], None, None]
    assert decoded.scores[1:] == [None, None]
    assert decoded.probabilities is not None and decoded.probabilities[1:] == [None, None]
    assert decoded.scores[0] == pytest.approx(np.exp(2.0) / np.exp([2.0, 0.5, -1.0]).sum())
    assert decoded.counts == {CLASSES[0]: 1}


# ---------------------------------------------------------------------------------------
# The log, the shadow and labels


def test_the_log_and_the_shadow_hold_the_class_its_probability_and_each_class(wine_registry):
    registry = wine_registry
    client = registry["client"]
    client.set_registered_model_alias(WINE_MODEL, "challenger", registry["other"])
    folder = "outputs/wine-log"
    rows = registry["rows"].head(12)
    try:
        with serving(
            registry,
            f"endpoint.log.path={folder}",
            "endpoint.log.rotate_s=3600",
            "endpoint.shadow.sample=1.0",
            "endpoint.poll_s=0.2",
        ) as endpoint:
            ready = wait_for(endpoint, "shadow")
            assert ready["shadow"]["version"] == registry["other"]
            response = endpoint.post(
                "/v1/predict", json=records(rows), headers={"X-Request-Id": "wine-1"}
            )
            assert response.status_code == 200, response.text
            deadline = time.monotonic() + 10
            while shadow_scored(endpoint) < len(rows):
                assert time.monotonic() < deadline, "the shadow scored nothing"
                time.sleep(0.05)
    finally:
        client.delete_registered_model_alias(WINE_MODEL, "challenger")

    results = response.json()["results"]
    served = log_table(registry, folder, PREDICTIONS)
    assert [served.schema.field(name).type for name in ANSWER_COLUMNS] == [
        pa.string(),
        *[pa.float64()] * (1 + len(CLASSES)),
    ]
    logged = served.to_pandas().sort_values("stemma_row", ignore_index=True)
    assert logged["stemma_row"].tolist() == list(range(len(rows)))
    assert logged[WINE_ID].tolist() == [str(value) for value in rows[WINE_ID]]
    pd.testing.assert_frame_equal(logged[ANSWER_COLUMNS], answered(results), check_exact=False)
    shadowed = log_table(registry, folder, SHADOW)
    assert shadowed.schema == served.select(shadowed.column_names).schema
    pairs = shadowed.to_pandas().merge(
        logged, on=["stemma_request_id", "stemma_row"], suffixes=("_shadow", "")
    )
    assert len(pairs) == len(rows)
    assert set(pairs["stemma_model_version_shadow"]) == {registry["other"]}
    # The shadow's own answer: its class is its likeliest, of probabilities summing to 1.
    shadow = pairs[[f"{column}_shadow" for column in PROBABILITY_COLUMNS]].to_numpy()
    np.testing.assert_allclose(shadow.sum(axis=1), 1.0)
    np.testing.assert_allclose(pairs["score_shadow"], shadow.max(axis=1))
    assert pairs["prediction_shadow"].tolist() == [CLASSES[i] for i in shadow.argmax(axis=1)]
    assert not np.allclose(shadow, pairs[PROBABILITY_COLUMNS].to_numpy())  # another model


def shadow_scored(client: httpx.Client) -> float:
    return sum(
        sample.value
        for sample in metric_samples(client).get("stemma_endpoint_shadow_rows", [])
        if sample.name.endswith("_total") and sample.labels["outcome"] == "scored"
    )


def test_labels_by_class_or_raw_code_are_recorded_and_unknown_ones_counted(wine_registry, model):
    registry = wine_registry
    folder = "outputs/wine-labels"
    sent = ["barolo", "G2", "chianti", "B3", "chianti", "Barolo"]
    with serving(registry, f"endpoint.log.path={folder}", "endpoint.log.rotate_s=3600") as endpoint:
        refused = endpoint.post(
            "/v1/labels",
            json=[{WINE_ID: 1, WINE_TARGET: "barolo"}, {WINE_ID: 2, WINE_TARGET: ["G2"]}],
        )
        response = endpoint.post(
            "/v1/labels",
            json={"columns": {WINE_ID: list(range(len(sent))), WINE_TARGET: sent}},
        )
        samples = metric_samples(endpoint)

    # A label that is no label at all is refused, naming it, and nothing is recorded.
    assert refused.status_code == 422
    assert refused.json()["details"] == [
        "label 1: cultivar must be a class: text or a number (the model is multiclass), not ['G2']"
    ]
    # Labels of no class are production's truth: recorded, counted and named.
    assert response.status_code == 200, response.text
    assert response.json() == {
        "recorded": 6,
        "unknown": 3,
        "unknown_labels": ["chianti", "Barolo"],
    }
    (unknown,) = samples["stemma_endpoint_unknown_labels"][:1]
    assert unknown.value == 3
    labels = log_table(registry, folder, LABELS)
    assert labels.schema.field(WINE_TARGET).type == pa.string()
    logged = labels.to_pandas()
    assert logged[WINE_ID].tolist() == [str(n) for n in range(len(sent))]
    assert logged[WINE_TARGET].tolist() == sent  # as sent: matched as training matches
    codes = model.preprocessor.class_codes(logged[WINE_TARGET])
    classes = [CLASSES[code] if code >= 0 else None for code in codes]
    assert classes == ["barolo", WINE_CODES["G2"], None, WINE_CODES["B3"], None, None]
