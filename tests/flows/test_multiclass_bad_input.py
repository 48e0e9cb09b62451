"""Bad multiclass and label-map input to training: each is one clear error naming the
labels, and nothing is registered. Real git, DVC, MLflow and Prefect."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from dvc.repo import Repo
from sklearn import datasets

from stemma.components.errors import DataError
from tests.support import dvc_add, git

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

NAMES = {0: "setosa", 1: "versicolor", 2: "virginica"}


def iris_project(root: Path, name: str, data: dict, change=None) -> Path:
    """A project on iris with the species as text labels; ``change`` edits the table."""
    frame = datasets.load_iris(as_frame=True).frame
    frame.columns = ["sepal_length", "sepal_width", "petal_length", "petal_width", "target"]
    frame["target"] = frame["target"].map(NAMES)
    frame.insert(0, "flower_id", range(len(frame)))
    if change is not None:
        frame = change(frame)
    root.mkdir(parents=True)
    git(root, "init", "-q")
    Repo.init(str(root))
    (root / "data").mkdir()
    frame.to_parquet(root / "data" / "iris.parquet", index=False)
    dvc_add(root)
    spec = {
        "pipeline": {"name": name},
        "data": {
            "path": "data/iris.parquet",
            "target": "target",
            "id": "flower_id",
            "features": {"numeric": list(frame.columns[1:5])},
            **data,
        },
        "train": {"epochs": 2},
        "gate": {"metric": "accuracy"},
    }
    (root / "configs").mkdir()
    config = root / "configs" / f"{name}.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return config


@pytest.mark.parametrize(
    ("name", "data", "change", "message"),
    [
        (
            "unmapped-labels",
            {"task": "multiclass", "labels": {"setosa": "s", "versicolor": "v"}},
            None,
            "holds labels data.labels does not map: 'virginica'",
        ),
        (
            "label-outside-classes",
            {"task": "multiclass", "classes": ["setosa", "versicolor"]},
            None,
            "holds labels not in data.classes: 'virginica'",
        ),
        (
            "one-class",
            {"task": "multiclass"},
            lambda frame: frame.assign(target="setosa"),
            "has only one class",
        ),
        (
            "binary-text-without-map",
            {"task": "binary"},
            lambda frame: frame[frame["target"] != "setosa"],
            "must hold 0/1",
        ),
    ],
    ids=["unmapped-labels", "label-outside-classes", "one-class", "binary-text-without-map"],
)
def test_bad_labels_stop_training_with_one_clear_error_and_register_nothing(
    tmp_path, name, data, change, message
):
    from stemma.flows.train import train_flow

    config = iris_project(tmp_path / "project", f"bad-{name}", data, change)
    with pytest.raises(DataError) as raised:
        train_flow(config=str(config))
    assert message in str(raised.value)
    client = mlflow.MlflowClient()
    assert client.search_model_versions(f"name='bad-{name}'") == []


def test_a_binary_text_target_trains_through_its_label_map(tmp_path):
    """Two iris species as yes/no text: the label map makes it a binary task."""
    from stemma.flows.train import train_flow

    config = iris_project(
        tmp_path / "project",
        "mapped-binary",
        {"task": "binary", "labels": {"yes": 1, "no": 0}},
        lambda frame: frame[frame["target"] != "setosa"].assign(
            target=lambda f: f["target"].map({"virginica": "yes", "versicolor": "no"})
        ),
    )
    result = train_flow(
        config=str(config), overrides=["train.epochs=20", "train.learning_rate=0.02"]
    )
    assert result["gate"]["passed"], result["gate"]
    model = mlflow.pyfunc.load_model("models:/mapped-binary/1")
    assert model.metadata.signature.outputs.input_names() == ["score", "prediction"]
