"""Shared fixtures: the repository root and a fast-failing environment for child processes."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Remembered digests (components/digests.py) go to a store of the test session's own, in
# this process and in every child, never to the user's.
_DIGEST_CACHE = tempfile.mkdtemp(prefix="stemma-test-digests-")
os.environ["STEMMA_CACHE_DIR"] = _DIGEST_CACHE
atexit.register(shutil.rmtree, _DIGEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def stemma_exe() -> list[str]:
    """The `stemma` console script of the environment running the tests."""
    script = Path(sys.executable).parent / "stemma"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stemma.flows.cli"]
