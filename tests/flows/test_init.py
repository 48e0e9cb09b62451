"""`stemma init` as a user runs it: a project from a table, then validate and train as they are."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sklearn import datasets

from stemma.flows.cli import main


def run_cli(stemma_exe, *args, cwd, env=None, timeout=600):
    return subprocess.run(
        [*stemma_exe, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,  # no terminal: nobody to ask
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_table(folder: Path, name: str) -> Path:
    """A scikit-learn table as a user would bring it: text labels where the data has names."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "breast_cancer":
        path = folder / "tumours.csv"
        datasets.load_breast_cancer(as_frame=True).frame.to_csv(path, index=False)
    elif name == "diabetes":
        frame = datasets.load_diabetes(as_frame=True, scaled=False).frame
        frame.insert(0, "patient_id", range(5_000, 5_000 + len(frame)))
        path = folder / "diabetes.parquet"
        frame.to_parquet(path, index=False)
    else:  # wine or iris with the class names as labels
        bunch = getattr(datasets, f"load_{name.removesuffix('_two')}")(as_frame=True)
        frame = bunch.frame.assign(
            target=bunch.frame["target"].map(dict(enumerate(bunch.target_names)))
        )
        if name.endswith("_two"):
            frame = frame[frame["target"] != "setosa"]
        path = folder / f"{name}.csv"
        frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("table", "task", "metric"),
    [("breast_cancer", "binary", "roc_auc"), ("diabetes", "regression", "rmse")],
    ids=["breast-cancer-csv", "diabetes-parquet"],
)
def test_an_initialised_project_validates_and_trains_as_written(
    stemma_exe, tmp_path, mlflow_uri, prefect_api, table, task, metric
):
    source = write_table(tmp_path / "downloads", table)
    root = tmp_path / "project"
    root.mkdir()
    name = f"init-{table.replace('_', '-')}"
    init = run_cli(stemma_exe, "init", str(source), "--target", "target", "--name", name, cwd=root)
    assert init.returncode == 0, init.stderr
    assert f"spec: configs/{name}.yaml: {task} target 'target'" in init.stdout
    assert f"stemma run train configs/{name}.yaml" in init.stdout  # what to do next
    assert "Initialized DVC" not in init.stdout + init.stderr  # DVC's chatter stays quiet
    spec = yaml.safe_load((root / "configs" / f"{name}.yaml").read_text())
    assert spec["data"]["task"] == task and spec["gate"]["metric"] == metric

    validate = run_cli(stemma_exe, "validate", f"configs/{name}.yaml", cwd=root)
    assert validate.returncode == 0, validate.stderr
    assert "column names match" in validate.stdout and "warning" not in validate.stderr

    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    # The spec as written; fewer epochs only to keep the test short.
    train = run_cli(
        stemma_exe,
        "run",
        "train",
        f"configs/{name}.yaml",
        "--set",
        "train.epochs=3",
        cwd=root,
        env=env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"{metric} on the test split" in train.stdout
    assert "gate: PASSED, alias 'champion'" in train.stdout
    ignored = subprocess.run(
        ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
    ).stdout
    assert ".stemma" not in ignored and "production" not in ignored  # run state stays out of git


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("wine", {"task": "multiclass", "classes": ["class_0", "class_1", "class_2"]}),
        ("iris", {"task": "multiclass", "classes": ["setosa", "versicolor", "virginica"]}),
        ("iris_two", {"task": "binary", "labels": {"versicolor": 0, "virginica": 1}}),
    ],
    ids=["wine-multiclass", "iris-multiclass", "iris-two-text-labels"],
)
def test_text_labels_give_a_spec_that_validates(stemma_exe, tmp_path, table, expected):
    source = write_table(tmp_path, table)
    root = tmp_path / "project"
    init = run_cli(
        stemma_exe, "init", str(source), "--target", "target", "--root", str(root), cwd=tmp_path
    )
    assert init.returncode == 0, init.stderr
    config = root / "configs" / "project.yaml"  # named after the folder
    data = yaml.safe_load(config.read_text())["data"]
    assert {key: data.get(key) for key in expected} == expected
    validate = run_cli(stemma_exe, "validate", str(config), cwd=root)
    assert validate.returncode == 0, validate.stderr
    assert "warning" not in validate.stderr


