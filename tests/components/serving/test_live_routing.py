"""Live canary and live shadow on the endpoint: real uvicorn on loopback, a real MLflow store.

The canary's state is written by ``evaluation.canary`` exactly as `stemma run canary`
writes it; the endpoint reads it from the registered model and routes by the same hash
as batch canary steps.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from stemma.components.evaluation.canary import (
    ABORTED,
    read_state,
    start_state,
    write_state,
)
from stemma.components.registry.routing import route_to_challenger
from stemma.components.spec import EvaluateSpec
from tests.components.serving.test_endpoint import (
    ID,
    MODEL,
    expected_scores,
    metric_samples,
    records,
    serving,
)

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

#: Entities routed, and rows per request.
ENTITIES = 20_000
ROWS_PER_REQUEST = 1000


@pytest.fixture
def canary(registry) -> Iterator[dict]:
    """A canary of v2 against v1 at its first step (5%), as `stemma run canary` records it."""
    client = registry["client"]
    versions = registry["versions"]
    settings = EvaluateSpec.model_validate({"canary": {"steps": [0.05, 0.5, 1.0]}})
    before = read_state(client, MODEL)
    state = write_state(
        client,
        start_state(
            MODEL,
            versions["v2"],
            versions["v1"],
            settings,
            revision=before.revision if before is not None else 0,
        ),
    )
    try:
        yield {"state": state}
    finally:
        current = read_state(client, MODEL)
        if current is not None and not current.ended:
            from dataclasses import replace

            write_state(client, replace(current, status=ABORTED, cause="test over"))


def entity_rows(registry: dict, count: int) -> pd.DataFrame:
    """``count`` rows of real feature values with distinct ids 1..count."""
    base = registry["rows"]
    frame = base.iloc[np.arange(count) % len(base)].reset_index(drop=True)
    frame[ID] = np.arange(1, count + 1, dtype=np.int64)
    return frame


def routed_ids(client: httpx.Client, frame: pd.DataFrame) -> tuple[set[int], list[dict]]:
    """The ids the endpoint answered with the canary, over all of ``frame``."""
    canary: set[int] = set()
    results: list[dict] = []
    for start in range(0, len(frame), ROWS_PER_REQUEST):
        part = frame.iloc[start : start + ROWS_PER_REQUEST]
        response = client.post("/v1/predict", json=records(part))
        assert response.status_code == 200, response.text
        for result in response.json()["results"]:
            results.append(result)
            if result["variant"] == "canary":
                canary.add(result["id"])
    return canary, results


def wait_for(client: httpx.Client, key: str, present: bool = True, limit_s: float = 20) -> dict:
    deadline = time.monotonic() + limit_s
    while (key in (ready := client.get("/ready").json())) != present:
        assert time.monotonic() < deadline, f"/ready never {'showed' if present else 'lost'} {key}"
        time.sleep(0.05)
    return ready


LIMITS = ["endpoint.max_rows_per_request=1000", "endpoint.poll_s=0.2"]


def test_a_canary_share_routes_the_same_ids_on_two_replicas_and_after_a_restart(registry, canary):
    frame = entity_rows(registry, ENTITIES)
    salt = canary["state"].salt
    expected = set(frame[ID][route_to_challenger(frame[ID].to_numpy(), 0.05, salt)].tolist())
    with ExitStack() as replicas:
        first = replicas.enter_context(serving(registry, *LIMITS))
        second = replicas.enter_context(serving(registry, *LIMITS))
        for replica in (first, second):
            ready = wait_for(replica, "canary")
            assert ready["canary"]["version"] == registry["versions"]["v2"]
            assert ready["canary"]["fraction"] == 0.05
        on_first, results = routed_ids(first, frame)
        on_second, _ = routed_ids(second, frame)
    with serving(registry, *LIMITS) as restarted:
        wait_for(restarted, "canary")
        after_restart, _ = routed_ids(restarted, frame)
    share = len(on_first) / ENTITIES
    print(f"canary share {share:.4f} of {ENTITIES} ids (target 0.05 ± 0.01)")
    assert 0.04 <= share <= 0.06
    assert on_first == expected
    assert on_second == on_first and after_restart == on_first
    # Each arm's rows carry its version, and the canary's scores are the challenger's own.
    versions = registry["versions"]
    by_variant = {r["variant"]: r["version"] for r in results}
    assert by_variant == {"champion": versions["v1"], "canary": versions["v2"]}
    sample = frame[frame[ID].isin(sorted(on_first)[:50])]
    want = expected_scores(registry, versions["v2"], sample.drop(columns=[ID]))
    got = {r["id"]: r["score"] for r in results if r["id"] in set(sample[ID])}
    assert np.allclose([got[i] for i in sample[ID]], want, rtol=1e-5, atol=1e-6)


def test_the_entity_header_routes_rows_without_ids_and_the_variant_is_a_header(registry, canary):
    salt = canary["state"].salt
    names = [f"customer-{n}" for n in range(400)]
    wanted = dict(zip(names, route_to_challenger(np.array(names), 0.05, salt), strict=True))
    row = records(registry["rows"].drop(columns=[ID]).head(1))[0]
    with serving(registry, *LIMITS) as client:
        wait_for(client, "canary")
        seen = {}
        for name in names:
            response = client.post("/v1/predict", json=row, headers={"X-Stemma-Entity-Id": name})
            assert response.status_code == 200
            seen[name] = response.headers["X-Stemma-Variant"] == "canary"
            assert response.json()["variant"] == response.headers["X-Stemma-Variant"]
        # No id and no header: the champion answers.
        plain = client.post("/v1/predict", json=row)
    assert seen == {name: bool(flag) for name, flag in wanted.items()}
    assert any(seen.values()) and not all(seen.values())
    assert plain.headers["X-Stemma-Variant"] == "champion"
    assert plain.headers["X-Stemma-Model-Version"] == registry["versions"]["v1"]


def test_a_request_split_between_arms_names_both_and_an_ended_canary_stops_routing(
    registry, canary
):
    client_registry = registry["client"]
    frame = entity_rows(registry, 200)
    with serving(registry, *LIMITS) as client:
        wait_for(client, "canary")
        response = client.post("/v1/predict", json=records(frame))
        body = response.json()
        assert body["variant"] == "champion, canary"
        assert response.headers["X-Stemma-Variant"] == "champion, canary"
        assert set(body["version"].split(", ")) == set(registry["versions"].values()) - {
            registry["versions"]["v3"]
        }
        from dataclasses import replace

        state = read_state(client_registry, MODEL)
        write_state(client_registry, replace(state, status=ABORTED, cause="ended by hand"))
        wait_for(client, "canary", present=False)
        after = client.post("/v1/predict", json=records(frame)).json()
        samples = metric_samples(client)
    assert {r["variant"] for r in after["results"]} == {"champion"}
    scored = {
        (s.labels["variant"], s.labels["version"]): s.value
        for s in samples["stemma_endpoint_rows"]
        if s.labels["outcome"] == "scored" and s.name.endswith("_total")
    }
    assert scored[("canary", registry["versions"]["v2"])] >= 1


def test_the_shadow_scores_sampled_requests_after_answering_and_drops_under_overload(
    registry, tmp_path
):
    client_registry = registry["client"]
    client_registry.set_registered_model_alias(MODEL, "challenger", registry["versions"]["v2"])
    row = records(registry["rows"].head(1))
    log = registry["root"] / "outputs" / tmp_path.name
    try:
        with serving(
            registry,
            *LIMITS,
            "endpoint.shadow.sample=1.0",
            "endpoint.shadow.max_queue_rows=8",
            f"endpoint.log.path=outputs/{tmp_path.name}",
        ) as client:
            ready = wait_for(client, "shadow")
            assert ready["shadow"]["version"] == registry["versions"]["v2"]
            # Calm (a request every few ms): each is shadowed once the model is quiet.
            for _ in range(20):
                assert client.post("/v1/predict", json=row).status_code == 200
                time.sleep(0.01)
            deadline = time.monotonic() + 10
            while shadow_rows(client).get("scored", 0) < 20:
                assert time.monotonic() < deadline, shadow_rows(client)
                time.sleep(0.05)
            # Overload: many senders keep the model busy, the shadow's queue fills and sheds.
            statuses = flood(client, row, senders=16, seconds=2.0)
            counts = shadow_rows(client)
    finally:
        client_registry.delete_registered_model_alias(MODEL, "challenger")
    assert set(statuses) <= {200, 503} and statuses.count(200) > 0
    assert counts.get("dropped", 0) > 0, counts
    print(f"shadow rows under overload: {counts}; answers {len(statuses)}")
    # The log pairs each shadow score with the answer of the same request and row.
    served = pq.read_table(log / "predictions").to_pandas()
    shadowed = pq.read_table(log / "shadow").to_pandas()
    assert len(shadowed) >= counts["scored"]  # the queue drains until the endpoint stops
    assert set(shadowed["stemma_variant"]) == {"shadow"}
    assert set(shadowed["stemma_model_version"]) == {registry["versions"]["v2"]}
    assert set(served["stemma_model_version"]) == {registry["versions"]["v1"]}
    pairs = shadowed.merge(served, on=["stemma_request_id", "stemma_row"], suffixes=("_s", ""))
    assert len(pairs) == len(shadowed)
    assert (pairs["score_s"] != pairs["score"]).any()  # another model's scores


def shadow_rows(client: httpx.Client) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for s in metric_samples(client).get("stemma_endpoint_shadow_rows", [])
        if s.name.endswith("_total")
    }


def flood(client: httpx.Client, row: list[dict], *, senders: int, seconds: float) -> list[int]:
    """Send from ``senders`` threads for ``seconds``: every status seen."""
    statuses: list[int] = []
    stop = time.monotonic() + seconds
    body = json.dumps(row)

    def send() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as own:
            while time.monotonic() < stop:
                statuses.append(
                    own.post(
                        "/v1/predict", content=body, headers={"content-type": "application/json"}
                    ).status_code
                )

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses
