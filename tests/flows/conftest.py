"""The flow tests' services and projects come from tests/conftest.py (shared by every test
folder); the project helpers live in tests/support.py and are named here too."""

from tests.support import GIT_ENV, SMALL_TRAIN_ROWS, build_project, dvc_add, git

__all__ = ["GIT_ENV", "SMALL_TRAIN_ROWS", "build_project", "dvc_add", "git"]