def test_a_second_init_is_refused_and_changes_nothing(tmp_path, capsys):
    source = write_table(tmp_path, "iris")
    root = tmp_path / "project"
    assert main(["init", str(source), "--target", "target", "--root", str(root)]) == 0
    before = snapshot(root)
    code = main(["init", str(source), "--target", "target", "--root", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to overwrite an existing project; nothing was changed" in err
    assert "configs/project.yaml exists" in err and "data.dvc: the data is versioned already" in err
    assert snapshot(root) == before


def test_a_bare_init_then_the_table(tmp_path, capsys):
    root = tmp_path / "project"
    assert main(["init", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "stemma init data/<table>.csv --target <column>" in out
    assert sorted(p.name for p in root.iterdir()) == [
        ".dvc",
        ".dvcignore",
        ".git",
        ".gitignore",
        "configs",
        "data",
        "production",
    ]
    table = write_table(root / "data", "iris")  # the user puts the table in place
    assert main(["init", str(table), "--target", "target", "--root", str(root)]) == 0
    assert "data: data/iris.csv, versioned in data.dvc" in capsys.readouterr().out


def bad_file(folder: Path, kind: str) -> tuple[Path, list[str]]:
    """A table `stemma init` must refuse, and the flags it is given with."""
    path = folder / "table.csv"
    iris = datasets.load_iris(as_frame=True).frame
    if kind == "empty":
        path.write_text("")
    elif kind == "no-header":
        iris.to_csv(path, index=False, header=False)
    elif kind == "one-class":
        iris[iris["target"] == 2].to_csv(path, index=False)
    else:
        iris.to_csv(path, index=False)
    flags = {"no-target-flag": [], "unknown-target": ["--target", "species"]}
    return path, flags.get(kind, ["--target", "target"])


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("empty", 3, "table.csv: the file is empty"),
        ("no-header", 3, "no header row: the first row holds values (5.1, 3.5, 1.4, 0.2, 0)"),
        ("one-class", 3, "target 'target' has a single value (2 in all 50 rows)"),
        ("unknown-target", 2, "--target 'species' is not a column of"),
        ("no-target-flag", 2, "which column is the target? Name it with --target"),
    ],
    ids=["empty", "no-header", "one-class", "unknown-target", "no-target-flag"],
)
def test_bad_input_is_one_clear_error_and_creates_nothing(
    stemma_exe, tmp_path, kind, code, message
):
    path, flags = bad_file(tmp_path, kind)
    root = tmp_path / "project"
    root.mkdir()
    result = run_cli(stemma_exe, "init", str(path), *flags, cwd=root)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(root.iterdir()) == []  # inferred before the folder was touched


def test_validate_warns_when_the_data_is_not_versioned(stemma_exe, tmp_path, capsys):
    source = write_table(tmp_path, "wine")
    root = tmp_path / "project"
    assert main(["init", str(source), "--target", "target", "--root", str(root)]) == 0
    (root / "data.dvc").unlink()  # as if `dvc add data` had never run
    result = run_cli(stemma_exe, "validate", "configs/project.yaml", cwd=root)
    assert result.returncode == 0, result.stderr
    assert (
        "warning: data/wine.csv is not tracked by DVC (no .dvc file covers it and no dvc.yaml "
        "stage writes it), so `stemma run train` will refuse it; fix: `dvc add data`"
    ) in result.stderr
    assert pd.read_csv(root / "data" / "wine.csv").shape[0] == 178  # the table is untouched
