"""Helpers shared by tests that point MLflow at a store of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

#: Variables through which MLflow (and Stemma's tracking defaults) pick a store.
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def isolated_mlflow() -> Iterator[None]:
    """Clear MLflow's store settings for the block, and restore them afterwards.

    Ends any run the block left active, so one test's run never leaks into the next.
    """
    import mlflow

    saved = {name: os.environ.pop(name, None) for name in URI_VARIABLES}
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
