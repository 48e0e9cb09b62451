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


def log_trained_model(
    frame,
    features,
    *,
    task: str,
    target: str,
    experiment_id: str,
    workdir,
    hidden: tuple[int, ...] = (8,),
    dropout: float = 0.0,
    seed: int = 7,
):
    """Fit a preprocessor, build a seeded network and log both as a model in a new run.

    The network keeps its seeded initial weights: tests of logging, serving and scoring
    need a real model, not a good one.

    Returns:
        ``(preprocessor, network, model_info, weights_sha256, run_id)``.
    """
    import mlflow

    from stemma.components.features import fit_preprocessor
    from stemma.components.models import build_network, network_config
    from stemma.components.spec import ModelSpec
    from stemma.components.tracking import log_pyfunc_model

    preprocessor = fit_preprocessor(frame, features, task=task, target=target)
    config = network_config(ModelSpec(hidden=list(hidden), dropout=dropout))
    network = build_network(config, preprocessor.n_inputs, seed=seed)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info, sha256 = log_pyfunc_model(
            preprocessor=preprocessor,
            network=network,
            network_config=config,
            input_example=frame,
            task=task,
            workdir=workdir,
        )
    return preprocessor, network, info, sha256, run.info.run_id
