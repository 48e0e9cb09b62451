"""The online endpoint: real uvicorn on a free loopback port, a real MLflow store, a trained model.

The project (``registry``, in conftest.py) holds one credit model trained for the session,
a second version of other weights for the alias to move to, and a third whose weights were
changed in the artifact store, which the endpoint must refuse.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stemma.components.runtime.loading import load_scoring_model
from stemma.components.serving.server import EndpointServer, build_endpoint, max_connections
from stemma.components.spec import load_spec
from tests.components.serving.conftest import ID, MODEL, NAMES

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")


@contextmanager
def serving(registry: dict, *settings: str, environ: dict | None = None) -> Iterator[httpx.Client]:
    """The spec's endpoint on a free loopback port, with ``endpoint.*`` overrides."""
    spec = load_spec(registry["config"], [*NAMES, *settings]).spec
    endpoint = build_endpoint(
        spec, client=registry["client"], environ=environ or {}, root=registry["root"]
    )
    server = EndpointServer(
        endpoint.app, "127.0.0.1", 0, max_connections=max_connections(endpoint.settings)
    )
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.endpoint = endpoint  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def endpoint(registry) -> Iterator[httpx.Client]:
    """One endpoint for the tests that do not move the alias or change the limits."""
    with serving(
        registry, "endpoint.max_body_bytes=8192", "endpoint.max_rows_per_request=30"
    ) as client:
        yield client


def records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def expected_scores(registry: dict, version: str, frame: pd.DataFrame) -> np.ndarray:
    """The scores the runtime gives the rows, outside the endpoint."""
    model = load_scoring_model(f"models:/{MODEL}/{version}", client=registry["client"])
    matrix = model.preprocessor.transform(frame)
    return model.preprocessor.decode_output(model.runtime.run(matrix))


def metric_samples(client: httpx.Client) -> dict[str, list]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {family.name: family.samples for family in families}


# ---------------------------------------------------------------------------------------
# Predictions


def test_one_row_a_list_and_columns_score_as_the_runtime_does(endpoint, registry):
    rows = registry["rows"].head(5)
    expected = expected_scores(registry, registry["versions"]["v1"], rows)
    listed = records(rows)
    bodies = {
        "row": listed[0],
        "list": listed,
        "columns": {"columns": {name: [row[name] for row in listed] for name in listed[0]}},
    }

    for shape, body in bodies.items():
        response = endpoint.post("/v1/predict", json=body, headers={"X-Request-Id": f"r-{shape}"})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert response.headers["X-Stemma-Model-Version"] == registry["versions"]["v1"]
        assert (answer["model"], answer["version"], answer["alias"]) == (
            MODEL,
            registry["versions"]["v1"],
            "champion",
        )
        assert answer["request_id"] == response.headers["X-Request-Id"] == f"r-{shape}"
        results = answer["results"]
        assert len(results) == (1 if shape == "row" else 5)
        np.testing.assert_allclose(
            [result["score"] for result in results], expected[: len(results)], rtol=1e-5
        )
        assert [result["id"] for result in results] == rows[ID].head(len(results)).tolist()
        assert all(r["prediction"] == int(r["score"] >= 0.5) for r in results)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda row: row.pop("salary"), "missing 1 column: salary (double)"),
        (lambda row: row.update(age="old"), "column age is string, the model needs"),
        (lambda row: row.update(car=[1, 2]), "column car: 1 row 0 hold a list or object"),
    ],
    ids=["missing-column", "wrong-type", "nested-value"],
)
def test_rows_that_do_not_fit_the_signature_get_422_naming_the_column(
    endpoint, registry, change, named
):
    row = records(registry["rows"].head(1))[0]
    change(row)
    response = endpoint.post("/v1/predict", json=[row])
    assert response.status_code == 422
    answer = response.json()
    assert any(named in line for line in answer["details"]), answer
    assert "the model takes: salary (double)" in answer["details"][-1]


def test_mixed_types_in_a_column_get_422_naming_it(endpoint, registry):
    rows = records(registry["rows"].head(2))
    rows[1]["loan"] = "a lot"
    response = endpoint.post("/v1/predict", json=rows)
    assert response.status_code == 422
    assert "column loan mixes number and text values" in response.json()["details"]


def test_rows_that_cannot_be_scored_are_rejected_with_their_reason(endpoint, registry):
    rows = records(registry["rows"].head(4))
    rows[1]["salary"] = None
    rows[2]["car"] = 999_999
    content = json.dumps(rows).replace('"salary": null', '"salary": NaN')  # JSON from Python
    response = endpoint.post(
        "/v1/predict", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r.get("rejected", False) for r in results] == [False, True, True, False]
    assert results[1]["reason"] == "salary is missing"
    assert results[2]["reason"] == "car=999999 is not a known category"
    assert results[0]["score"] is not None and results[3]["score"] is not None


