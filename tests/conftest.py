"""Shared fixtures: the repository root, a fast-failing environment for child processes, and
real services (a Prefect API, an MLflow store, git + DVC projects) shared by every test
folder, so that one session starts each of them once."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.support import SMALL_TRAIN_ROWS, build_project, rewrite_training_table

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The fault plan's marker, ledger and summary line (tests/faults/plan.py).
pytest_plugins = ("tests.faults.plan",)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Remembered digests (components/digests.py) go to a store of the test session's own, in
# this process and in every child, never to the user's.
_DIGEST_CACHE = tempfile.mkdtemp(prefix="stemma-test-digests-")
os.environ["STEMMA_CACHE_DIR"] = _DIGEST_CACHE
atexit.register(shutil.rmtree, _DIGEST_CACHE, ignore_errors=True)


#: The variables that point Stemma at servers: a test that sets one (directly, or through
#: code that exports it, such as `use_running_services`) must not hand it to the next test,
#: whose server may be gone by then.
SERVER_VARIABLES = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _server_variables_restored() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in SERVER_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def stemma_exe() -> list[str]:
    """The `stemma` console script of the environment running the tests."""
    script = Path(sys.executable).parent / "stemma"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stemma.flows.cli"]


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
        rewrite_training_table(project, change)

    return rewrite
