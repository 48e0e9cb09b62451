"""The logged pyfunc model: logged from code, loaded without pickle, scoring raw rows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from stemma.components.errors import DataError
from stemma.components.model.artifact import log_pyfunc_model
from stemma.components.model.networks import build_network, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.spec import FeaturesSpec, ModelSpec
from stemma.components.training.loop import predict_raw
from tests.support import isolated_mlflow, log_trained_model

FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["elevel", "car"])
ROWS = 64


def synthetic_frame(rows: int, seed: int) -> pd.DataFrame:
    """Raw rows as they arrive: float and int numerics, int and string categories."""
    rng = np.random.default_rng(seed)
    salary = rng.uniform(20_000, 150_000, rows)
    return pd.DataFrame(
        {
            "application_id": np.arange(rows),
            "salary": salary,
            "age": rng.integers(18, 80, rows),
            "elevel": rng.integers(0, 5, rows),
            "car": rng.choice(["sedan", "van", "coupe"], rows),
            "approved": (salary > 80_000).astype(np.int64),
            "price": salary / 10 + rng.normal(0, 100, rows),
        }
    )


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory):
    """One local store for the module (logging a model costs ~1 s); URIs restored after."""
    root = tmp_path_factory.mktemp("serving")
    with isolated_mlflow():
        uri = configure_tracking(root)
        yield root, uri, ensure_experiment("serving", root)


def log_model(tracking, task: str, tmp: Path):
    _, _, experiment_id = tracking
    frame = synthetic_frame(ROWS, seed=1)
    target = "approved" if task == "binary" else "price"
    return log_trained_model(
        frame,
        FEATURES,
        task=task,
        target=target,
        experiment_id=experiment_id,
        workdir=tmp / f"model-{task}",
        seed=3,
    )


@pytest.fixture(scope="module")
def binary_model(tracking, tmp_path_factory):
    return log_model(tracking, "binary", tmp_path_factory.mktemp("work"))


def expected_scores(preprocessor, network, frame: pd.DataFrame) -> np.ndarray:
    return preprocessor.decode_output(predict_raw(network, preprocessor.transform(frame)))


def test_loaded_model_scores_raw_rows_like_the_trained_network(binary_model):
    preprocessor, network, info, _, _ = binary_model
    rows = synthetic_frame(20, seed=2)  # carries id, target and another extra column

    output = mlflow.pyfunc.load_model(info.model_uri).predict(rows)

    assert list(output.columns) == ["score", "prediction"]
    scores = expected_scores(preprocessor, network, rows)
    np.testing.assert_allclose(output["score"].to_numpy(), scores, rtol=1e-6)
    assert output["prediction"].dtype == np.int64
    np.testing.assert_array_equal(output["prediction"].to_numpy(), (scores >= 0.5).astype(int))
    assert ((output["score"] > 0) & (output["score"] < 1)).all()


def test_regression_model_returns_values_in_target_units(tracking, tmp_path):
    preprocessor, network, info, _, _ = log_model(tracking, "regression", tmp_path)
    rows = synthetic_frame(10, seed=4)

    output = mlflow.pyfunc.load_model(info.model_uri).predict(rows)

    assert list(output.columns) == ["score"]
    np.testing.assert_allclose(
        output["score"].to_numpy(), expected_scores(preprocessor, network, rows), rtol=1e-6
    )
    signature_outputs = [spec.name for spec in info.signature.outputs]
    assert signature_outputs == ["score"]


def test_model_loads_without_pickle_in_a_fresh_process(binary_model, tracking, tmp_path):
    _, _, info, _, _ = binary_model
    _, uri, _ = tracking
    rows = synthetic_frame(20, seed=2)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "rows = pd.read_csv('rows.csv')\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1], suppress_warnings=True)\n"
        "scores = model.predict(rows).to_dict(orient='list')\n"
        "open('scores.json', 'w').write(json.dumps(scores))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}

    done = subprocess.run(
        [sys.executable, "-c", script, info.model_uri],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads((tmp_path / "scores.json").read_text())
    here = mlflow.pyfunc.load_model(info.model_uri).predict(rows)
    np.testing.assert_allclose(fresh["score"], here["score"].to_numpy(), rtol=1e-9)
    assert fresh["prediction"] == here["prediction"].tolist()


def test_model_folder_holds_plain_files_and_no_pickle(binary_model, tmp_path):
    _, _, info, sha256, _ = binary_model

    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))

    names = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert not [name for name in names if name.endswith((".pkl", ".pickle"))], names
    assert {"serving.py", "MLmodel", "requirements.txt"} <= names
    weights = folder / "artifacts" / "weights.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == sha256
    network = json.loads((folder / "artifacts" / "network.json").read_text())
    assert network["task"] == "binary"
    assert network["threshold"] == 0.5
    assert network["n_outputs"] == 1
    requirements = (folder / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements
    assert {r.split("==")[0] for r in requirements} == {
        "torch",
        "mlflow",
        "numpy",
        "pandas",
        "safetensors",
    }


def test_logged_model_records_weights_hash_and_feature_signature(binary_model):
    _, _, info, sha256, run_id = binary_model

    logged = MlflowClient().get_logged_model(info.model_id)

    assert logged.source_run_id == run_id
    assert logged.tags["stemma.weights_sha256"] == sha256
    inputs = {spec.name: spec.type.name for spec in info.signature.inputs}
    assert inputs == {"salary": "double", "age": "long", "elevel": "long", "car": "string"}


def test_signature_rejects_rows_missing_a_feature(binary_model):
    _, _, info, _, _ = binary_model
    rows = synthetic_frame(5, seed=2).drop(columns=["car"])

    with pytest.raises(MlflowException, match=r"Model is missing inputs \['car'\]"):
        mlflow.pyfunc.load_model(info.model_uri).predict(rows)


def test_log_pyfunc_model_requires_the_features_in_the_example(tracking, tmp_path):
    _, _, experiment_id = tracking
    frame = synthetic_frame(ROWS, seed=1)
    preprocessor = fit_preprocessor(frame, FEATURES, task="binary", target="approved")
    config = network_config(ModelSpec(hidden=[4]))
    network = build_network(config, preprocessor.n_inputs, seed=0)

    with (
        mlflow.start_run(experiment_id=experiment_id),
        pytest.raises(DataError, match="lacks feature columns: age"),
    ):
        log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame.drop(columns=["age"]),
            task="binary",
            workdir=tmp_path,
        )