def test_an_error_policy_refuses_the_request_naming_the_row(registry):
    rows = records(registry["rows"].head(3))
    rows[2]["salary"] = None
    with serving(registry, "score.invalid_rows=error") as client:
        response = client.post("/v1/predict", json=rows)
    assert response.status_code == 422
    assert "row 2: salary is missing" in response.json()["details"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"x" * 9000, 413, "the body is larger than the limit of 8192 bytes"),
        (None, 413, "the request holds 31 rows; the limit is 30 rows per request"),
        (b'{"salary": 1,', 400, "the body is not valid JSON"),
        (b"[]", 422, "the request holds no rows"),
        (b'"text"', 422, "the body must be a row"),
    ],
    ids=["body-over-limit", "rows-over-limit", "malformed-json", "no-rows", "not-rows"],
)
def test_bad_bodies_get_a_clear_4xx_and_the_endpoint_keeps_serving(
    endpoint, registry, body, status, message
):
    if body is None:
        row = records(registry["rows"].head(1))[0]
        body = json.dumps([row] * 31).encode()
        assert len(body) < 8192  # the row limit, not the byte limit, refuses it
    response = endpoint.post(
        "/v1/predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"].startswith(message)
    after = endpoint.post("/v1/predict", json=records(registry["rows"].head(1)))
    assert after.status_code == 200


def test_a_50_mb_body_is_refused_without_being_read_and_the_endpoint_keeps_serving(
    endpoint, registry
):
    size = 50 << 20
    chunk = b"[" + b'{"salary": 1.0},' * 4096

    def stream():  # chunked: no Content-Length announces the size
        sent = 0
        while sent < size:
            yield chunk
            sent += len(chunk)

    declared = endpoint.post(
        "/v1/predict", content=b"x" * size, headers={"Content-Type": "application/json"}
    )
    streamed = endpoint.post(
        "/v1/predict", content=stream(), headers={"Content-Type": "application/json"}
    )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"].startswith("the body is larger than the limit")
    after = endpoint.post("/v1/predict", json=records(registry["rows"].head(1)))
    assert after.status_code == 200


