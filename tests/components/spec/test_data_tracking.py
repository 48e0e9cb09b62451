"""`stemma validate` warns when DVC does not track the training data (training would refuse it)."""

from __future__ import annotations

import pytest

from stemma.components.spec.document import data_tracking_problem
from stemma.components.spec.sections import DataSpec


def data_section(path: str) -> DataSpec:
    return DataSpec(path=path, target="y", features={"numeric": ["x"]})


@pytest.mark.parametrize(
    ("files", "path"),
    [
        ({"data.dvc": "outs:\n- md5: 0\n  path: data\n"}, "data/iris.csv"),
        ({"data/iris.csv.dvc": "outs:\n- path: iris.csv\n"}, "data/iris.csv"),
        ({"data/raw.dvc": "outs:\n- path: raw\n"}, "data/raw/wine/train.parquet"),
        (
            {"dvc.yaml": "stages:\n  prep:\n    cmd: x\n    outs:\n    - data/prepared.csv\n"},
            "data/prepared.csv",
        ),
        (
            {
                "dvc.yaml": "stages:\n  prep:\n    cmd: x\n    wdir: data\n    outs:\n    - out: {cache: false}\n"
            },
            "data/out/train.csv",
        ),
    ],
    ids=["root-pointer", "file-pointer", "folder-pointer", "stage-output", "stage-output-wdir"],
)
def test_tracked_data_raises_no_warning(tmp_path, files, path):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert data_tracking_problem(data_section(path), tmp_path) is None


@pytest.mark.parametrize(
    ("files", "path", "fix"),
    [
        ({}, "data/iris.csv", "`dvc add data`"),
        ({"data.dvc": "outs: []\n"}, "data/iris.csv", "`dvc add data`"),
        ({"data.dvc": "outs:\n- path: data/other\n"}, "data/iris.csv", "`dvc add data`"),
        ({"data.dvc": "outs:\n- path: data\n"}, "production/batch.csv", "`dvc add production`"),
        ({"data.dvc": ": not yaml ["}, "train.csv", "`dvc add train.csv`"),
    ],
    ids=["nothing", "empty-pointer", "other-output", "outside-the-output", "broken-pointer"],
)
def test_untracked_data_is_named_with_the_fix(tmp_path, files, path, fix):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    message = data_tracking_problem(data_section(path), tmp_path)
    assert message is not None and message.startswith(f"{path} is not tracked by DVC")
    assert f"fix: {fix}" in message and "stemma run train` will refuse it" in message
