"""Shared fixtures: the repository root and a fast-failing environment for child processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def stemma_exe() -> list[str]:
    """The `stemma` console script of the environment running the tests."""
    script = Path(sys.executable).parent / "stemma"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stemma.flows.cli"]
