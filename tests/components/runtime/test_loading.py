"""Loading a registered model builds its runtime: ONNX Runtime on its verified network.onnx,
else eager with the reason; a changed graph is refused, a corrupted one is a clear error."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from stemma.components.model.artifact import (
    RUNTIME_BACKEND_TAG,
    RUNTIME_REASON_TAG,
    encode_manifest,
    integrity_tags,
    log_pyfunc_model,
    record_model_files,
)
from stemma.components.model.networks import MLP, network_config
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.platform.tags import MODEL_FILES
from stemma.components.platform.tracking import configure_tracking, ensure_experiment
from stemma.components.runtime.backends import OnnxFileError
from stemma.components.runtime.loading import UntrustedModelError, load_scoring_model
from stemma.components.spec import FeaturesSpec, ModelSpec
from tests.components.runtime.networks import BranchyMLP
from tests.support import isolated_mlflow

FEATURES = FeaturesSpec(numeric=["salary", "age"], categorical=["car"])
NAME = "runtime-credit"


def frame(rows: int = 200, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "salary": rng.uniform(20_000, 150_000, rows),
            "age": rng.integers(18, 80, rows),
            "car": rng.choice(["a", "b", "c"], rows),
            "approved": rng.integers(0, 2, rows),
        }
    )


@pytest.fixture
def store(tmp_path: Path):
    with isolated_mlflow():
        configure_tracking(tmp_path)
        experiment_id = ensure_experiment("runtime", tmp_path)
        yield {"client": MlflowClient(), "experiment_id": experiment_id, "root": tmp_path}


def rerecord(store, logged: dict) -> None:
    """Record the model folder's files as they are now, as if they had been logged so."""
    digests = record_model_files(store["client"], logged["info"].model_id)
    store["client"].set_model_version_tag(NAME, "1", MODEL_FILES, encode_manifest(digests))


def register(store, network_class=MLP) -> dict:
    """Log a seeded network as a model and register it as version 1 of NAME."""
    rows = frame()
    preprocessor = fit_preprocessor(rows, FEATURES, task="binary", target="approved")
    config = network_config(ModelSpec(hidden=[16, 8], dropout=0.0))
    torch.manual_seed(11)
    network = network_class(preprocessor.n_inputs, hidden=(16, 8), dropout=0.0).eval()
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        info, _ = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=rows,
            task="binary",
            workdir=store["root"] / "model",
        )
    client = store["client"]
    client.create_registered_model(NAME)
    client.create_model_version(
        NAME,
        source=info.model_uri,
        run_id=run.info.run_id,
        model_id=info.model_id,
        tags=integrity_tags(client, info.model_id),
    )
    folder = Path(client.get_logged_model(info.model_id).artifact_location.removeprefix("file://"))
    return {"info": info, "network": network, "rows": rows, "pre": preprocessor, "folder": folder}


def expected_outputs(logged: dict) -> np.ndarray:
    with torch.inference_mode():
        matrix = torch.from_numpy(logged["pre"].transform(logged["rows"]))
        return logged["network"](matrix).numpy()


def test_a_model_with_its_graph_runs_on_onnxruntime(store):
    logged = register(store)
    version = store["client"].get_model_version(NAME, "1")
    assert version.tags[RUNTIME_BACKEND_TAG] == "onnxruntime"

    model = load_scoring_model(f"models:/{NAME}/1")

    assert (model.runtime.backend, model.runtime.reason) == ("onnxruntime", None)
    found = model.runtime.run(model.preprocessor.transform(logged["rows"]))
    np.testing.assert_allclose(found, expected_outputs(logged), rtol=1e-3, atol=1e-4)
    eager = load_scoring_model(f"models:/{NAME}/1", backend="eager")
    assert eager.runtime.backend == "eager"


def test_a_module_that_cannot_export_is_served_by_eager_with_the_recorded_reason(store):
    register(store, BranchyMLP)
    version = store["client"].get_model_version(NAME, "1")
    assert version.tags[RUNTIME_BACKEND_TAG] == "eager"
    assert version.tags[RUNTIME_REASON_TAG].startswith("does not export to ONNX")

    model = load_scoring_model(f"models:/{NAME}/1")

    assert model.runtime.backend == "eager"
    assert model.runtime.reason == version.tags[RUNTIME_REASON_TAG]


def test_a_changed_onnx_file_is_refused_like_changed_weights(store):
    logged = register(store)
    graph = logged["folder"] / "artifacts" / "network.onnx"
    graph.write_bytes(graph.read_bytes() + b"\x00")

    with pytest.raises(UntrustedModelError) as raised:
        load_scoring_model(f"models:/{NAME}/1")
    assert any(line.startswith("artifacts/network.onnx: changed") for line in raised.value.details)


def test_a_corrupted_onnx_file_is_a_clear_error(store):
    logged = register(store)
    (logged["folder"] / "artifacts" / "network.onnx").write_bytes(b"\x08\x07 not a graph")
    rerecord(store, logged)

    with pytest.raises(OnnxFileError) as raised:
        load_scoring_model(f"models:/{NAME}/1")
    assert raised.value.headline == (f"{NAME} v1: network.onnx: ONNX Runtime cannot load this file")


def test_a_version_logged_without_a_graph_still_loads_and_runs_eager(store):
    logged = register(store)
    (logged["folder"] / "artifacts" / "network.onnx").unlink()
    mlmodel = logged["folder"] / "MLmodel"
    text = mlmodel.read_text()
    mlmodel.write_text(
        "\n".join(line for line in text.splitlines() if "network.onnx" not in line) + "\n"
    )
    rerecord(store, logged)
    client = store["client"]
    client.delete_model_version_tag(NAME, "1", RUNTIME_BACKEND_TAG)  # an older Stemma: no tag
    client.delete_logged_model_tag(logged["info"].model_id, RUNTIME_BACKEND_TAG)

    model = load_scoring_model(f"models:/{NAME}/1")

    assert model.runtime.backend == "eager"
    assert model.runtime.reason and "has no network.onnx" in model.runtime.reason
    found = model.runtime.run(model.preprocessor.transform(logged["rows"]))
    np.testing.assert_array_equal(found, expected_outputs(logged))
