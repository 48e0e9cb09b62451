"""`stemma endpoint` as a user runs it, on a model that is not the credit example: a
regression on scikit-learn's diabetes table, with a text category, in a store of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.datasets import load_diabetes

from stemma.components.platform.tags import WEIGHTS_SHA256
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.runtime.loading import load_scoring_model
from stemma.components.spec import load_spec
from tests.support import isolated_mlflow, log_trained_model

SPEC = """
pipeline: {name: diabetes}
data:
  path: data/diabetes.parquet
  task: regression
  target: progression
  id: patient
  features: {numeric: [age, bmi, bp, s1], categorical: [sex]}
gate: {metric: rmse}
endpoint: {port: 0, max_wait_ms: 1}
"""


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory) -> dict:
    """The project, its spec and a registered regression model @champion, in its own store."""
    root = tmp_path_factory.mktemp("diabetes")
    table = load_diabetes(as_frame=True).frame
    frame = pd.DataFrame(
        {
            "patient": np.arange(len(table)),
            "age": table["age"],
            "bmi": table["bmi"],
            "bp": table["bp"],
            "s1": table["s1"],
            "sex": np.where(table["sex"] > 0, "m", "f"),
            "progression": table["target"],
        }
    )
    (root / "data").mkdir()
    frame.to_parquet(root / "data" / "diabetes.parquet", index=False)
    (root / "data.dvc").write_text("outs: []\n")
    config = root / "diabetes.yaml"
    config.write_text(SPEC)
    spec = load_spec(config).spec
    with isolated_mlflow():
        uri = configure_tracking(root)
        experiment = ensure_experiment("diabetes", root)
        _, _, info, sha256, run_id = log_trained_model(
            frame,
            spec.data.features,
            task="regression",
            target="progression",
            experiment_id=experiment,
            workdir=root / "model",
        )
        client = MlflowClient()
        client.create_registered_model("diabetes")
        version = client.create_model_version(
            "diabetes",
            info.model_uri,
            run_id=run_id,
            model_id=info.model_id,
            tags={WEIGHTS_SHA256: sha256},
        )
        client.set_registered_model_alias("diabetes", "champion", version.version)
        model = load_scoring_model("models:/diabetes@champion", client=client)
    rows = frame.head(6)
    expected = model.preprocessor.decode_output(
        model.runtime.run(model.preprocessor.transform(rows))
    )
    return {"root": root, "config": config, "uri": uri, "rows": rows, "expected": expected}


def start(stemma_exe: list[str], config: Path, uri: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen(
        [*stemma_exe, "endpoint", str(config), *args],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a child of the test process would inherit an ignored SIGINT (NOTES.md)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_the_endpoint_command_serves_a_regression_model_and_stops_cleanly(stemma_exe, diabetes):
    process = start(stemma_exe, diabetes["config"], diabetes["uri"], "--host", "127.0.0.1")
    try:
        assert process.stdout is not None
        headline = process.stdout.readline()
        assert headline.startswith("serving diabetes v1 (models:/diabetes@champion"), headline
        url = process.stdout.readline().split()[0].removesuffix("/v1/predict")
        assert url.startswith("http://127.0.0.1:")
        rows = json.loads(diabetes["rows"].drop(columns=["progression"]).to_json(orient="records"))
        response = httpx.post(f"{url}/v1/predict", json=rows, timeout=30)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        np.testing.assert_allclose([r["score"] for r in results], diabetes["expected"], rtol=1e-5)
        assert [r["id"] for r in results] == list(range(6))
        assert all(r.get("prediction") is None for r in results)  # a regression has no class
        wrong = httpx.post(f"{url}/v1/predict", json=[{**rows[0], "sex": 1}], timeout=30)
        assert wrong.status_code == 422
        assert "column sex is int64, the model needs string" in wrong.json()["details"]
        assert httpx.get(f"{url}/ready", timeout=30).json()["version"] == "1"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode in (0, 143), err
    assert "Traceback" not in err


def test_the_endpoint_command_without_the_alias_fails_in_one_screen(stemma_exe, diabetes):
    started = time.monotonic()
    process = start(
        stemma_exe, diabetes["config"], diabetes["uri"], "--set", "endpoint.alias=canary"
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 5, err
    assert "error: model 'diabetes' has no alias 'canary'" in err
    assert "its aliases: champion -> v1" in err
    assert "Traceback" not in err and not out
    assert time.monotonic() - started < 60
