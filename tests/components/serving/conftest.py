"""The serving tests' projects, each trained once for the session: one credit model
(2 epochs), a second version of other weights for the alias to move to, and a third whose
weights are then changed in the artifact store, which the endpoint must refuse; and a
multiclass model of sklearn's wine with text classes and a label map."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from stemma.components.platform.tags import WEIGHTS_SHA256
from stemma.components.spec import load_spec
from tests.support import WINE_CLASSES, build_multiclass_project, log_trained_model

MODEL = "endpoint"
NAMES = [f"pipeline.name={MODEL}", f"pipeline.model_name={MODEL}"]
TRAIN = ["train.epochs=2", "train.early_stopping=null", "train.batch_size=256"]
ID = "application_id"
#: The multiclass model: its registered name, and the overrides of its spec.
WINE_MODEL = "endpoint-wine"
WINE_ID = "wine_id"
WINE_TARGET = "cultivar"
#: Raw labels a second system sends (codes), mapped to the classes beside the classes
#: themselves, which the training rows hold.
WINE_CODES = {"B1": "barolo", "G2": "grignolino", "B3": "barbera"}
#: The label map: each class to itself (the training rows hold the classes), and the codes.
WINE_LABELS = {**{name: name for name in WINE_CLASSES}, **WINE_CODES}
WINE_OVERRIDES = [
    f"pipeline.name={WINE_MODEL}",
    f"pipeline.model_name={WINE_MODEL}",
    "data.labels={" + ", ".join(f"{raw}: {name}" for raw, name in WINE_LABELS.items()) + "}",
]


@pytest.fixture(scope="session")
def registry(template_project, tmp_path_factory, prefect_api, mlflow_uri) -> dict:
    """The project, with v1 trained (@champion), v2 (other weights) and v3 (tampered)."""
    from stemma.flows.train import train_flow

    root = tmp_path_factory.mktemp("endpoint") / "project"
    shutil.copytree(template_project, root, symlinks=True)
    config = root / "configs" / "credit.yaml"
    train_flow(config=str(config), overrides=[*TRAIN, *NAMES])
    client = MlflowClient()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    spec = load_spec(config, NAMES).spec
    frame = pd.read_parquet(root / "data" / "credit" / "train.parquet").head(300)
    experiment = client.get_run(champion.run_id).info.experiment_id
    versions = {"v1": str(champion.version)}
    for key, seed in (("v2", 11), ("v3", 12)):
        _, _, info, sha256, run_id = log_trained_model(
            frame,
            spec.data.features,
            task="binary",
            target="approved",
            experiment_id=experiment,
            workdir=tmp_path_factory.mktemp(key),
            hidden=(16,),
            seed=seed,
        )
        version = client.create_model_version(
            MODEL,
            info.model_uri,
            run_id=run_id,
            model_id=info.model_id,
            tags={WEIGHTS_SHA256: sha256},
        )
        versions[key] = str(version.version)
    weights = next(
        Path(
            client.get_model_version_download_uri(MODEL, versions["v3"]).removeprefix("file://")
        ).rglob("*.safetensors")
    )
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    batch = sorted((root / "data" / "credit" / "batches").glob("*.parquet"))[0]
    rows = pd.read_parquet(batch).drop(columns=["applied_at"]).head(40)
    return {"root": root, "config": config, "client": client, "versions": versions, "rows": rows}


@pytest.fixture(scope="session")
def wine_registry(tmp_path_factory, prefect_api, mlflow_uri) -> dict:
    """A multiclass project (sklearn's wine, text classes, ``data.labels`` mapping codes to
    them) trained by the train flow, its model @champion (``version``), a second version of
    other (seeded) weights and the same classes (``other``); rows of a batch to score."""
    from stemma.flows.train import train_flow

    root = build_multiclass_project(tmp_path_factory.mktemp("endpoint-wine") / "project")
    config = root / "configs" / "wine.yaml"
    train_flow(config=str(config), overrides=WINE_OVERRIDES)
    client = MlflowClient()
    champion = client.get_model_version_by_alias(WINE_MODEL, "champion")
    spec = load_spec(config, WINE_OVERRIDES).spec
    frame = pd.read_parquet(root / "data" / "wine" / "train.parquet")
    _, _, info, sha256, run_id = log_trained_model(
        frame,
        spec.data.features,
        task="multiclass",
        target=WINE_TARGET,
        experiment_id=client.get_run(champion.run_id).info.experiment_id,
        workdir=tmp_path_factory.mktemp("endpoint-wine-v2"),
    )
    other = client.create_model_version(
        WINE_MODEL,
        info.model_uri,
        run_id=run_id,
        model_id=info.model_id,
        tags={WEIGHTS_SHA256: sha256},
    )
    rows = pd.read_parquet(root / "data" / "wine" / "batches" / "day_01.parquet").head(40)
    return {
        "root": root,
        "config": config,
        "client": client,
        "version": str(champion.version),
        "other": str(other.version),
        "rows": rows,
    }
