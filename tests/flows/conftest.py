"""Real services for the flow tests: a Prefect API, an MLflow store, DVC and git projects."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

#: Small enough to train in seconds, large enough for a meaningful test split.
SMALL_TRAIN_ROWS = 4_000
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Stemma Tests",
    "GIT_AUTHOR_EMAIL": "tests@stemma.invalid",
    "GIT_COMMITTER_NAME": "Stemma Tests",
    "GIT_COMMITTER_EMAIL": "tests@stemma.invalid",
}


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API on a temporary database, for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> Iterator[str]:
    """An MLflow store on SQLite in a temporary folder, shared by the session's tests."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(
        ["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def dvc_add(root: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(root / "data"))


def build_project(root: Path, repo_root: Path, *, train_rows: int) -> Path:
    """A Stemma project: git repo, DVC repo, the worked example's spec and generated data."""
    from dvc.repo import Repo

    from stemma.components.example import generate_credit_data

    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    Repo.init(str(root))
    (root / "configs").mkdir()
    shutil.copy(repo_root / "configs" / "credit.yaml", root / "configs" / "credit.yaml")
    generate_credit_data(root / "data", train_rows=train_rows, days=2, batch_rows=500)
    dvc_add(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "project")
    return root


@pytest.fixture(scope="session")
def template_project(tmp_path_factory, repo_root) -> Path:
    return build_project(
        tmp_path_factory.mktemp("template") / "project", repo_root, train_rows=SMALL_TRAIN_ROWS
    )


@pytest.fixture
def project(template_project, tmp_path) -> Path:
    """A private copy of the template project, free to break."""
    target = tmp_path / "project"
    shutil.copytree(template_project, target, symlinks=True)
    return target


@pytest.fixture
def rewrite_data(project) -> Callable[[Callable[[pd.DataFrame], pd.DataFrame]], None]:
    """Change the training table and record the change with DVC, as a user would."""

    def rewrite(change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
        path = project / "data" / "credit" / "train.parquet"
        frame = change(pd.read_parquet(path))
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        dvc_add(project)

    return rewrite
