"""The compress flow beyond the worked example: a multiclass table (scikit-learn's wine) and
the user's own network, pruned through its traced graph and carried with the model; and a
second compress run that reproduces the first one's variants weight for weight."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from stemma.components.runtime.loading import load_scoring_model
from tests.support import build_multiclass_project, git

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

TOWER = '''
from torch import nn
from torch.nn import functional as F


class Tower(nn.Module):
    """Two GELU layers as plain attributes (no Sequential): fx finds the Linear chain."""

    def __init__(self, n_inputs, n_outputs, width=24):
        super().__init__()
        self.inner = nn.Linear(n_inputs, width)
        self.middle = nn.Linear(width, width)
        self.outer = nn.Linear(width, n_outputs)

    def forward(self, x):
        return self.outer(F.gelu(self.middle(F.gelu(self.inner(x)))))
'''
OVERRIDES = [
    "model.architecture=towers:Tower",
    "model.params={width: 24}",
    "train.epochs=40",
    "compress.min_speedup=0.01",
    "compress.max_metric_drop=0.2",
    "compress.prune.amount=0.5",
    "compress.prune.finetune_epochs=5",
    "compress.distill.student.hidden=[8]",
    "compress.distill.epochs=40",
]


@pytest.fixture(scope="module")
def wine(tmp_path_factory) -> dict:
    """The wine project with its own network, trained and compressed once."""
    from stemma.flows.compress import compress_flow
    from stemma.flows.train import train_flow

    root = build_multiclass_project(tmp_path_factory.mktemp("wine") / "project")
    (root / "towers.py").write_text(TOWER, encoding="utf-8")
    git(root, "add", "towers.py")
    git(root, "commit", "-q", "-m", "the network")
    config = str(root / "configs" / "wine.yaml")
    train_flow(config=config, overrides=OVERRIDES)
    summary = compress_flow(config=config, overrides=OVERRIDES)
    return {"root": root, "config": config, "summary": summary}


def test_a_custom_multiclass_network_is_pruned_and_distilled(wine):
    summary = wine["summary"]
    variants = {v["method"]: v for v in summary["variants"]}
    assert summary["metric"] == "accuracy"
    assert {m: v["status"] for m, v in variants.items()} == {"prune": "passed", "distill": "passed"}
    client = mlflow.MlflowClient()
    architectures = ["towers:Tower"]
    pruned = load_scoring_model(
        f"models:/wine/{variants['prune']['version']}", client=client, architectures=architectures
    )
    # the user's class, its inner Linears narrowed to half their units
    assert type(pruned.network).__name__ == "Tower"
    assert pruned.network_config["pruned"] == {
        "inner": [12, 13],
        "middle": [12, 12],
        "outer": [3, 12],
    }
    assert pruned.network.inner.out_features == 12
    student = load_scoring_model(f"models:/wine/{variants['distill']['version']}", client=client)
    assert student.network_config["architecture"] == "mlp"
    assert student.network_config["hidden"] == [8]
    assert student.preprocessor.class_names() == pruned.preprocessor.class_names()


def test_the_pruned_custom_network_predicts_through_mlflow_with_its_code(wine, tmp_path):
    summary = wine["summary"]
    number = {v["method"]: v for v in summary["variants"]}["prune"]["version"]
    frame = pd.read_parquet(wine["root"] / "data" / "wine" / "train.parquet").head(30)
    model = mlflow.pyfunc.load_model(f"models:/wine/{number}", suppress_warnings=True)
    answer = model.predict(frame.drop(columns="cultivar"))
    assert {"barolo", "grignolino", "barbera"} >= set(answer["prediction"])
    probabilities = answer[[f"probability_{c}" for c in ("barolo", "grignolino", "barbera")]]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (answer["prediction"] == frame["cultivar"]).mean() > 0.8


def test_compressing_again_reproduces_the_variants_weight_for_weight(wine):
    from stemma.flows.compress import compress_flow

    client = mlflow.MlflowClient()
    first = {v["method"]: v for v in wine["summary"]["variants"]}
    again = compress_flow(config=wine["config"], overrides=OVERRIDES)
    second = {v["method"]: v for v in again["variants"]}
    versions = {v.version for v in client.search_model_versions("name = 'wine'")}
    for method in ("prune", "distill"):
        # the same weights again: the version the first run registered is reused, not copied
        assert second[method]["existing"] is True
        assert second[method]["version"] == first[method]["version"]
        assert any("already holds these weights" in note for note in second[method]["notes"])
        assert second[method]["value"] == first[method]["value"]
        aliases = client.get_registered_model("wine").aliases
        assert str(aliases[f"v1-{method}"]) == first[method]["version"]
    assert not [v for v in versions if int(v) > int(second["distill"]["version"])]
    assert again["compared"] is not None
