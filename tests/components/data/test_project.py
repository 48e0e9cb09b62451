"""A new project: real git and DVC repositories, the table versioned, nothing overwritten."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sklearn import datasets

from stemma.components.data import project
from stemma.components.data.tables import dir_md5, resolve_data_version
from stemma.components.errors import SpecError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "source" / "wine.csv"
    path.parent.mkdir()
    datasets.load_wine(as_frame=True).frame.to_csv(path, index=False)
    return path


def test_a_project_holds_git_dvc_the_versioned_table_and_its_spec(tmp_path, table):
    root = tmp_path / "wine"
    report = project.create_project(root, name="wine", source=table, spec_text="pipeline: x\n")
    assert report.git_created and report.dvc_created
    assert report.data_path == "data/wine.csv" and report.copied_from == table.resolve()
    assert (root / "data" / "wine.csv").read_bytes() == table.read_bytes()
    assert report.data_md5 == dir_md5(root / "data")[0]
    version = resolve_data_version(root, root / "data" / "wine.csv")  # what training reads
    assert version.md5 == report.data_md5
    assert (root / "configs" / "wine.yaml").read_text() == "pipeline: x\n"
    assert (root / "production" / "batches").is_dir() and (root / "production" / "labels").is_dir()
    ignored = (root / ".gitignore").read_text().splitlines()
    assert {".stemma/", "outputs/", "production/", "mlruns/", ".venv/", "/data"} <= set(ignored)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=root, capture_output=True, text=True
    ).stdout
    assert "!! data/" in status and "?? data.dvc" in status  # git sees the pointer, not the data
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=root).returncode != 0  # no commit


def test_a_table_under_data_stays_where_it_is(tmp_path):
    root = tmp_path / "p"
    table = root / "data" / "raw" / "diabetes.parquet"
    table.parent.mkdir(parents=True)
    datasets.load_diabetes(as_frame=True).frame.to_parquet(table)
    report = project.create_project(root, name="d", source=table, spec_text="x: 1\n")
    assert report.data_path == "data/raw/diabetes.parquet" and report.copied_from is None
    assert sorted(p.name for p in (root / "data").rglob("*") if p.is_file()) == ["diabetes.parquet"]


def test_a_bare_project_takes_its_table_later(tmp_path, table):
    root = tmp_path / "p"
    root.mkdir()
    (root / ".gitignore").write_text("*.log")  # the user's own lines stay, first
    bare = project.create_project(root, name="p")
    assert bare.data_path is None and not (root / "data.dvc").exists()
    assert (root / ".dvc").is_dir() and (root / "data").is_dir()
    assert (root / ".gitignore").read_text().startswith("*.log\n# Stemma")
    with pytest.raises(SpecError, match="a DVC repository exists"):
        project.create_project(root, name="p")  # a second bare init has nothing to do
    report = project.create_project(root, name="p", source=table, spec_text="x: 1\n")
    assert not report.git_created and not report.dvc_created
    assert (root / "data.dvc").is_file()
    assert (root / ".gitignore").read_text().count(".stemma/") == 1


@pytest.mark.parametrize(
    ("existing", "message"),
    [
        ("configs/wine.yaml", "configs/wine.yaml exists"),
        ("configs/credit.yaml", "configs/credit.yaml: a spec exists"),
        ("data.dvc", "data.dvc: the data is versioned already"),
        ("data/wine.csv", "data/wine.csv exists and differs"),
    ],
    ids=["same-spec", "another-spec", "pointer", "table-in-the-way"],
)
def test_an_existing_project_is_refused_and_left_as_it_was(tmp_path, table, existing, message):
    root = tmp_path / "p"
    (root / existing).parent.mkdir(parents=True, exist_ok=True)
    (root / existing).write_text("mine\n")
    before = snapshot(root)
    with pytest.raises(SpecError, match="refusing to overwrite an existing project") as refused:
        project.create_project(root, name="wine", source=table, spec_text="x: 1\n")
    assert message in refused.value.render()
    assert snapshot(root) == before and not (root / ".git").exists()


def test_the_same_table_already_in_place_is_no_conflict(tmp_path, table):
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    (root / "data" / "wine.csv").write_bytes(table.read_bytes())
    assert project.existing_project_problems(root, "wine", table) == []


def test_a_step_that_fails_takes_back_what_was_created(tmp_path, table):
    root = tmp_path / "p"
    (root / ".gitignore").mkdir(
        parents=True
    )  # git and DVC start, then .gitignore cannot be written
    before = snapshot(root)
    with pytest.raises(IsADirectoryError):
        project.create_project(root, name="wine", source=table, spec_text="x: 1\n")
    assert sorted(p.name for p in root.iterdir()) == [".gitignore"]
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("folder", "name"),
    [("credit-risk", "credit-risk"), ("my project!", "my-project"), ("---", "pipeline")],
    ids=["plain", "spaces", "nothing-usable"],
)
def test_the_default_name_is_the_folders(tmp_path, folder, name):
    assert project.default_name(tmp_path / folder) == name
    project.check_name(name)


def test_a_name_a_pipeline_cannot_have_is_refused():
    with pytest.raises(SpecError, match="cannot name a pipeline"):
        project.check_name("../evil")


def test_the_pointer_names_the_copied_bytes(tmp_path, table):
    root = tmp_path / "p"
    project.create_project(root, name="wine", source=table, spec_text="x: 1\n")
    pointer = yaml.safe_load((root / "data.dvc").read_text())
    assert pointer["outs"][0]["path"] == "data" and pointer["outs"][0]["nfiles"] == 1
    assert pd.read_csv(root / "data" / "wine.csv").shape == (178, 14)
