"""The model artifact: its files, their manifest, its tags, against a real MLflow on SQLite."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.model import networks as models
from stemma.components.model.artifact import (
    RUNTIME_BACKEND_TAG,
    decode_manifest,
    integrity_tags,
    log_pyfunc_model,
    model_file_digests,
)
from stemma.components.model.networks import build_network
from stemma.components.model.preprocessing import fit_preprocessor
from stemma.components.monitoring.profile import save_with_model
from stemma.components.platform import tags as tag_names
from stemma.components.spec import FeaturesSpec

ARCHITECTURE_TAG = tag_names.ARCHITECTURE_SHA256
MODEL_FILES_TAG = tag_names.MODEL_FILES


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "salary": [50_000.0, 72_500.5, 31_000.0],
            "elevel": [1, 3, 0],
            "car": ["a", "b", "a"],
            "approved": [1, 0, 1],
        }
    )


def test_a_logged_model_records_every_file_and_a_custom_architecture(tracking, tmp_path, frame):
    """The manifest covers the folder the store holds, the profile added later included."""
    preprocessor = fit_preprocessor(
        frame,
        FeaturesSpec(numeric=["salary"], categorical=["car"]),
        task="binary",
        target="approved",
    )
    config = {"architecture": "stemma.components.model.networks:MLP", "params": {"hidden": [4]}}
    network = build_network(config, preprocessor.n_inputs)
    client = MlflowClient()
    with mlflow.start_run() as run:
        info, _ = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame,
            task="binary",
            workdir=tmp_path / "model",
        )
        profile = tmp_path / "reference_profile.json"
        profile.write_text("{}")
        save_with_model(client, info.model_id, profile, "0" * 64)

    tags = client.get_logged_model(info.model_id).tags
    manifest = decode_manifest(tags[MODEL_FILES_TAG])
    folder = Path(client.get_logged_model(info.model_id).artifact_location.removeprefix("file://"))
    assert manifest == model_file_digests(folder)
    assert {"serving.py", "MLmodel", "reference_profile.json"} <= set(manifest)
    assert any(path.endswith("network.onnx") for path in manifest), "the graph is hashed too"
    assert tags[RUNTIME_BACKEND_TAG] == "onnxruntime"
    assert integrity_tags(client, info.model_id)[RUNTIME_BACKEND_TAG] == "onnxruntime"
    source = Path(models.__file__).read_bytes()

    assert tags[ARCHITECTURE_TAG] == hashlib.sha256(source).hexdigest()
    assert client.get_run(run.info.run_id).data.tags[ARCHITECTURE_TAG] == tags[ARCHITECTURE_TAG]