def test_a_token_is_required_when_the_spec_names_its_variable(registry):
    row = records(registry["rows"].head(1))
    secret = "s3cret-token"
    with serving(
        registry, "endpoint.token_env=STEMMA_TEST_TOKEN", environ={"STEMMA_TEST_TOKEN": secret}
    ) as client:
        assert client.post("/v1/predict", json=row).status_code == 401
        wrong = client.post("/v1/predict", json=row, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and secret not in wrong.text
        assert client.get("/metrics").status_code == 401
        assert client.get("/health").status_code == 200
        good = client.post("/v1/predict", json=row, headers={"Authorization": f"Bearer {secret}"})
        assert good.status_code == 200


def test_a_token_variable_that_is_not_set_stops_the_start(registry):
    from stemma.components.errors import SpecError

    spec = load_spec(registry["config"], [*NAMES, "endpoint.token_env=STEMMA_UNSET"]).spec
    with pytest.raises(
        SpecError, match=r"endpoint\.token_env names STEMMA_UNSET, which is not set"
    ):
        build_endpoint(spec, client=registry["client"], environ={})


# ---------------------------------------------------------------------------------------
# Batching, overload, deadlines


def test_concurrent_requests_are_coalesced_into_shared_model_calls(registry):
    rows = [records(registry["rows"].iloc[[i]]) for i in range(16)]
    with serving(registry, "endpoint.max_wait_ms=20") as client:

        def send(index: int) -> list[int]:
            return [client.post("/v1/predict", json=rows[index]).status_code for _ in range(10)]

        with ThreadPoolExecutor(16) as pool:
            statuses = [s for batch in pool.map(send, range(16)) for s in batch]
        samples = metric_samples(client)
    assert statuses == [200] * 160
    batches = {
        s.labels.get("le"): s.value
        for s in samples["stemma_endpoint_batch_requests"]
        if s.name.endswith("_bucket")
    }
    calls = batches["+Inf"]
    assert calls < 160, "every request had a model call of its own"
    assert batches["1.0"] < calls  # some calls served more than one request
    rows_total = next(
        s.value for s in samples["stemma_endpoint_batch_rows"] if s.name.endswith("_sum")
    )
    assert rows_total == 160


def test_overload_is_refused_at_once_with_retry_after(registry):
    rows = records(registry["rows"].head(8))
    settings = [
        "endpoint.max_queue_rows=8",
        "endpoint.max_rows_per_request=8",
        "endpoint.max_batch_size=64",
        "endpoint.max_wait_ms=200",
    ]
    with serving(registry, *settings) as client:
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/predict", json=rows), range(36)))
        after = client.post("/v1/predict", json=rows[:1])
    statuses = sorted({response.status_code for response in responses})
    assert statuses == [200, 503], statuses
    refused = [response for response in responses if response.status_code == 503]
    assert all(int(response.headers["Retry-After"]) >= 1 for response in refused)
    assert "overloaded" in refused[0].json()["error"]
    assert all(r.elapsed.total_seconds() < 5 for r in responses)  # never a hang
    assert after.status_code == 200


@pytest.mark.parametrize(
    ("deadline", "statuses"),
    [("0.0001", {503, 504}), ("soon", {400}), ("5000", {200})],
    ids=["unmeetable", "malformed", "generous"],
)
def test_a_deadline_that_cannot_be_met_is_refused(endpoint, registry, deadline, statuses):
    row = records(registry["rows"].head(1))
    response = endpoint.post("/v1/predict", json=row, headers={"X-Stemma-Deadline-Ms": deadline})
    assert response.status_code in statuses, response.text


# ---------------------------------------------------------------------------------------
# Alias hot-swap


def move_alias(registry: dict, key: str) -> None:
    registry["client"].set_registered_model_alias(MODEL, "champion", registry["versions"][key])


def test_moving_the_alias_swaps_the_model_without_a_failed_request(registry):
    row = records(registry["rows"].head(1))
    versions = registry["versions"]
    seen: list[tuple[int, str]] = []
    stop = threading.Event()
    try:
        with serving(registry, "endpoint.poll_s=0.2") as client:

            def stream() -> None:
                while not stop.is_set():
                    response = client.post("/v1/predict", json=row)
                    seen.append(
                        (response.status_code, response.headers.get("X-Stemma-Model-Version", ""))
                    )
                    time.sleep(0.002)

            sender = threading.Thread(target=stream)
            sender.start()
            time.sleep(0.3)
            moved = time.monotonic()
            move_alias(registry, "v2")
            while not seen or seen[-1][1] != versions["v2"]:
                assert time.monotonic() - moved < 10, "the endpoint did not swap"
                time.sleep(0.01)
            swapped_after = time.monotonic() - moved
            time.sleep(0.2)
            stop.set()
            sender.join()
            ready = client.get("/ready").json()
            loads = metric_samples(client)["stemma_endpoint_model_loads"]
    finally:
        stop.set()
        move_alias(registry, "v1")
    statuses = {status for status, _ in seen}
    order = [version for _, version in seen]
    assert statuses == {200}
    first_new = order.index(versions["v2"])
    assert set(order[:first_new]) == {versions["v1"]} and set(order[first_new:]) == {versions["v2"]}
    assert ready["version"] == versions["v2"]
    assert any(s.labels == {"result": "swapped"} and s.value == 1 for s in loads)
    print(f"swapped {swapped_after:.2f} s after the alias moved (poll 0.2 s), {len(seen)} requests")


def test_a_version_that_fails_to_load_keeps_the_old_model(registry, caplog):
    row = records(registry["rows"].head(1))
    versions = registry["versions"]
    try:
        with serving(registry, "endpoint.poll_s=0.1") as client:
            move_alias(registry, "v3")
            limit = time.monotonic() + 15
            while "last_failed_load" not in (ready := client.get("/ready")).json():
                assert time.monotonic() < limit, "the failed load was not reported"
                time.sleep(0.05)
            response = client.post("/v1/predict", json=row)
            samples = metric_samples(client)
    finally:
        move_alias(registry, "v1")
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] is True
    assert body["version"] == versions["v1"]
    assert body["last_failed_load"]["version"] == versions["v3"]
    assert "differ from the digests recorded" in body["last_failed_load"]["reason"]
    assert response.status_code == 200
    assert response.headers["X-Stemma-Model-Version"] == versions["v1"]
    assert any(
        s.labels == {"result": "failed"} and s.value >= 1
        for s in samples["stemma_endpoint_model_loads"]
    )
    assert f"could not load v{versions['v3']}" in caplog.text


# ---------------------------------------------------------------------------------------
# Health, readiness, metrics, docs


def test_health_ready_metrics_and_docs(endpoint, registry):
    assert endpoint.get("/health").json() == {"status": "ok"}
    ready = endpoint.get("/ready").json()
    assert ready["ready"] is True and ready["version"] == registry["versions"]["v1"]
    endpoint.post("/v1/predict", json=records(registry["rows"].head(3)))

    samples = metric_samples(endpoint)
    expected = {
        "stemma_endpoint_request_seconds",
        "stemma_endpoint_queue_wait_seconds",
        "stemma_endpoint_inference_seconds",
        "stemma_endpoint_batch_rows",
        "stemma_endpoint_queue_rows",
        "stemma_endpoint_requests",
        "stemma_endpoint_model_info",
    }
    assert expected <= set(samples)
    buckets = [
        float(s.labels["le"])
        for s in samples["stemma_endpoint_request_seconds"]
        if s.name.endswith("_bucket")
    ]
    assert buckets[0] == 0.0001 and 1.0 in buckets and math.isinf(buckets[-1])
    ok = [s for s in samples["stemma_endpoint_requests"] if s.labels.get("status") == "200"]
    assert ok and ok[0].labels["version"] == registry["versions"]["v1"]

    docs = endpoint.get("/docs")
    assert docs.status_code == 200
    # the page's scripts and styles come from the endpoint, not a CDN: /docs works offline
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and not [url for url in assets if "://" in url], assets
    assert all(endpoint.get(url).status_code == 200 for url in assets)
    schema = endpoint.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    row = body["schema"]["anyOf"][0]
    assert {"salary", "car", "zipcode"} <= set(row["required"])
